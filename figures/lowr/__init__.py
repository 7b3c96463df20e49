"""The LoWR paper's figures, one file each; :mod:`figures.lowr.protocol` holds what they share."""

"""The rsLoRA paper's figures, one file each; :mod:`figures.rslora.protocol` holds what they share."""

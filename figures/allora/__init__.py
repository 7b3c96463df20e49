"""The ALLoRA paper's figures, one file each; :mod:`figures.allora.protocol` holds what they share."""

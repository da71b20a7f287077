"""clipforge: pretrain CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023) models from scratch."""

__version__ = "0.1.0"

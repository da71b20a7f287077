"""Model code: Vision Transformer and text transformer towers, and the two-tower CLIP/SigLIP model.

Nothing here imports Lightning, Hydra or the losses.
"""

from clipforge.models.clip import CLIP
from clipforge.models.text import TextTransformer
from clipforge.models.vision import VisionTransformer

__all__ = ["CLIP", "TextTransformer", "VisionTransformer"]

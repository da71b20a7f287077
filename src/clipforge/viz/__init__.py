"""Pictures of what the image tower sees (patch grid, position-embedding similarity, attention maps,
attention rollout), as files or as figures for W&B."""

from clipforge.viz.attention import (
    figure_to_array,
    model_input,
    pos_embed_similarity,
    record_attention,
    rollout,
    save_vit_pictures,
    vit_attention,
    vit_figures,
)

__all__ = [
    "figure_to_array",
    "model_input",
    "pos_embed_similarity",
    "record_attention",
    "rollout",
    "save_vit_pictures",
    "vit_attention",
    "vit_figures",
]

"""Weight converters between clipforge's from-scratch models and the reference implementations
users know: timm's ViT (Dosovitskiy et al., 2021), open_clip's CLIP (Radford et al., 2021) and
Hugging Face's SigLIP image tower (Zhai et al., 2023). Kept out of the architecture files on purpose.

Each converter is an explicit key map (:mod:`~clipforge.models.convert.keymap`) applied strictly in
either direction; tests prove every port numerically with :func:`check_parity`. timm, open_clip and
transformers are imported only when a converter that needs them runs.
"""

from clipforge.models.convert.config import instantiate_model, model_config
from clipforge.models.convert.keymap import (
    KeyMap,
    ParityError,
    Rule,
    check_parity,
    convert_state_dict,
    count_params,
)
from clipforge.models.convert.openclip import from_open_clip, open_clip_key_map, to_open_clip
from clipforge.models.convert.openclip_config import model_config_from_open_clip, open_clip_model_cfg
from clipforge.models.convert.openclip_io import (
    export_open_clip,
    infer_open_clip_cfg,
    load_open_clip_checkpoint,
    open_clip_preprocessing,
    open_clip_tokenizer,
)
from clipforge.models.convert.resize import fit_state_dict, load_state_dict_resized
from clipforge.models.convert.siglip_hf import (
    from_hf_siglip,
    siglip_key_map,
    siglip_vision_config,
    to_hf_siglip,
)
from clipforge.models.convert.timm_vit import from_timm, timm_key_map, timm_kwargs, to_timm

__all__ = [
    "KeyMap",
    "ParityError",
    "Rule",
    "check_parity",
    "convert_state_dict",
    "count_params",
    "export_open_clip",
    "fit_state_dict",
    "from_hf_siglip",
    "from_open_clip",
    "from_timm",
    "infer_open_clip_cfg",
    "instantiate_model",
    "load_open_clip_checkpoint",
    "load_state_dict_resized",
    "model_config",
    "model_config_from_open_clip",
    "open_clip_key_map",
    "open_clip_model_cfg",
    "open_clip_preprocessing",
    "open_clip_tokenizer",
    "siglip_key_map",
    "siglip_vision_config",
    "timm_key_map",
    "timm_kwargs",
    "to_hf_siglip",
    "to_open_clip",
    "to_timm",
]

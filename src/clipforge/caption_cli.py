"""``clipforge-caption``: greedy decoding with the LocCa decoder (Wan et al., 2024) that SigLIP 2
(Tschannen et al., 2025) trains beside the sigmoid loss (``objectives=locca``). Three tasks, one per call:
caption an image, turn a referring expression into a box, or caption the region inside a box.

``main`` is the Hydra wrapper over conf/caption.yaml; :func:`run_caption` the plain function it calls (and
tests call); :func:`clipforge.eval.captioning.decode` works on tensors.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from clipforge.checkpoint import load_captioner
from clipforge.data.config import stored_preprocessing
from clipforge.entry import hydra_entry
from clipforge.eval.captioning import decode
from clipforge.eval.datasets import eval_transform, image_batch, image_paths, read_images
from clipforge.eval.runtime import check_device, resolve_device


def run_caption(cfg: DictConfig) -> dict[str, Any]:
    """Decode every ``cfg.image``; prints ``<path>: <answer>`` and returns ``{path: answer}``."""
    check_device(cfg.get("device", "auto"))
    paths = image_paths(cfg.image)
    pictures = read_images(paths)  # before the model loads: an unreadable image fails at once, naming it
    model, decoder, stored = load_captioner(cfg.checkpoint, use_ema=bool(cfg.get("use_ema")))
    device = resolve_device(cfg.get("device", "auto"), model)
    model, decoder = model.to(device), decoder.to(device)
    images = image_batch(pictures, eval_transform(model.visual.img_size, **stored_preprocessing(stored)))
    box = list(cfg.box) if cfg.get("box") is not None else None
    answers = decode(
        model, decoder, images.to(device), cfg.get("task", "caption"), cfg.get("ref"), box,
        cfg.get("max_new_tokens"),
    )  # fmt: skip
    for p, a in zip(paths, answers):
        print(f"{p}: {a}")
    return dict(zip(paths, answers))


main = hydra_entry("caption", run_caption)

if __name__ == "__main__":
    main()

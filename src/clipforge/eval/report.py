"""What ``clipforge-zeroshot`` (:mod:`clipforge.eval.cli`) writes and prints: the results dictionary of a
zero-shot run (NaN accuracies as JSON ``null``), its JSON file and confusion-matrix picture in the run
directory, and the summary printed at the end.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from clipforge.eval.metadata import Template


def output_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory when launched through Hydra (so ``hydra.run.dir=`` and ``output_dir=`` both
    move every output, the log included), else ``cfg.output_dir`` for programmatic calls."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and not OmegaConf.is_missing(HydraConfig.get().runtime, "output_dir"):
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.output_dir)


def write_json(cfg: DictConfig, results: dict[str, Any], name: str) -> None:
    """``results`` as ``<output dir>/<name>``; its path goes into ``results['results_file']``."""
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(results, indent=2))
    results["results_file"] = str(out_dir / name)


def nan_to_none(x: float) -> float | None:
    """NaN (an accuracy with nothing to count) as ``None``, which JSON writes as ``null``."""
    return None if isinstance(x, float) and math.isnan(x) else x


def distinct_names(classnames: list[str]) -> list[str]:
    """The class names as keys that cannot collide: a name that several labels share gets its label index
    (open_clip's ImageNet names hold "missile" and "sunglasses" twice), so no class's result overwrites
    another's."""
    counts = Counter(classnames)
    return [f"{c} [{i}]" if counts[c] > 1 else c for i, c in enumerate(classnames)]


def results_dict(
    res: dict[str, Any], classnames: list[str], templates: list[Template], model_label: str, cfg: DictConfig
) -> dict[str, Any]:
    """The JSON-ready results of a zero-shot run from :func:`~clipforge.eval.zeroshot.evaluate_zero_shot`'s ``res``."""
    out = {k: nan_to_none(v) for k, v in res.items() if k.startswith("top")}
    out |= {
        "mean_per_class_accuracy": nan_to_none(res["mean_per_class_accuracy"]),
        "num_samples": res["num_samples"],
        "num_skipped": res["num_skipped"],
        "num_classes": len(classnames),
        "num_templates": len(templates),
        "trivial_top_k": res.get("trivial_top_k", []),
        "model": model_label,
        "dataset": OmegaConf.to_container(cfg.eval.dataset, resolve=True),
        "per_class_accuracy": {
            c: nan_to_none(a) for c, a in zip(distinct_names(classnames), res["per_class_accuracy"])
        },
        "classnames": classnames,
        "confusion": res["confusion"].tolist(),
    }
    return out


def write_outputs(cfg: DictConfig, results: dict[str, Any], res: dict[str, Any]) -> None:
    """``results.json`` and, unless ``save_confusion=false``, ``confusion.png`` in the output directory."""
    write_json(cfg, results, "results.json")
    out_dir = output_dir(cfg)
    if cfg.get("save_confusion", True):
        from clipforge.eval.plots import confusion_matrix_figure, save_figure

        fig = confusion_matrix_figure(res["confusion"], results["classnames"])
        results["confusion_png"] = str(save_figure(fig, out_dir / "confusion.png"))


def _trivial(results: dict[str, Any], k: int) -> str:
    """A note after a top-``k`` accuracy that holds every class (fewer than ``k`` classes)."""
    return (
        f" (every one of {results['num_classes']} classes)" if k in results.get("trivial_top_k", ()) else ""
    )


def _top_ks(results: dict[str, Any]) -> list[int]:
    """The ks of the ``top{k}`` accuracies in ``results``, smallest first (``top_k=`` adds one to 1 and 5)."""
    return sorted(int(key[3:]) for key in results if key.startswith("top") and key[3:].isdigit())


def format_summary(results: dict[str, Any], worst: int = 5) -> str:
    """The lines printed after a zero-shot run: sizes, accuracies, the ``worst`` classes, the results file."""
    lines = [
        f"zero-shot: {results['model']}",
        f"  {results['num_samples']} images, {results['num_classes']} classes, {results['num_templates']} templates"
        + (f", {results['num_skipped']} unreadable images skipped" if results["num_skipped"] else ""),
        "  "
        + "   ".join(
            f"top-{k} {100 * results[f'top{k}']:.2f}%{_trivial(results, k)}" for k in _top_ks(results)
        )
        + f"   mean per-class {100 * (results['mean_per_class_accuracy'] or 0):.2f}%   "
        f"(chance {100 / results['num_classes']:.2f}%)",
    ]
    scored = [(a, c) for c, a in results["per_class_accuracy"].items() if a is not None]
    if len(scored) > worst:
        lines.append(
            "  worst classes: " + ", ".join(f"{c} {100 * a:.0f}%" for a, c in sorted(scored)[:worst])
        )
    if "results_file" in results:
        lines.append(f"  results: {results['results_file']}")
    return "\n".join(lines)

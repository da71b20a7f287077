"""``clipforge-zeroshot``: zero-shot classification as in CLIP (Radford et al., 2021) of a labelled image
set (image folder, labelled WebDataset shards or the synthetic held-out split) or of single images;
with ``task=retrieval`` image-text recall@K, with ``task=linear_probe`` CLIP's logistic-regression probe.

``main`` is the Hydra wrapper over conf/zeroshot.yaml; :func:`run_zeroshot` is the plain function it
calls (and tests call). Under ``torchrun`` every rank evaluates its part and rank 0 writes the results.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from clipforge.data.config import check_at_least, stored_preprocessing
from clipforge.distributed import world_info
from clipforge.entry import hydra_entry
from clipforge.eval.datasets import collate_skipping, eval_transform, image_batch, image_paths, read_images
from clipforge.eval.distributed import shard_dataloader
from clipforge.eval.linear_probe import linear_probe
from clipforge.eval.metadata import DEFAULT_TEMPLATES, Template, load_classnames, load_templates
from clipforge.eval.model_facts import (
    check_vocabulary,
    model_image_size,
    record_dataset,
    render_size,
    synthetic_holdout,
)
from clipforge.eval.report import format_summary, nan_to_none, results_dict, write_json, write_outputs
from clipforge.eval.retrieval import evaluate_retrieval
from clipforge.eval.runtime import check_device, resolve_device
from clipforge.eval.zeroshot import build_zero_shot_classifier, check_top_k, evaluate_zero_shot, predict

log = logging.getLogger(__name__)


def load_eval_model(cfg: DictConfig) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model named by ``checkpoint``, ``open_clip_checkpoint`` or the ``model`` config, a label for it and
    the config a clipforge checkpoint stores (``{}`` for the other two)."""
    sources = [k for k in ("checkpoint", "open_clip_checkpoint") if cfg.get(k)]
    if cfg.get("model") is not None:
        sources.append("model")
    if len(sources) != 1:
        raise ValueError(
            "give exactly one model: checkpoint=<clipforge .ckpt>, open_clip_checkpoint=<weights file or "
            f"folder> [open_clip_model=<name>], or model=<conf/model name> (random init); got {sources or 'none'}"
        )
    if cfg.get("open_clip_model") and not cfg.get("open_clip_checkpoint"):  # else the other model was scored
        raise ValueError(
            f"open_clip_model={cfg.open_clip_model!r} names the architecture of open_clip_checkpoint= weights, "
            f"which are not given (the model comes from {sources[0]}=): give open_clip_checkpoint=, or leave "
            "open_clip_model out"
        )
    if cfg.get("open_clip_pretrained") and not cfg.get("open_clip_checkpoint"):
        raise ValueError(
            f"open_clip_pretrained={cfg.open_clip_pretrained!r} names the preprocessing of open_clip_checkpoint= "
            "weights, which are not given: a clipforge checkpoint carries its own"
        )
    if cfg.get("use_ema") and not cfg.get("checkpoint"):
        raise ValueError(
            "use_ema=true reads the EMA weights of a clipforge checkpoint: give checkpoint=<.ckpt>"
        )
    if cfg.get("checkpoint"):
        from clipforge.checkpoint import load_model

        use_ema = bool(cfg.get("use_ema"))
        model, stored = load_model(cfg.checkpoint, use_ema=use_ema)
        # a checkpoint trained with ema=default holds two models: the results say which one was scored
        which = " (EMA weights)" if use_ema else ""
        if not use_ema and stored.get("ema"):
            which = " (training weights; it also holds EMA weights, which use_ema=true scores)"
            log.info("checkpoint %s holds EMA weights too: scoring the training weights", cfg.checkpoint)
        return model, f"checkpoint {cfg.checkpoint}{which}", stored
    if cfg.get("open_clip_checkpoint"):
        try:
            from clipforge.models.convert import load_open_clip_checkpoint
        except ImportError as e:
            raise RuntimeError(
                f"open_clip checkpoints need clipforge.models.convert, which failed to import: {e}"
            ) from e
        if not Path(cfg.open_clip_checkpoint).exists():
            raise FileNotFoundError(f"open_clip_checkpoint={cfg.open_clip_checkpoint!r} does not exist")
        from clipforge.models.convert import open_clip_preprocessing

        model = load_open_clip_checkpoint(cfg.open_clip_checkpoint, cfg.get("open_clip_model"))
        prep = open_clip_preprocessing(
            cfg.open_clip_checkpoint, cfg.get("open_clip_model"), cfg.get("open_clip_pretrained")
        )
        return model, f"open_clip {cfg.open_clip_checkpoint}", {"data": {"augment": prep}} if prep else {}
    from clipforge.checkpoint import build_model

    log.warning("evaluating a randomly initialised model (model=...): expect chance accuracy")
    return build_model(cfg.model), "random init", {}


def _build_dataset(node: DictConfig, **available: Any) -> Any:
    """Instantiate a dataset node (a ``_partial_`` factory), passing those of ``available`` it accepts; a
    required key left at ``???`` (``eval.dataset.root`` of ``eval/dataset=imagefolder``) is named."""
    missing = sorted(OmegaConf.missing_keys(node))  # full keys (eval.dataset.root) for a node of cfg
    if missing:
        keys = [k if k.startswith("eval.dataset.") else f"eval.dataset.{k}" for k in missing]
        raise ValueError(f"{node.get('_target_')} needs {', '.join(keys)}: set it on the command line")
    factory = instantiate(node)
    params = inspect.signature(factory.func if hasattr(factory, "func") else factory).parameters
    return factory(**{k: v for k, v in available.items() if k in params and v is not None})


def _loader(dataset: Any, cfg: DictConfig, device: torch.device, collate: Any = collate_skipping) -> Any:
    if getattr(dataset, "yields_batches", False):  # already batched (caption shards)
        return DataLoader(dataset, batch_size=None, num_workers=cfg.get("num_workers", 0))
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.get("num_workers", 0),
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )


def resolve_task(cfg: DictConfig, dataset: Any) -> tuple[list[str], list[Template]]:
    """Class names and templates. A dataset that knows its classes (folders, synthetic shapes) was
    built with the config's names and holds them in label order; otherwise the config's names apply."""
    if getattr(dataset, "classnames", None):
        classnames = list(dataset.classnames)
    elif cfg.get("classnames") is not None:
        classnames = load_classnames(cfg.classnames)
    else:
        raise ValueError(
            "this dataset does not name its classes: set classnames=imagenet|cifar10|cifar100|<file>"
        )
    if cfg.get("templates") is not None:
        templates = load_templates(cfg.templates)
    else:
        templates = load_templates(getattr(dataset, "templates", None) or DEFAULT_TEMPLATES)
    return classnames, templates


def _init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def _setup(cfg: DictConfig) -> tuple[nn.Module, str, torch.device, int, Any, dict[str, Any]]:
    """``(model on its device, label, device, input size, tokenizer, the checkpoint's stored config)``,
    joining torchrun's group if any."""
    _init_distributed()
    model, model_label, stored = load_eval_model(cfg)
    device = resolve_device(cfg.get("device", "auto"), model)
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    from clipforge.data.tokenizer import Tokenizer

    image_size = model_image_size(model, cfg.get("image_size"))
    tokenizer = Tokenizer(model.text.context_length)
    check_vocabulary(model, tokenizer.vocab_size, model_label)
    return model.to(device).eval(), model_label, device, image_size, tokenizer, stored


def run(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch on ``cfg.task``: ``zeroshot`` (default), ``retrieval`` or ``linear_probe``."""
    task = cfg.get("task", "zeroshot")
    runners = {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "linear_probe": run_linear_probe}
    if task not in runners:
        raise ValueError(f"task must be one of {list(runners)}, got {task!r}")
    # a synthetic set of no images was found out after the model loaded and the prompts were encoded, as
    # "no readable images were evaluated", naming no key
    check_at_least(1, "eval.dataset", num_samples=OmegaConf.select(cfg, "eval.dataset.num_samples"))
    check_device(cfg.get("device", "auto"))
    return runners[task](cfg)


def run_zeroshot(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate (or, with ``image=``, predict) and return the results; rank 0 writes them to ``output_dir``."""
    paths = image_paths(cfg.get("image"))
    pictures = read_images(paths)  # before the model loads: an unreadable image fails at once, naming it
    model, model_label, device, image_size, tokenizer, stored = _setup(cfg)
    rank, _ = world_info()
    transform = eval_transform(image_size, **stored_preprocessing(stored))
    names_given = load_classnames(cfg.classnames) if cfg.get("classnames") is not None else None
    dataset = None
    if not cfg.get("image") or names_given is None:
        dataset = _build_dataset(
            cfg.eval.dataset,
            transform=transform,
            classnames=names_given,
            render_size=render_size(cfg, image_size, stored),
            holdout=synthetic_holdout(cfg, stored),
        )
    classnames, templates = resolve_task(cfg, dataset)
    classifier = build_zero_shot_classifier(
        model,
        tokenizer,
        classnames,
        templates,
        device=device,
        batch_size=cfg.get("prompt_batch_size", 256),
        progress=cfg.get("progress", False),
        precision=cfg.get("precision", "auto"),
        distributed=True,
    )
    if pictures:
        images = image_batch(pictures, transform)
        return _predict_images(cfg, model, classifier, classnames, paths, images, device)

    res = evaluate_zero_shot(
        model,
        classifier,
        shard_dataloader(_loader(dataset, cfg, device)),
        device=device,
        progress=cfg.get("progress", False),
        top_k=sorted({1, 5, check_top_k(cfg.get("top_k", 5))}),
        precision=cfg.get("precision", "auto"),
    )
    if res["num_samples"] == 0:
        raise ValueError(f"no readable images were evaluated ({res['num_skipped']} skipped)")
    results = results_dict(res, classnames, templates, model_label, cfg)
    record_dataset(results, dataset)
    if rank == 0:
        write_outputs(cfg, results, res)
        print(format_summary(results), flush=True)
    return results


def run_retrieval(cfg: DictConfig) -> dict[str, Any]:
    """Image<->text recall@K over held-out pairs (synthetic captions or ``eval/dataset=captions_wds``)."""
    model, model_label, device, image_size, tokenizer, stored = _setup(cfg)
    rc = cfg.get("retrieval") or {}
    prep = stored_preprocessing(stored)
    dataset = _build_dataset(
        cfg.eval.dataset,
        transform=eval_transform(image_size, **prep),
        **prep,  # caption shards build their own transform
        tokenizer=tokenizer,
        target="caption",
        image_size=image_size,
        context_length=tokenizer.context_length,
        batch_size=cfg.batch_size,
        num_workers=cfg.get("num_workers", 0),
        render_size=render_size(cfg, image_size, stored),
        holdout=synthetic_holdout(cfg, stored),
    )
    if getattr(dataset, "target", None) not in ("caption", "text"):
        raise ValueError(
            "task=retrieval needs image-text pairs: the synthetic set or eval/dataset=captions_wds"
        )
    res = evaluate_retrieval(
        model,
        shard_dataloader(_loader(dataset, cfg, device, collate=None)),
        device=device,
        progress=cfg.get("progress", False),
        ks=list(rc.get("ks", (1, 5, 10))),
        dedupe_captions=rc.get("dedupe_captions", True),
        precision=cfg.get("precision", "auto"),
        max_samples=rc.get("max_samples"),
    )
    results = {**res, "model": model_label, "dataset": OmegaConf.to_container(cfg.eval.dataset, resolve=True)}
    record_dataset(results, dataset)
    if world_info()[0] == 0:
        write_json(cfg, results, "retrieval.json")
        recalls = "  ".join(f"{k} {100 * v:.2f}%" for k, v in res.items() if "_r" in k)
        print(f"retrieval: {model_label}\n  {res['num_samples']} pairs  {recalls}", flush=True)
    return results


def run_linear_probe(cfg: DictConfig) -> dict[str, Any]:
    """CLIP's logistic-regression probe: fit on the train split's frozen features, score the test split.

    The test split is ``eval.dataset``; the train split is the same node with the keys of
    ``linear_probe.train_dataset`` replaced (e.g. ``{root: /data/train}``), by default the synthetic
    generator's train split.
    """
    model, model_label, device, image_size, _, stored = _setup(cfg)
    pc = cfg.get("linear_probe") or {}
    transform = eval_transform(image_size, **stored_preprocessing(stored))
    names = load_classnames(cfg.classnames) if cfg.get("classnames") is not None else None
    size, holdout = render_size(cfg, image_size, stored), synthetic_holdout(cfg, stored)
    test_set = _build_dataset(
        cfg.eval.dataset, transform=transform, classnames=names, render_size=size, holdout=holdout
    )
    train_node = _train_split_node(cfg.eval.dataset, pc.get("train_dataset"))
    train_set = _build_dataset(
        train_node, transform=transform, classnames=names, render_size=size, holdout=holdout
    )
    train_classes, test_classes = (getattr(d, "folder_names", None) for d in (train_set, test_set))
    if train_classes is not None and test_classes is not None and train_classes != test_classes:
        # label i must be the same class in both splits, or the probe scores the wrong classes
        raise ValueError(
            f"the train and test splits have different class folders: {train_classes} vs {test_classes}"
        )
    # a dataset that names its classes holds the given names in its label order
    classnames = list(getattr(test_set, "classnames", None) or names or [])
    res = linear_probe(
        model,
        shard_dataloader(_loader(train_set, cfg, device)),
        shard_dataloader(_loader(test_set, cfg, device)),
        num_classes=len(classnames) or None,
        C=pc.get("C"),
        device=device,
        normalize=pc.get("normalize", True),
        max_iter=pc.get("max_iter", 1000),
        progress=cfg.get("progress", False),
        precision=cfg.get("precision", "auto"),
    )
    results = {k: nan_to_none(v) for k, v in res.items() if k.startswith("top")}
    results |= {
        "mean_per_class_accuracy": nan_to_none(res["mean_per_class_accuracy"]),
        "num_samples": res["num_samples"],
        "num_train": res["num_train"],
        "num_skipped": res["num_skipped"],
        "C": res["C"],
        "trivial_top_k": res["trivial_top_k"],
        "c_sweep": {str(k): v for k, v in res["c_sweep"].items()},
        "model": model_label,
        "per_class_accuracy": [nan_to_none(a) for a in res["per_class_accuracy"]],
        "classnames": classnames,
        "confusion": res["confusion"].tolist(),
    }
    if world_info()[0] == 0:
        write_json(cfg, results, "linear_probe.json")
        print(
            f"linear probe: {model_label}\n  train {res['num_train']}, test {res['num_samples']} images, "
            f"C={res['C']:.3g}: top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%",
            flush=True,
        )
    return results


def _train_split_node(test_node: DictConfig, overrides: Any) -> DictConfig:
    if overrides is None:
        if not str(test_node.get("_target_", "")).endswith("SyntheticHeldoutDataset"):
            raise ValueError(
                "task=linear_probe needs a train split: set linear_probe.train_dataset={root: ...}"
            )
        overrides = {"split": "train"}
    node = OmegaConf.merge(test_node, overrides)
    assert isinstance(node, DictConfig)
    return node


def _predict_images(
    cfg: DictConfig,
    model: nn.Module,
    classifier: torch.Tensor,
    classnames: list[str],
    paths: list[str],
    images: torch.Tensor,
    device: Any,
) -> dict[str, Any]:
    top = predict(
        model, classifier, images, classnames, k=check_top_k(cfg.get("top_k", 5)), device=device,
        precision=cfg.get("precision", "auto"),
    )  # fmt: skip
    out = {
        "predictions": {str(p): [{"class": c, "probability": q} for c, q in t] for p, t in zip(paths, top)}
    }
    if world_info()[0] == 0:
        for p, t in zip(paths, top):
            print(p)
            for c, q in t:
                print(f"  {100 * q:6.2f}%  {c}")
    return out


main = hydra_entry("zeroshot", run)

if __name__ == "__main__":
    main()

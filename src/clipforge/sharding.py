"""FSDP2 for the two-tower model: ``torch.distributed.fsdp.fully_shard`` per transformer block, then the root.

FSDP2 (per-parameter sharding as DTensors, Zhao et al., 2023 for FSDP; PyTorch's ``fully_shard`` rewrite)
is what open_clip trains with on its main branch and what Lightning's ``ModelParallelStrategy`` expects the
LightningModule to apply in ``configure_model`` (``trainer/strategy=fsdp2``). Each ``Block`` is one unit:
its weights are all-gathered for its forward and backward and freed after; everything else (patch and
token embeddings, position embeddings, norms, projections, the logit scale and bias) belongs to the root
unit, gathered once per step. Every rank is a data-parallel rank: the model is sharded over the whole
world on a one-dimensional mesh (ZeRO-3), whatever shape Lightning gave its own device mesh.

Two things this model needs beyond the textbook recipe:

- ``fully_shard`` refuses 0-dim parameters, and the logit scale (and SigLIP's bias) are scalars. They are
  reshaped to ``(1,)`` before sharding (:func:`scalars_to_vectors`); consolidation
  (:func:`clipforge.consolidate.consolidate_checkpoint`) gives them back their model shape, so
  consolidated checkpoints keep the layout of every other clipforge checkpoint.
- FSDP2 gathers the root's parameters in hooks around the root's ``forward``, so the training step must go
  through ``CLIP.forward`` (``normalize=False`` keeps the raw features the module logs), never through
  ``encode_image`` or ``model.logit_scale`` directly (:class:`clipforge.module.ContrastiveModule` does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipforge.models.layers import Block


def is_model_parallel(strategy: Any) -> bool:
    """Whether ``strategy`` is (a subclass of) Lightning's ``ModelParallelStrategy``, by name, so that this
    module never imports Lightning's experimental strategy where it is not used."""
    return any(c.__name__ == "ModelParallelStrategy" for c in type(strategy).__mro__)


def is_fsdp2(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was already applied to ``module`` (``configure_model`` may run twice)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def scalars_to_vectors(model: nn.Module) -> list[str]:
    """Replace every 0-dim parameter by a ``(1,)`` one with the same value (``fully_shard`` needs dim 0);
    returns their names. Broadcasting keeps the model's arithmetic unchanged."""
    names = []
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def world_mesh(device_type: str) -> Any:
    """A one-dimensional device mesh over every rank of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def apply_fsdp2(
    model: nn.Module, mesh: Any, reshard_after_forward: bool = True, mp_policy: Any = None
) -> nn.Module:
    """``fully_shard`` every transformer ``Block`` of ``model``, then ``model`` itself, over ``mesh``.

    ``reshard_after_forward=True`` frees each block's gathered weights after its forward (ZeRO-3); the
    backward gathers them again. ``mp_policy`` is an optional FSDP2 ``MixedPrecisionPolicy`` (Lightning's
    ``bf16-mixed`` autocast already applies without one). Returns ``model``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fsdp2(model):
        return model
    scalars_to_vectors(model)
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer Block to shard")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shard of each gradient (a DTensor's local tensor; plain tensors as they are)."""
    from torch.distributed.tensor import DTensor

    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def weights_sharded(trainer: Any) -> bool:
    """Whether the trainer's strategy shards the weights (FSDP, FSDP2 under ``ModelParallelStrategy``,
    DeepSpeed): then a forward outside the training step would need every rank's shards gathered through
    the strategy's wrapper, so the in-training evaluation and picture callbacks skip (with a warning)
    instead of hanging rank 0 in a collective. The checkpoints evaluate offline with ``clipforge-zeroshot
    checkpoint=...``: FSDP's consolidated file (``state_dict_type: full``) as it is, an FSDP2 sharded
    directory directly or after ``clipforge-consolidate``."""
    strategy = getattr(trainer, "strategy", None)
    names = {c.__name__ for c in type(strategy).__mro__} if strategy is not None else set()
    return bool(names & {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


SHARDED_HINT = (
    "the strategy shards the model's weights (FSDP, FSDP2, DeepSpeed), so it cannot run a forward pass "
    "outside the training step; evaluate the saved checkpoint with `clipforge-zeroshot checkpoint=...` "
    "instead (a sharded checkpoint directory too, or its `clipforge-consolidate` file)"
)


def skip_when_sharded(owner: Any, trainer: Any, what: str) -> bool:
    """True when ``trainer`` shards the weights, so ``owner`` (a callback) must not run ``what`` (a forward
    outside the training step); the first time, one warning names the owner and says what to do instead."""
    if not weights_sharded(trainer):
        return False
    if not getattr(owner, "_sharded_warned", False):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{type(owner).__name__}: {SHARDED_HINT}; no {what} from now on")
        owner._sharded_warned = True
    return True

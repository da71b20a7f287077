"""Override lists that many tests' training runs share (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

# no progress bar and no model summary: test logs stay readable
QUIET = (
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


def towers(width: int = 32, depth: int = 1, heads: int = 2) -> tuple[str, ...]:
    """Both towers at ``width`` (their output too), ``depth`` blocks and ``heads`` heads."""
    sizes = {"embed_dim": width, "depth": depth, "num_heads": heads, "output_dim": width}
    return tuple(f"model.{tower}.{k}={v}" for tower in ("vision", "text") for k, v in sizes.items())


# A few steps of the tiny model on a small synthetic set: seconds on 2 cores.
FAST = (
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=2",
    "final_eval=false",
)

# Smaller still: a one-block model, 4 steps an epoch, only a step checkpoint (in the output dir) as callback.
SMALL = (
    *towers(32, 1, 2),
    "data.source.num_train=64",
    "data.source.num_heldout=32",
    "data.source.samples_per_shard=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "callbacks=none",
    *FAST,
)
PERIODIC = (
    "+callbacks.ckpt._target_=clipforge.callbacks.PeriodicCheckpoint",
    "+callbacks.ckpt.dirpath=${paths.output_dir}",
)

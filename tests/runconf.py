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

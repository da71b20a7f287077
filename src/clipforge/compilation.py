"""torch.compile for training: which modes the ``compile`` setting takes, and how the towers and the loss
are compiled in place. Used by ``clipforge-train`` and by the benchmarks that time its step.

No paper; torch.compile (Ansel et al., 2024, "PyTorch 2") traces each tower and the dense losses as one
graph each (tested: ``tests/models/test_compile_graph.py``).
"""

from __future__ import annotations

from typing import Any

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: Any) -> str | None:
    """The ``compile`` key: false/null (eager), true (torch.compile's default mode) or a mode name
    (``reduce-overhead`` adds CUDA graphs, ``max-autotune`` searches kernels); anything else fails."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"compile={value!r}: use false, true or one of {', '.join(COMPILE_MODES)}")


def compile_in_place(model: torch.nn.Module, loss: torch.nn.Module, mode: str) -> None:
    """torch.compile each tower and the loss in place (nn.Module.compile), so parameter names and
    checkpoints stay those of the eager model. The towers one by one rather than the whole model: the
    SigLIP 2 objectives' step calls them separately (it needs the image tower's un-pooled tokens)."""
    model.visual.compile(mode=mode)
    model.text.compile(mode=mode)
    loss.compile(mode=mode)

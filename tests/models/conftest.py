"""Fixtures for the model, converter and picture tests (helpers live in modelhelpers.py)."""

from __future__ import annotations

import pytest
import torch
from modelhelpers import small_text, small_vit

from clipforge.models import CLIP


@pytest.fixture
def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(small_vit(), small_text()).eval()

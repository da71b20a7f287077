"""Fixtures of the evaluation tests (models and data live in evalhelpers.py)."""

from __future__ import annotations

import pytest
from evalhelpers import CONTEXT_LENGTH, HandSetModel

from clipforge.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(CONTEXT_LENGTH)


@pytest.fixture
def handset_model(tokenizer: Tokenizer) -> HandSetModel:
    words = {"cat": [1, 0, 0, 0], "dog": [0, 1, 0, 0], "bird": [0, 0, 1, 0], "photo": [0, 0, 0, 1]}
    return HandSetModel(words, dim=4, tokenizer=tokenizer)

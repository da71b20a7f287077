"""clipforge-caption's decoding (:func:`clipforge.eval.captioning.decode`) refuses requests it cannot answer
before it runs the model."""

from __future__ import annotations

import pytest
import torch

from clipforge.eval.captioning import decode


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be positive"),  # was taken as null: a full caption
        ({"max_new_tokens": -1}, "max_new_tokens must be positive"),  # was an empty caption
        ({"task": "grounded", "box": [0.1, 0.1]}, r"needs box=\[x0,y0,x1,y1\]"),
        ({"task": "grounded", "box": [0.5, 0.5, 0.1, 0.1]}, "0 <= x0 < x1 <= 1"),  # corners swapped
        ({"task": "grounded", "box": [2, 2, 3, 3]}, "0 <= x0 < x1 <= 1"),  # outside the image
        ({"task": "grounded", "box": [-1, 0.1, 0.5, 0.5]}, "0 <= x0 < x1 <= 1"),
        # a ref or box the task does not read: the default task captioned the whole image instead
        ({"ref": "the red circle"}, "ref= is read by task=box only, not task=caption"),
        ({"box": [0.1, 0.1, 0.5, 0.5]}, "box= is read by task=grounded only, not task=caption"),
        ({"task": "box", "ref": "x", "box": [0.1, 0.1, 0.5, 0.5]}, "box= is read by task=grounded only"),
        ({"task": "grounded", "box": [0.1, 0.1, 0.5, 0.5], "ref": "x"}, "ref= is read by task=box only"),
    ],
)
def test_requests_that_have_no_answer_are_refused(kwargs: dict, match: str) -> None:
    # Before, each decoded an empty string (or ignored the setting) and printed it as the answer.
    with pytest.raises(ValueError, match=match):
        decode(None, None, torch.zeros(1, 3, 32, 32), **kwargs)  # type: ignore[arg-type]

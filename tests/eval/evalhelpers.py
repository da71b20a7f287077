"""Hand-set models for the evaluation tests: encoders whose outputs are chosen by the test, so the
right accuracy, confusion matrix and recalls are known in advance."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipforge.data.tokenizer import Tokenizer

CONTEXT_LENGTH = 16
IMAGE_SIZE = 4  # images are (3, 4, 4); the feature vector sits in images[:, 0, 0, :dim]


class _Text(nn.Module):
    def __init__(self, context_length: int) -> None:
        super().__init__()
        self.context_length = context_length


class HandSetModel(nn.Module):
    """``encode_image`` returns the vector written in the first image row; ``encode_text`` is a bag of
    words: the sum of per-token vectors from ``word_vectors`` (other tokens contribute nothing)."""

    def __init__(self, word_vectors: dict[str, list[float]], dim: int, tokenizer: Tokenizer) -> None:
        super().__init__()
        table = torch.zeros(tokenizer.vocab_size, dim)
        for word, vec in word_vectors.items():
            ids = tokenizer(word)[0]
            assert int((ids > 0).sum()) == 3, f"{word!r} must be a single BPE token"
            table[ids[1]] = torch.tensor(vec, dtype=torch.float32)
        self.register_buffer("table", table)
        self.gain = nn.Parameter(torch.ones(()))  # a parameter, so the model has a device
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.logit_bias = None
        self.embed_dim = dim
        self.text = _Text(tokenizer.context_length)
        self.visual = nn.Module()
        self.visual.img_size = IMAGE_SIZE

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = images[:, 0, 0, : self.embed_dim] * self.gain
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.table[tokens].sum(dim=1) * self.gain
        return nn.functional.normalize(x, dim=-1) if normalize else x


def images_from_features(features: list[list[float]]) -> torch.Tensor:
    f = torch.tensor(features, dtype=torch.float32)
    images = torch.zeros(f.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE)
    images[:, 0, 0, : f.shape[1]] = f
    return images


CLASSNAMES = ["cat", "dog", "bird"]
# Image features and true labels; class k's text direction is e_k (dims 0-2), dim 3 is "photo".
FEATURES = [
    [1.0, 0.0, 0.0, 0.0],  # cat  -> cat
    [0.2, 0.9, 0.1, 0.0],  # cat  -> dog (cat 2nd)
    [0.0, 1.0, 0.0, 0.0],  # dog  -> dog
    [0.1, 0.8, 0.0, 0.5],  # dog  -> dog
    [0.1, 0.0, 1.0, 0.0],  # bird -> bird
    [0.5, 0.4, 0.3, 0.0],  # bird -> cat (bird 3rd)
]
LABELS = [0, 0, 1, 1, 2, 2]

"""Hand-set models for the evaluation tests: encoders whose outputs are chosen by the test, so the
right accuracy, confusion matrix and recalls are known in advance."""

from __future__ import annotations

import math

import torch
from torch import nn

from clipforge.data.tokenizer import Tokenizer
from clipforge.models.clip import CLIP

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
        self.max_logit_scale = 100.0
        self.embed_dim = dim
        self.text = _Text(tokenizer.context_length)
        self.visual = nn.Module()
        self.visual.img_size = IMAGE_SIZE

    scale_and_bias = CLIP.scale_and_bias  # the real computation, on this double's parameters

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


def distributed_case(seed: int = 0) -> dict:
    """A 23-sample labelled set with captions (odd size, so the two shards differ in length); images 3 and 20
    are the same picture."""
    from clipforge.data.tokenizer import Tokenizer

    g = torch.Generator().manual_seed(seed)
    n = 23
    labels = torch.randint(0, 3, (n,), generator=g)
    feats = torch.zeros(n, 4)
    feats[torch.arange(n), labels] = 1.0
    feats += 0.7 * torch.randn(n, 4, generator=g)  # noisy enough for errors in every metric
    feats[20] = feats[3]  # one image twice, once in each rank's shard, as COCO repeats an image per caption
    words = ["cat", "dog", "bird"]
    captions = [words[int(y)] if i % 3 else f"a photo of a {words[int(y)]}" for i, y in enumerate(labels)]
    tokens = Tokenizer(CONTEXT_LENGTH)(captions)
    return {"images": images_from_features(feats.tolist()), "labels": labels, "tokens": tokens}


def run_all_evaluations(model: nn.Module, tokenizer, batch_size: int = 4) -> dict:
    """Classifier, zero-shot, retrieval and linear probe on ``distributed_case``, sharded when distributed."""
    from torch.utils.data import DataLoader, TensorDataset

    from clipforge.eval.distributed import shard_dataloader
    from clipforge.eval.linear_probe import linear_probe
    from clipforge.eval.retrieval import evaluate_retrieval
    from clipforge.eval.zeroshot import build_zero_shot_classifier, evaluate_zero_shot

    data = distributed_case()
    cls_loader = shard_dataloader(
        DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=batch_size)
    )
    pair_loader = shard_dataloader(
        DataLoader(TensorDataset(data["images"], data["tokens"]), batch_size=batch_size)
    )
    templates = ["{}", "a photo of a {}."]
    w = build_zero_shot_classifier(model, tokenizer, ["cat", "dog", "bird"], templates, distributed=True)
    zs = evaluate_zero_shot(model, w, cls_loader, top_k=(1, 2))
    ret = evaluate_retrieval(model, pair_loader, ks=(1, 2, 5))
    lp = linear_probe(model, cls_loader, cls_loader, C=1.0)
    # a stream every rank reads in full (like WebDataset eval shards) is strided by batch
    stream = shard_dataloader(
        DataLoader(_BatchStream(data["images"], data["tokens"], batch_size), batch_size=None)
    )
    ret_stream = evaluate_retrieval(model, stream, ks=(1, 2, 5))
    return {
        "classifier": w,
        "zeroshot": zs,
        "retrieval": ret,
        "linear_probe": lp,
        "retrieval_stream": ret_stream,
    }


class _BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, images: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> None:
        self.images, self.tokens, self.batch_size = images, tokens, batch_size

    def __iter__(self):
        for i in range(0, len(self.images), self.batch_size):
            yield self.images[i : i + self.batch_size], self.tokens[i : i + self.batch_size]


def distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from clipforge.data.tokenizer import Tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer = Tokenizer(CONTEXT_LENGTH)
        words = {"cat": [1, 0, 0, 0], "dog": [0, 1, 0, 0], "bird": [0, 0, 1, 0], "photo": [0, 0, 0, 1]}
        model = HandSetModel(words, dim=4, tokenizer=tokenizer)
        torch.save(run_all_evaluations(model, tokenizer), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class ColorModel(HandSetModel):
    """Reads the mean of each normalised colour channel as the image feature (dims 0-2), so that the
    zero-shot answer for a flat-coloured picture is known: it is the channel furthest above CLIP's mean.
    Text: "red", "green", "blue" point along dims 0, 1, 2."""

    def __init__(self, tokenizer, img_size: int = 16) -> None:
        words = {"red": [1, 0, 0, 0], "green": [0, 1, 0, 0], "blue": [0, 0, 1, 0], "photo": [0, 0, 0, 1]}
        super().__init__(words, dim=4, tokenizer=tokenizer)
        self.visual.img_size = img_size

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = torch.cat([images.mean(dim=(2, 3)), images.new_zeros(images.shape[0], 1)], dim=1) * self.gain
        return nn.functional.normalize(x, dim=-1) if normalize else x

"""LocCa's decoder: attention paths agree, causality, boxes as tokens, the three task sequences, greedy
decoding; and the two image-tower hooks the SigLIP 2 objectives use (mask token, local-crop grid)."""

from __future__ import annotations

import pytest
import torch
from modelhelpers import perturb_, small_vit, tokens

from clipforge.models.decoder import TextDecoder, bpe_words, dequantize_box, quantize_box

VOCAB = 100  # BPE ids 0..99, EOT = 99


def small_decoder(**overrides) -> TextDecoder:
    kwargs = dict(vocab_size=VOCAB, context_length=12, image_dim=32, embed_dim=32, depth=2, num_heads=4)
    kwargs.update(num_box_bins=16)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return perturb_(TextDecoder(**kwargs)).eval()


def set_fused(module: torch.nn.Module, fused: bool) -> None:
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = fused


def test_vocabulary_layout() -> None:
    dec = small_decoder()
    assert dec.task_token == {"caption": 100, "ref": 101, "grounded": 102}
    assert dec.loc_offset == 103 and dec.vocab_size == 103 + 16
    assert dec.eot_token_id == 99 and dec.max_len == 12 + 5
    assert dec.head.out_features == dec.token_embedding.num_embeddings == dec.vocab_size


def test_fused_and_math_attention_agree_and_decoding_is_causal() -> None:
    dec = small_decoder()
    img = torch.randn(2, 17, 32)
    seq = torch.randint(0, dec.vocab_size, (2, 9))
    with torch.no_grad():
        fused = dec(seq, img)
        set_fused(dec, False)
        math_path = dec(seq, img)
        assert (fused - math_path).abs().max() < 1e-5 and fused.abs().max() > 1e-2
        later = seq.clone()
        later[:, 5:] = (later[:, 5:] + 1) % dec.vocab_size
        changed = dec(later, img)
        other_image = dec(seq, img + torch.randn_like(img))
    assert torch.equal(changed[:, :5], math_path[:, :5])  # a position never sees later tokens
    assert not torch.allclose(changed[:, 5:], math_path[:, 5:])
    assert (other_image - math_path).abs().amax(dim=-1).min() > 1e-4  # every position reads the image
    dec.blocks[0].cross_attn.keep_attn = True
    with torch.no_grad():
        dec(seq, img)
    attn = dec.blocks[0].cross_attn.last_attn
    assert attn.shape == (2, 4, 9, 17) and torch.allclose(attn.sum(-1), torch.ones(2, 4, 9))


def test_box_quantisation_round_trip_and_edges() -> None:
    n = 16
    boxes = torch.rand(100, 4)
    bins = quantize_box(boxes, n)
    assert bins.min() >= 0 and bins.max() < n
    assert (dequantize_box(bins, n) - boxes).abs().max() <= 0.5 / n + 1e-7
    edges = torch.tensor([[0.0, 1.0, 1.5, -0.2]])
    assert quantize_box(edges, n).tolist() == [[0, n - 1, n - 1, 0]]
    dec = small_decoder()
    ids = dec.box_to_tokens(torch.tensor([0.1, 0.2, 0.6, 0.9]))
    assert ids.tolist() == [103 + 1, 103 + 3, 103 + 9, 103 + 14]
    assert torch.allclose(dec.tokens_to_box(ids), torch.tensor([1.5, 3.5, 9.5, 14.5]) / 16)


def test_task_sequences_put_the_loss_on_the_answer_only() -> None:
    dec = small_decoder()
    batch = tokens(3, 10, vocab=VOCAB)  # x w ... EOT 0 ..., x in the place of the tokenizer's SOT
    caps = bpe_words(batch)
    ends = batch.argmax(-1).tolist()
    assert caps[0] == batch[0, 1 : ends[0]].tolist()
    assert bpe_words(torch.zeros(1, 5, dtype=torch.long)) == [[]]
    regions = [[7, 8], [9], [10, 11, 12]]
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.75, 1.0], [0.1, 0.1, 0.2, 0.2]])
    seq, target = dec.sequences(["caption", "ref", "grounded"], caps, regions, boxes)
    cap = [100, *caps[0], 99]
    assert seq[0, : len(cap)].tolist() == cap
    assert target[0].nonzero().flatten().tolist() == list(range(1, len(cap)))  # every word and EOT
    ref = [101, 9, *dec.box_to_tokens(boxes[1]).tolist(), 99]
    assert seq[1, : len(ref)].tolist() == ref
    assert target[1].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]  # the 4 box tokens and EOT
    grounded = [102, *dec.box_to_tokens(boxes[2]).tolist(), 10, 11, 12, 99]
    assert seq[2, : len(grounded)].tolist() == grounded
    assert target[2].nonzero().flatten().tolist() == [5, 6, 7, 8]  # the region text and EOT
    assert (seq[~target.any(-1, keepdim=True).expand_as(seq)] == 0).all()
    with pytest.raises(ValueError, match="unknown task"):
        dec.prompt("vqa")


def test_greedy_generation_respects_the_allowed_tokens_and_stops() -> None:
    dec = small_decoder()
    img = torch.randn(2, 17, 32)
    prompt = torch.tensor([[101, 5, 6], [101, 7, 7]])
    out = dec.generate(img, prompt, max_new_tokens=4, allowed=dec.box_mask())
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt)
    assert (out[:, 3:] >= dec.loc_offset).all()
    # greedy = argmax of the full forward at each step
    with torch.no_grad():
        first = dec(prompt, img)[:, -1].masked_fill(~dec.box_mask(), float("-inf")).argmax(-1)
    assert torch.equal(out[:, 3], first)
    # stop: force EOT to be the best allowed token after the first step
    allowed = dec.text_mask(exclude=(0,))
    capped = dec.generate(img, prompt[:, :1], max_new_tokens=30, allowed=allowed, stop_token=99)
    assert capped.shape[1] <= dec.max_len
    assert (capped[:, 1:] < VOCAB).all()
    for row in capped.tolist():
        if 99 in row:
            assert all(t == 0 for t in row[row.index(99) + 1 :])


def test_mask_token_replaces_masked_patches_before_positions() -> None:
    torch.manual_seed(0)
    vit = perturb_(small_vit()).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, vit.num_patches, dtype=torch.bool)
    mask[0, [0, 5]] = True
    token = torch.randn(vit.embed_dim)
    with torch.no_grad():
        plain, masked = vit.embed(x), vit.embed(x, mask, token)
    pos = vit.pos_embed[0, 1:]
    assert torch.allclose(masked[0, 1 + 0], token + pos[0])
    assert torch.allclose(masked[0, 1 + 5], token + pos[5])
    keep = torch.ones_like(plain, dtype=torch.bool)
    keep[0, [1, 6]] = False
    assert torch.equal(masked[keep], plain[keep])
    vit.patch_dropout = 0.5
    vit.train()
    assert vit.encode(vit.embed(x, mask, token), masked=True).shape == (2, 1 + vit.num_patches, vit.embed_dim)


def test_smaller_crops_take_a_resampled_position_grid_only_on_request() -> None:
    vit = small_vit().eval()
    crop = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="expected 32x32"):
        vit(crop)
    with torch.no_grad():
        feats = vit.forward_features(crop, interpolate_pos=True)
        full = vit.forward_features(torch.randn(2, 3, 32, 32), interpolate_pos=True)
    assert feats.shape == (2, 1 + 4, vit.embed_dim) and full.shape == (2, 1 + 16, vit.embed_dim)
    with pytest.raises(ValueError, match="expected 32x32"):
        vit.forward_features(torch.randn(1, 3, 20, 20), interpolate_pos=True)  # not a multiple of 8


def _causal_reference(dec: TextDecoder, seq: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """The decoder's forward as it was before parallel prediction, written out block by block."""
    ctx = dec.image_proj(dec.image_norm(img))
    x = dec.token_embedding(seq) + dec.pos_embed[:, : seq.shape[1]]
    for b in dec.blocks:
        x = x + b.attn(b.norm1(x), is_causal=True)
        x = x + b.cross_attn(b.norm2(x), ctx)
        x = x + b.mlp(b.norm3(x))
    return dec.head(dec.norm(x))


def test_parallel_prob_zero_adds_no_parameter_and_keeps_the_outputs() -> None:
    kwargs = dict(vocab_size=VOCAB, context_length=12, image_dim=32, embed_dim=32, depth=2, num_heads=4)
    torch.manual_seed(0)
    plain = TextDecoder(**kwargs)
    torch.manual_seed(0)
    cappa = TextDecoder(**kwargs, parallel_prob=0.5)
    assert plain.mask_token is None and "mask_token" not in plain.state_dict()
    extra = set(cappa.state_dict()) - set(plain.state_dict())
    assert extra == {"mask_token"} and "mask_token" in cappa.no_weight_decay()
    for k, v in plain.state_dict().items():  # the mask token is drawn last: the rest is unchanged
        assert torch.equal(v, cappa.state_dict()[k]), k
    img, seq = torch.randn(2, 17, 32), torch.randint(0, plain.vocab_size, (2, 9))
    with torch.no_grad():
        ref = _causal_reference(plain, seq, img)
        assert torch.equal(plain(seq, img), ref) and torch.equal(cappa(seq, img), ref)
    with pytest.raises(ValueError, match=r"decoder\.parallel_prob > 0"):
        plain.forward_features(seq, img, torch.ones_like(seq, dtype=torch.bool))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True])
def test_parallel_prob_outside_0_1_is_an_error_naming_the_key(bad: float) -> None:
    with pytest.raises(ValueError, match=r"decoder\.parallel_prob must be a probability in \[0, 1\]"):
        small_decoder(parallel_prob=bad)


def test_parallel_rows_read_mask_tokens_with_bidirectional_attention() -> None:
    dec = small_decoder(parallel_prob=1.0)
    img = torch.randn(2, 17, 32)
    seq = torch.randint(1, VOCAB, (2, 9))
    is_target = torch.zeros(2, 10, dtype=torch.bool)
    is_target[:, 3:] = True  # a prompt of 3 tokens, then the answer; row 1 stays autoregressive
    masked = dec.parallel_inputs(is_target, torch.tensor([True, False]))
    assert masked.tolist() == [[False] * 3 + [True] * 6, [False] * 9]
    with torch.no_grad():
        out = dec.forward_features(seq, img, masked)
        set_fused(dec, False)
        assert (dec.forward_features(seq, img, masked) - out).abs().max() < 1e-5  # the math path agrees
        set_fused(dec, True)
        later = seq.clone()
        later[:, 5] = (later[:, 5] + 1) % VOCAB  # an answer token that the parallel row masks
        changed = dec.forward_features(later, img, masked)
        # row 1 is the causal decoder: its prefix ignores the change, the rest reads it
        causal = dec.forward_features(seq, img)
        assert (out[1] - causal[1]).abs().max() < 1e-5
        assert torch.equal(out[0], changed[0])  # the parallel row's inputs are masks: nothing changes
        assert torch.equal(out[1, :5], changed[1, :5]) and not torch.allclose(out[1, 5:], changed[1, 5:])
        # bidirectional: the last mask differs from the others only by its position embedding; moving it
        # moves every earlier output of the parallel row, and none of the causal one
        dec.pos_embed[0, 8] += torch.randn(32)  # not a constant: the LayerNorms would erase that
        moved = dec.forward_features(seq, img, masked)
        moved_causal = dec.forward_features(seq, img)
    assert (moved[0, :8] - out[0, :8]).abs().amax(dim=-1).min() > 1e-4
    assert torch.equal(moved_causal[:, :8], causal[:, :8])
    loss = dec.head(dec.forward_features(seq, img, masked)[0]).logsumexp(-1).sum()
    loss.backward()
    assert dec.mask_token.grad is not None and dec.mask_token.grad.abs().max() > 0


def test_grad_checkpointing_recomputes_the_decoder_blocks_and_keeps_the_gradients(monkeypatch) -> None:
    # grad_checkpointing=true checkpointed the towers only: LocCa's decoder kept every block's activations
    from clipforge.models.decoder import DecoderBlock

    calls = []
    forward = DecoderBlock.forward
    monkeypatch.setattr(DecoderBlock, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    grads = []
    for on in (False, True):
        dec = small_decoder().train()
        dec.set_grad_checkpointing(on)
        calls.clear()
        img = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
        seq = torch.randint(0, dec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
        dec(seq, img).square().mean().backward()
        grads.append(({n: p.grad for n, p in dec.named_parameters()}, len(calls)))
    (plain, plain_calls), (ckpt, ckpt_calls) = grads
    assert (plain_calls, ckpt_calls) == (2, 4)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=0, atol=1e-6, msg=name)

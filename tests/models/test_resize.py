"""Loading weights at another image size (position grid resampled) or a shorter text context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from modelhelpers import perturb_, small_text, small_vit, tokens

from clipforge.models import CLIP
from clipforge.models.convert import fit_state_dict, load_state_dict_resized
from clipforge.models.vision import resample_pos_embed


def test_resampling_follows_the_2d_grid() -> None:
    # Channel 0 of the position field is the row index, channel 1 the column index. After resampling,
    # channel 0 must still vary along rows only (a flattening or transposition bug mixes them) and
    # track the row coordinate of the new grid: with align_corners=False new index i sits at old
    # coordinate (i + 0.5) * 8/16 - 0.5. PyTorch's bicubic kernel (a = -0.75) is not exactly linear,
    # hence the loose tolerance.
    g, new = 8, 16
    rows, cols = torch.meshgrid(
        torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij"
    )
    pos = torch.stack([rows, cols], dim=-1).reshape(1, g * g, 2)
    pos = torch.cat([torch.full((1, 1, 2), 7.0), pos], dim=1)  # a CLS slot
    out = resample_pos_embed(pos, new, num_prefix_tokens=1)
    assert out.shape == (1, 1 + new * new, 2) and torch.equal(out[:, 0], pos[:, 0])
    grid = out[0, 1:].reshape(new, new, 2)
    assert torch.allclose(grid[..., 0], grid[:, :1, 0].expand(-1, new), atol=1e-5)  # rows only
    assert torch.allclose(grid[..., 1], grid[:1, :, 1].expand(new, -1), atol=1e-5)  # columns only
    assert (grid[1:, 0, 0] > grid[:-1, 0, 0]).all() and (grid[0, 1:, 1] > grid[0, :-1, 1]).all()
    coord = (torch.arange(new) + 0.5) * g / new - 0.5
    inner = slice(4, new - 4)  # two old samples away from the border
    assert (grid[inner, 0, 0] - coord[inner]).abs().max() < 0.1
    assert torch.equal(resample_pos_embed(pos, g, 1), pos)  # same grid: untouched


@pytest.mark.parametrize("new_grid", [3, 5, 12])
@pytest.mark.parametrize("prefix", [0, 1])
def test_resampling_matches_timm_and_open_clip(new_grid: int, prefix: int) -> None:
    # both resample with antialias=True, which in PyTorch is another bicubic kernel even when upsampling:
    # without it the table was up to 60% of its scale away from theirs (downsampling 7 -> 3)
    from open_clip.model import resize_pos_embed
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, prefix + 7 * 7, 6, generator=torch.Generator().manual_seed(0))
    ours = resample_pos_embed(pos, new_grid, num_prefix_tokens=prefix)
    timm_pos = resample_abs_pos_embed(pos, (new_grid, new_grid), num_prefix_tokens=prefix)
    torch.testing.assert_close(ours, timm_pos, rtol=0, atol=1e-5)
    if prefix == 1:  # open_clip's loader assumes one class token
        state = {"visual.positional_embedding": pos[0]}
        resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=new_grid)))
        torch.testing.assert_close(ours[0], state["visual.positional_embedding"], rtol=0, atol=1e-5)


def test_load_weights_into_a_larger_image_tower() -> None:
    torch.manual_seed(0)
    small = perturb_(CLIP(small_vit(img_size=32), small_text())).eval()
    big = CLIP(small_vit(img_size=64), small_text()).eval()  # 4x4 -> 8x8 patches of 8 px
    load_state_dict_resized(big, small.state_dict())
    assert big.visual.pos_embed.shape == (1, 1 + 64, 32)
    for name, p in big.named_parameters():
        if name != "visual.pos_embed":
            assert torch.equal(p, small.state_dict()[name]), name
    with torch.no_grad():
        assert big.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 16)
    with pytest.raises(RuntimeError, match="pos_embed"):  # the plain loader refuses: shapes differ
        CLIP(small_vit(img_size=64), small_text()).load_state_dict(small.state_dict())


def test_shorter_text_context_truncates_positions() -> None:
    torch.manual_seed(0)
    long = perturb_(small_text(context_length=12)).eval()
    short = small_text(context_length=8).eval()
    load_state_dict_resized(short, long.state_dict())
    t = tokens(2, 8)
    with torch.no_grad():  # a causal tower's first 8 positions do not depend on later ones
        assert torch.allclose(short.forward_features(t), long.forward_features(t), atol=1e-6)
    with pytest.raises(ValueError, match="lengthened"):
        fit_state_dict(short.state_dict(), long)

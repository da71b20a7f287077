"""The EMA of the weights: the update is the hand-computed average, with its cadence and warm start; the
copy is never trained and travels in the state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipforge.ema import ModelEMA, as_teacher


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2).double()
        self.register_buffer("centre", torch.zeros(2, dtype=torch.float64))
        self.drop = nn.Dropout(0.5)


def _perturb(net: Net, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        net.centre.add_(1.0)


def test_update_is_the_hand_computed_average_with_cadence_and_warm_start() -> None:
    torch.manual_seed(0)
    net, g = Net(), torch.Generator().manual_seed(1)
    decay, every, total, start = 0.9, 2, 10, 0.3
    ema = ModelEMA({"net": net}, decay=decay, every_n_steps=every, start_frac=start)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(total):
        _perturb(net, g)
        changed = ema.update({"net": net}, total_steps=total)
        assert changed == ((step + 1) % every == 0)
        if changed:
            d = 0.0 if step < start * total else decay  # before 30% of training: a copy
            for name, p in net.named_parameters():
                expected[name] = d * expected[name] + (1 - d) * p.detach()
            expected["centre"] = net.centre.clone()  # buffers are copied
        got = ema["net"].state_dict()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-15, atol=0)
    assert int(ema.steps) == total
    # the average really differs from the last weights (decay > 0 was applied after the warm start)
    assert not torch.equal(ema["net"].fc.weight, net.fc.weight)


def test_copy_is_never_trained_runs_as_teacher_in_eval_and_round_trips_the_state_dict() -> None:
    net = Net()
    holder = nn.Module()
    holder.ema = ModelEMA({"net": net}, decay=0.5)
    holder.train()
    assert not any(p.requires_grad for p in holder.ema.parameters())
    assert all(p.requires_grad for p in net.parameters())
    teacher = holder.ema["net"]
    x = torch.ones(4, 2, dtype=torch.float64)
    with as_teacher(teacher) as t:
        assert not t.training and not t.drop.training and not torch.is_grad_enabled()
        assert torch.equal(t.drop(x), x)  # no dropout in the teacher
    assert teacher.training and teacher.drop.training and torch.is_grad_enabled()  # modes restored
    holder.ema.update({"net": net})
    state = holder.state_dict()
    assert {"ema.steps", "ema.shadow.net.fc.weight", "ema.shadow.net.centre"} <= state.keys()
    other = nn.Module()
    other.ema = ModelEMA({"net": Net()}, decay=0.5)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values(), strict=True))


def test_bad_settings_fail() -> None:
    # named by their keys ("ema decay" was no key a user could type)
    with pytest.raises(ValueError, match=r"ema\.decay must be in \[0, 1\)"):
        ModelEMA({"n": Net()}, decay=1.0)
    with pytest.raises(ValueError, match=r"ema\.every_n_steps"):
        ModelEMA({"n": Net()}, every_n_steps=0)
    ema = ModelEMA({"n": Net()})
    with pytest.raises(KeyError, match="tracks"):
        ema.update({"m": Net()})

"""EMAModel against the closed form, the plain loop, buffer modes, warm-up and state round trips."""

import pytest
import torch
from torch import nn

from lightning_modules.core.ema import EMAModel


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_matches_closed_form_of_a_known_parameter_sequence():
    net = _net()
    ema = EMAModel(net, decay=0.8)
    p0 = [p.detach().clone() for p in net.parameters()]
    values = [p0]
    for t in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * t)
        values.append([p.detach().clone() for p in net.parameters()])
        ema.update(net)
    # ema_T = d^T * w_0 + sum_t (1 - d) d^(T - t) w_t
    d, T = 0.8, 5
    for i, e in enumerate(ema.module.parameters()):
        expected = d**T * values[0][i] + sum((1 - d) * d ** (T - t) * values[t][i] for t in range(1, T + 1))
        torch.testing.assert_close(e, expected)


def test_foreach_path_equals_a_plain_loop():
    net = _net()
    ema = EMAModel(net, decay=0.9)
    reference = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.1).add_(0.01)
        ema.update(net)
        for r, p in zip(reference, net.parameters()):
            r.mul_(0.9).add_(0.1 * p.detach())
    for e, r in zip(ema.module.parameters(), reference):
        torch.testing.assert_close(e, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["copy", "average"])
def test_buffers_copied_or_averaged(mode):
    net = _net()
    ema = EMAModel(net, decay=0.5, buffers=mode)
    net.train()(torch.randn(8, 1, 8, 8))  # moves BatchNorm running statistics
    ema.update(net)
    bn, ema_bn = net[1], ema.module[1]
    expected = bn.running_mean if mode == "copy" else 0.5 * torch.zeros(4) + 0.5 * bn.running_mean
    torch.testing.assert_close(ema_bn.running_mean, expected)
    assert ema_bn.num_batches_tracked == bn.num_batches_tracked  # integer buffers are always copied


def test_warmup_and_state_round_trip():
    net = _net()
    ema = EMAModel(net, decay=0.999, warmup_power=1.0)
    assert ema.current_decay() == 0.0  # 1 - (1 + 0)^-1
    ema.update(net)
    assert ema.current_decay() == pytest.approx(0.5)
    copy = EMAModel(net, decay=0.999, warmup_power=1.0)
    copy.load_state_dict(ema.state_dict())
    assert copy.num_updates == 1 and copy.current_decay() == ema.current_decay()
    with pytest.raises(ValueError, match="decay"):
        EMAModel(net, decay=1.5)


def test_averaged_copy_never_requires_grad():
    ema = EMAModel(_net())
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training

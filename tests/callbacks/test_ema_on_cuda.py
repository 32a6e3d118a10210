"""An EMA copy kept on the CPU while the model trains on CUDA (``EMAModel(device="cpu")``,
``EMA(device="cpu")``): every update must take in the weights of that step. CUDA only; they skip
without it. The two-process broadcast of such a copy is in test_distributed_averages.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import EMA, EMAModel
from datamodules import DigitsSSL
from lightning_modules import Supervised
from tests.ssl_helpers import WeightTrajectory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_cpu_copy_of_a_cuda_model_averages_the_weights_each_step_left():
    """The new weights are written by kernels queued behind slow GPU work, so a copy to the CPU that
    does not wait for them (a non-blocking copy into pinned memory, read at once by the CPU lerp)
    averages in stale or unwritten values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 1024), nn.BatchNorm1d(1024)).cuda()
    ema = EMAModel(net, decay=0.5, device="cpu")
    assert next(ema.module.parameters()).device.type == "cpu"
    expected = [p.detach().cpu().clone() for p in net.parameters()]
    busy = torch.randn(4096, 4096, device="cuda")
    for step in range(1, 6):
        with torch.no_grad():
            for _ in range(20):
                busy = torch.tanh(busy @ busy)
            for p in net.parameters():
                p.fill_(float(step))
            net[1].running_mean.fill_(float(step))
        ema.update(net)
        expected = [0.5 * e + 0.5 * step for e in expected]
        for e, x in zip(ema.module.parameters(), expected):
            torch.testing.assert_close(e, x)
        torch.testing.assert_close(ema.module[1].running_mean, torch.full((1024,), float(step)))


def _model() -> Supervised:
    L.seed_everything(0, verbose=False)
    return Supervised(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1},
                      ema_decay=None)


def _tensors(module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*module.parameters(), *module.buffers())]


def _gpu_trainer(callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="gpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)


def test_cpu_copy_of_a_model_trained_on_cuda_equals_an_emamodel_updated_by_hand():
    model, record = _model(), WeightTrajectory()
    data = DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=4)
    ema = EMA(decay=0.9, warmup_power=0.75, device="cpu")
    _gpu_trainer([record, ema], max_steps=5, limit_val_batches=0).fit(model, datamodule=data)
    assert ema.ema.num_updates == 5 and next(ema.ema.module.parameters()).device.type == "cpu"
    replay = _model()
    replay.load_state_dict({k: v.cpu() for k, v in record.states[0].items()})
    by_hand = EMAModel(replay, decay=0.9, warmup_power=0.75)
    for state in record.states[1:]:
        replay.load_state_dict({k: v.cpu() for k, v in state.items()})
        by_hand.update(replay)
    for got, want in zip(_tensors(ema.ema.module), _tensors(by_hand.module)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    # evaluation swaps the CPU copy into the CUDA module, and the raw weights back afterwards
    raw = _tensors(model)
    logged = _gpu_trainer([ema]).validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    by_hand.module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in map(lambda b: data.on_after_batch_transfer(b, 0), data.val_dataloader()):
            total += float(F.cross_entropy(by_hand.module(batch["image"]), batch["target"], reduction="sum"))
            count += len(batch["target"])
    assert logged == pytest.approx(total / count, rel=1e-2)   # computed on the CPU; CUDA convolutions may use TF32
    for a, b in zip(_tensors(model), raw):
        assert torch.equal(a, b)

"""SWA on a real Trainer over digits: the mean of its snapshots, window counts, SWALR, BatchNorm, state."""

import lightning as L
import pytest
import torch

from callbacks import SWA, recompute_batch_norm
from datamodules import DigitsSSL
from lightning_modules import Supervised


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kwargs) -> Supervised:
    return Supervised(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1},
                      ema_decay=None, **kwargs)


def _trainer(callbacks, max_epochs=2, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     limit_val_batches=0, **kwargs)


def _data(steps=6) -> DigitsSSL:
    return DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=steps)


class Recorder(L.Callback):
    """Records parameters (and the learning rate) by hand at the same points SWA snapshots."""

    def __init__(self, interval, start, every_n):
        self.interval, self.start, self.every_n = interval, start, every_n
        self.snapshots, self.counts, self.lrs = [], [], []

    def _take(self, pl_module, count):
        if count > self.start and (count - self.start) % self.every_n == 0:
            self.snapshots.append([p.detach().clone() for p in pl_module.parameters()])
            self.counts.append(count)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.interval == "step":
            self._take(pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.interval == "epoch":
            self._take(pl_module, trainer.current_epoch + 1)


@pytest.mark.parametrize("interval,start,every_n,epochs,expected", [
    ("step", 3, 2, 2, 2),        # 8 steps: snapshots after steps 5 and 7
    ("step", 0.5, 1, 2, 4),      # the window opens after step 4: 5..8
    ("epoch", 1, 1, 3, 2),       # after epochs 2 and 3
    ("epoch", 0.0, 2, 4, 2),     # after epochs 2 and 4
])
def test_final_weights_are_the_mean_of_the_snapshots(interval, start, every_n, epochs, expected):
    torch.manual_seed(0)
    swa = SWA(start=start, interval=interval, every_n=every_n, update_bn=False)
    steps = 4 if interval == "step" else 2
    total = steps * epochs if interval == "step" else epochs
    recorder = Recorder(interval, int(round(start * total)) if isinstance(start, float) else start, every_n)
    model = _model()
    # the recorder runs before SWA, so it sees the weights SWA averages
    _trainer([recorder, swa], max_epochs=epochs).fit(model, _data(steps))
    assert swa.n_averaged == len(recorder.snapshots) == expected
    assert swa.last_snapshot == recorder.counts[-1]
    for i, p in enumerate(model.parameters()):
        mean = torch.stack([s[i] for s in recorder.snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), mean, rtol=1e-5, atol=1e-6)
    # the last training weights differ from the mean: averaging happened
    last = recorder.snapshots[-1]
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), last))


def test_swalr_switches_the_learning_rate_at_the_window_start():
    recorder = Recorder("step", 3, 1)
    swa = SWA(start=3, interval="step", swa_lrs=0.005, anneal_epochs=0, update_bn=False)
    _trainer([recorder, swa], max_epochs=2).fit(_model(lr=0.05), _data(3))
    before = [lr for step, lr in recorder.lrs if step < 3]
    after = [lr for step, lr in recorder.lrs if step >= 3]
    assert len(before) == 3 and len(after) == 3
    assert all(lr > 0.04 for lr in before)          # the module's cosine schedule from 0.05
    assert after == pytest.approx([0.005] * 3)


def test_swalr_anneals_epoch_wise():
    recorder = Recorder("epoch", 1, 1)
    swa = SWA(start=1, interval="epoch", swa_lrs=0.001, anneal_epochs=2, anneal_strategy="linear", update_bn=False)
    _trainer([recorder, swa], max_epochs=4).fit(_model(lr=0.05), _data(steps=1))
    per_epoch = [lr for step, lr in recorder.lrs]   # the lr at the first step of each epoch
    assert per_epoch[2] < per_epoch[1] and per_epoch[3] == pytest.approx(0.001)


class RngAtTrainEnd(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.rng = torch.get_rng_state()
        self.running = {k: v.clone() for k, v in pl_module.state_dict().items() if "running" in k}


def test_update_bn_sets_running_stats_to_the_recomputed_ones():
    torch.manual_seed(0)
    data = _data(3)
    rng = RngAtTrainEnd()   # runs just before SWA's end-of-fit pass
    model = _model()
    _trainer([rng, SWA(start=0.5, interval="step", update_bn=True)], max_epochs=2).fit(model, data)
    got = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    # recompute by hand from the same averaged weights and the same random stream of batches
    reference = _model()
    reference.load_state_dict(model.state_dict())
    params_before = [p.clone() for p in reference.parameters()]
    torch.set_rng_state(rng.rng)
    n = recompute_batch_norm(reference, (b for b, _, _ in data.train_dataloader()),
                             transform=lambda b: data.on_after_batch_transfer(b, 0))
    assert n == 3
    for p, q in zip(params_before, reference.parameters()):
        assert torch.equal(p, q)               # the pass changes statistics only
    ref = reference.state_dict()
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k])
        if not k.endswith("num_batches_tracked"):
            assert not torch.allclose(v, rng.running[k])   # different from the training-time statistics


def test_recompute_batch_norm_is_the_exact_mean_over_batches():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3, momentum=0.3))
    batches = [torch.randn(4, 1, 6, 6) * (i + 1) for i in range(3)]
    recompute_batch_norm(net, batches)
    feats = [net[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean.detach())
    assert net[1].momentum == 0.3 and net.training


def test_state_dict_round_trip_and_resume(tmp_path):
    swa = SWA(start=3, interval="step", update_bn=False, swa_lrs=0.01)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    model = _model()
    _trainer([swa, ckpt], max_epochs=1, enable_checkpointing=True).fit(model, _data(5))
    state = swa.state_dict()
    assert state["n_averaged"] == 2 and state["last_snapshot"] == 5 and state["swalr"]
    other = SWA(start=3, interval="step", update_bn=False, swa_lrs=0.01)
    other.load_state_dict(state)
    assert other.n_averaged == 2 and other.last_snapshot == 5
    for a, b in zip(other.average, swa.average):
        assert torch.equal(a, b)
    # resume from the checkpoint for one more epoch: 5 more snapshots join the same mean
    resumed = SWA(start=3, interval="step", update_bn=False, swa_lrs=0.01)
    recorder = Recorder("step", 3, 1)
    _trainer([recorder, resumed], max_epochs=2).fit(_model(), _data(5), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.n_averaged == 7
    assert all(lr == pytest.approx(0.01) for _, lr in recorder.lrs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="interval"):
        SWA(start=1, interval="batch")
    with pytest.raises(ValueError, match="fraction"):
        SWA(start=1.5)
    with pytest.raises(ValueError, match="swa_lrs"):
        SWA(start=1, swa_lrs=-1.0)
    with pytest.raises(ValueError, match="every_n"):
        SWA(start=1, every_n=0)

"""The BatchNorm pass after averaging (SWA's ``update_bn``, the soup's ``--update_bn``) re-estimates the
layers the forward updates, as ``torch.optim.swa_utils.update_bn`` does, and leaves every other layer's
statistics as they were: MutualLearning's peers, KDStudent's frozen teacher."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.swa_utils import update_bn

from callbacks import SWA, recompute_batch_norm
from lightning_modules.fusion import soup_from_checkpoints
from datamodules import DigitsSSL
from lightning_modules import KDStudent, MutualLearning, Supervised
from lightning_modules.distillation.teacher_loading import load_teacher
from tests.ssl_helpers import SMALL_NET, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _statistics(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if k.startswith(prefix) and ("running" in k or "num_batches_tracked" in k)}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_reestimated_like(net: nn.Module, reference: nn.Module) -> None:
    got, want = _statistics(net), _statistics(reference)
    assert got.keys() == want.keys() and got
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


# --- the pass itself, on a module with three kinds of BatchNorm ------------------------------------
class _ThreeKinds(nn.Module):
    """``net`` is forwarded in train mode, ``frozen`` in eval mode (a teacher), ``unused`` never."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.frozen = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        self.unused = nn.BatchNorm2d(4)

    def train(self, mode: bool = True) -> "_ThreeKinds":
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.frozen(x)
        return self.net(x)


def _digit_batches(n: int = 4, size: int = 32) -> list[torch.Tensor]:
    images = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return [images[i * size:(i + 1) * size] for i in range(n)]


def _trained_three_kinds() -> _ThreeKinds:
    torch.manual_seed(0)
    module = _ThreeKinds()
    module.frozen.train()
    module.unused.train()
    for batch in _digit_batches(6, 16)[2:]:  # every layer gets statistics of its own, not the initial 0 / 1
        module.frozen(batch + 1.0)
        module.unused(module.net(batch))
        module.net(batch * 2.0)
    return module.train()


def test_reached_layers_match_reference_update_bn_and_the_others_are_left_alone():
    module = _trained_three_kinds()
    frozen, unused = _statistics(module, "frozen."), _statistics(module, "unused.")
    batches = _digit_batches()
    reference = copy.deepcopy(module.net)
    update_bn(batches, reference)
    assert recompute_batch_norm(module, batches) == len(batches)
    _assert_reestimated_like(module.net, reference)
    _assert_equal(_statistics(module, "frozen."), frozen)
    _assert_equal(_statistics(module, "unused."), unused)
    assert all(bn.momentum == 0.1 for bn in module.modules() if isinstance(bn, nn.BatchNorm2d))


def test_a_pass_that_fails_leaves_every_statistic_as_it_was():
    module = _trained_three_kinds()
    before = _statistics(module)

    def batches():
        yield from _digit_batches(2)
        raise OSError("the loader broke")

    with pytest.raises(OSError, match="loader broke"):
        recompute_batch_norm(module, batches())
    _assert_equal(_statistics(module), before)
    assert all(bn.momentum == 0.1 for bn in module.modules() if isinstance(bn, nn.BatchNorm2d))


# --- SWA and the soup on the methods with BatchNorm outside ``net`` ---------------------------------
class _BeforeTheBNPass(L.Callback):
    """Listed before SWA, so its ``on_train_end`` runs just before SWA copies the mean in and runs the
    pass; it can also save a checkpoint there, whose statistics no BatchNorm pass has touched."""

    def __init__(self, checkpoint=None) -> None:
        self.checkpoint = checkpoint

    def on_train_end(self, trainer, pl_module) -> None:
        self.statistics = _statistics(pl_module)
        if self.checkpoint is not None:
            trainer.save_checkpoint(self.checkpoint)
        self.rng = torch.get_rng_state()


def _reference_net(module, data: DigitsSSL, rng: torch.Tensor, views: tuple[str, ...]) -> nn.Module:
    """``torch.optim.swa_utils.update_bn`` on a copy of ``module.net``, fed what SWA's pass forwards."""
    torch.set_rng_state(rng)
    images = []
    for raw, _, _ in data.train_dataloader():
        batch = data.on_after_batch_transfer(raw, 0)
        images.append(torch.cat([batch["labeled"]["image"], *(batch["unlabeled"][v] for v in views)]))
    reference = copy.deepcopy(module.net)
    update_bn(images, reference)
    return reference


def _fit_with_swa(model, root, steps: int = 3, checkpoint=None):
    data = DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=steps)
    before = _BeforeTheBNPass(checkpoint)
    trainer = make_trainer(max_epochs=2, accelerator="cpu", default_root_dir=root,
                           callbacks=[before, SWA(start=0.5, interval="step", update_bn=True)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    return trainer, data, before, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def mutual_learning(tmp_path_factory):
    torch.manual_seed(0)
    model = MutualLearning(distill_unlabeled=True, ema_decay=None, **SMALL_NET)
    root = tmp_path_factory.mktemp("mutual_learning")
    checkpoint = root / "trained.ckpt"   # the trained peers' statistics, saved before SWA's pass
    trainer, data, before, messages = _fit_with_swa(model, root, checkpoint=checkpoint)
    return model, data, before, messages, checkpoint


def test_swa_bn_pass_on_mutual_learning_matches_reference_update_bn_and_keeps_the_peers(mutual_learning):
    model, data, before, messages, _ = mutual_learning
    _assert_reestimated_like(model.net, _reference_net(model, data, before.rng, ("weak",)))
    peers = {k: v for k, v in before.statistics.items() if k.startswith("peers.")}
    _assert_equal(_statistics(model, "peers."), peers)
    # the peers were trained and averaged, but the forward does not run them: the pass says so
    assert any("peers.0." in m and "keep" in m for m in messages), messages


def test_soup_update_bn_keeps_the_statistics_of_layers_outside_the_forward(mutual_learning):
    model, data, _, _, checkpoint = mutual_learning
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.equal(stored["peers.0.bn.running_var"], torch.ones_like(stored["peers.0.bn.running_var"]))
    module, _, _ = soup_from_checkpoints([str(checkpoint)], data, update_bn=True, bn_batches=2,
                                         module_class=MutualLearning, select_on_test=True)
    _assert_equal(_statistics(module, "peers."), {k: v for k, v in stored.items() if k.startswith("peers.")
                                                  and ("running" in k or "num_batches_tracked" in k)})
    assert int(module.net.bn.num_batches_tracked) == 2   # the network itself was re-estimated


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    teacher = Supervised(**SMALL_NET, ema_decay=0.9, lr=0.1)
    root = tmp_path_factory.mktemp("teacher")
    trainer = make_trainer(max_steps=10, accelerator="cpu", default_root_dir=root)
    trainer.fit(teacher, DigitsSSL(num_labeled=None, batch_size=32, steps_per_epoch=10))
    trainer.save_checkpoint(root / "teacher.ckpt")
    return str(root / "teacher.ckpt")


def test_swa_bn_pass_on_kd_student_matches_reference_update_bn_and_keeps_the_teacher(teacher_checkpoint, tmp_path):
    torch.manual_seed(1)
    model = KDStudent(teacher=teacher_checkpoint, network="wrn10_1", num_classes=10, in_channels=1,
                      network_kwargs={"bn_momentum": 0.1}, image_size=8, ema_decay=None)
    trainer, data, before, messages = _fit_with_swa(model, tmp_path)
    _assert_reestimated_like(model.net, _reference_net(model, data, before.rng, ()))
    teacher = load_teacher(teacher_checkpoint, num_classes=10, in_channels=1)
    _assert_equal(_statistics(model.teacher), _statistics(teacher))
    assert not any("teacher." in m for m in messages)   # frozen in eval mode: nothing to warn about

    # test/teacher_acc is the teacher's own accuracy, not that of a teacher with wiped statistics
    logged = trainer.test(model, datamodule=data, verbose=False)[0]["test/teacher_acc"]
    correct = total = 0
    with torch.no_grad():
        for raw in data.test_dataloader():
            batch = data.on_after_batch_transfer(raw, 0)
            correct += int((teacher(batch["image"]).argmax(1) == batch["target"]).sum())
            total += len(batch["target"])
    assert logged == pytest.approx(correct / total, abs=1e-6)


def test_a_forward_that_runs_every_peer_reestimates_them_all_like_reference_update_bn(mutual_learning):
    model, data, _, _, _ = mutual_learning
    model = copy.deepcopy(model)
    batches = _digit_batches(3, 16)   # digits scaled to [0, 1], not normalized as in training: stats move
    references = [copy.deepcopy(peer) for peer in model.all_peers]
    for reference in references:
        update_bn(batches, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # every train-mode layer is run: nothing to warn about
        recompute_batch_norm(model, batches, forward=lambda m, x: [peer(torch.cat(x)) for peer in m.all_peers])
    for peer, reference in zip(model.all_peers, references):
        _assert_reestimated_like(peer, reference)

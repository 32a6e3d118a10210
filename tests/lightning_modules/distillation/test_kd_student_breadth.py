"""KDStudent with DKD, DIST and PKT: selected by name, trained through the real step, the warm-up, clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules import DigitsSSL
from lightning_modules import KDStudent
from lightning_modules.classification.networks import build_network
from lightning_modules.distillation.feature_hooks import FeatureHooks
from lightning_modules.distillation.logit_losses import dist_loss, dkd_loss
from lightning_modules.distillation.probabilistic_losses import pkt_loss
from tests.lightning_modules.distillation.test_kd_student import DIGITS, teacher_ckpt  # noqa: F401 (a fixture)
from tests.ssl_helpers import digits_batch, make_trainer


def student(teacher: str, **kwargs) -> KDStudent:
    torch.manual_seed(1)
    return KDStudent(teacher=teacher, network="wrn10_1", **{**DIGITS, **kwargs})


class GradientRecorder(L.Callback):
    """Before each optimizer step: which student and teacher parameters hold a non-zero gradient."""

    def __init__(self) -> None:
        self.student, self.teacher = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.student.append({n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in pl_module.net.named_parameters()})
        self.teacher.append([p.grad is not None for p in pl_module.teacher.parameters()])


# Each method alone (CE off), so every gradient the student gets comes from the new term.
ALONE = {
    "dkd": dict(logit_loss="dkd", ce_weight=0.0, kd_weight=1.0, kd_warmup_steps=2),
    "dist": dict(logit_loss="dist", ce_weight=0.0, kd_weight=2.0, distill_unlabeled=True),
    "pkt": dict(ce_weight=0.0, kd_weight=0.0, pkt_weight=30000.0),
    "vid": dict(ce_weight=0.0, kd_weight=0.0, vid_layers=[[f"groups.{k}", f"groups.{k}"] for k in range(3)]),
}
# the parameters after the distilled features get no gradient from the term: the head for PKT (on its
# input), the final BatchNorm and the head for VID (on the group outputs)
DOWNSTREAM = {"pkt": ("fc.",), "vid": ("bn.", "fc.")}


@pytest.mark.parametrize("method", sorted(ALONE))
def test_each_term_alone_trains_the_student_and_never_the_teacher(method, teacher_ckpt):  # noqa: F811
    model = student(teacher_ckpt, **ALONE[method])
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    heads_before = [p.detach().clone() for p in model.vid_heads.parameters()]
    recorder = GradientRecorder()
    trainer = make_trainer(max_steps=3, callbacks=[recorder])
    trainer.fit(model, DigitsSSL(num_labeled=100, batch_size=16, uratio=1, steps_per_epoch=3))
    assert len(recorder.student) == 3
    for student_grads, teacher_grads in zip(recorder.student, recorder.teacher):
        assert not any(teacher_grads)
        reached = {n: g for n, g in student_grads.items() if not n.startswith(DOWNSTREAM.get(method, ()))}
        assert all(reached.values()), [n for n, g in reached.items() if not g]
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())  # BN stats too
    assert all(not torch.equal(a, b) for a, b in zip(heads_before, model.vid_heads.parameters()))  # VID's regressors learn
    term = f"{method}_loss" if method in DOWNSTREAM else "kd_loss"
    assert torch.isfinite(trainer.callback_metrics[f"train/{term}"])


def test_the_named_losses_are_the_functions_on_the_step_batch(teacher_ckpt):  # noqa: F811
    base = student(teacher_ckpt)
    batch = digits_batch(base)
    images, targets = batch["labeled"]["image"], batch["labeled"]["target"]
    for options, expected in [
        (dict(logit_loss="dkd", logit_loss_kwargs={"beta": 6.0}, temperature=2.0),
         lambda s, t: dkd_loss(s, t, targets, 2.0, beta=6.0)),
        (dict(logit_loss="dist", logit_loss_kwargs={"gamma": 2.0}), lambda s, t: dist_loss(s, t, None, 4.0, gamma=2.0)),
    ]:
        model = student(teacher_ckpt, **options).eval()  # eval: deterministic BatchNorm, so the terms can be recomputed
        losses = model.compute_losses(batch)
        torch.testing.assert_close(losses["kd_loss"], expected(model.net(images), model.teacher(images)))
    model = student(teacher_ckpt, pkt_weight=1.0).eval()
    losses = model.compute_losses(batch)  # PKT on the relation layer, the heads' inputs by default
    with FeatureHooks(model.net, ["fc:input"]) as hooks:
        model.net(images)
        feature_s = hooks.pop()["fc:input"]
    with FeatureHooks(model.teacher, ["fc:input"]) as hooks:
        model.teacher(images)
        feature_t = hooks.pop()["fc:input"]
    torch.testing.assert_close(losses["pkt_loss"], pkt_loss(feature_s, feature_t))


def _logged_steps(log_dir: Path) -> list[dict[str, float]]:
    with open(log_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def test_kd_warmup_ramps_the_response_term_linearly_from_the_first_step(teacher_ckpt, tmp_path):  # noqa: F811
    # mdistiller DKD.py:72: min(epoch / warmup, 1) with epochs counted from 1; here per optimizer step k: min((k + 1) / 3, 1)
    model = student(teacher_ckpt, logit_loss="dkd", ce_weight=1.0, kd_weight=0.5, kd_warmup_steps=3)
    trainer = make_trainer(max_steps=5, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(model, DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=5))
    steps = _logged_steps(Path(trainer.log_dir))
    assert [int(s["step"]) for s in steps] == [0, 1, 2, 3, 4]
    for k, s in enumerate(steps):
        expected = s["train/labeled_loss"] + 0.5 * min((k + 1) / 3, 1.0) * s["train/kd_loss"]
        assert s["train/loss"] == pytest.approx(expected, rel=1e-5), k


def test_logit_loss_choices_are_checked_with_clear_errors(tmp_path):
    plain = tmp_path / "teacher.pt"
    torch.save(build_network("wrn10_1", num_classes=10, in_channels=1).state_dict(), plain)
    make = lambda **kw: KDStudent(teacher=str(plain), teacher_network="wrn10_1", **{**DIGITS, **kw})  # noqa: E731
    with pytest.raises(ValueError, match=r"logit_loss='dkt' is not one of \['dist', 'dkd', 'fnkd', 'kd'\]"):
        make(logit_loss="dkt")
    with pytest.raises(ValueError, match=r"\['gamma'\] are not options of logit_loss='dkd', which takes \['alpha', 'beta'\]"):
        make(logit_loss="dkd", logit_loss_kwargs={"alpha": 1.0, "gamma": 1.0})
    with pytest.raises(ValueError, match="not options of logit_loss='kd'.*set the temperature with temperature"):
        make(logit_loss_kwargs={"temperature": 2.0})
    with pytest.raises(ValueError, match="ground-truth class, which unlabeled images lack"):
        make(logit_loss="dkd", distill_unlabeled=True)
    with pytest.raises(ValueError, match="kd_warmup_steps must be >= 0"):
        make(kd_warmup_steps=-1)
    assert make(logit_loss="dist", logit_loss_kwargs={"beta": 2.0}, distill_unlabeled=True).hparams.logit_loss == "dist"

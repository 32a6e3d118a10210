"""KDStudent with CRD and ReviewKD: trained through the real step, gradients, memories committed once per step."""

from __future__ import annotations

import pytest
import torch

from datamodules import DigitsSSL
from tests.lightning_modules.distillation.test_kd_student import teacher_ckpt  # noqa: F401 (a fixture)
from tests.lightning_modules.distillation.test_kd_student_breadth import GradientRecorder, student
from tests.ssl_helpers import digits_batch, make_trainer

REVIEW_LEVELS = [[f"groups.{k}", f"groups.{k}"] for k in range(3)] + [["fc:input", "fc:input"]]
# each term alone (CE and KD off), so every gradient the student gets comes from it
ALONE = {
    "crd": dict(ce_weight=0.0, kd_weight=0.0, crd_weight=0.8, crd_kwargs={"nce_k": 256}),
    "reviewkd": dict(ce_weight=0.0, kd_weight=0.0, reviewkd_layers=REVIEW_LEVELS),
}


def data() -> DigitsSSL:
    return DigitsSSL(num_labeled=100, batch_size=16, uratio=1, steps_per_epoch=3)


@pytest.mark.parametrize("method", sorted(ALONE))
def test_each_term_alone_trains_the_student_and_its_heads_and_never_the_teacher(method, teacher_ckpt):  # noqa: F811
    model = student(teacher_ckpt, **ALONE[method])
    heads = model.crd if method == "crd" else model.review
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    heads_before = {n: p.detach().clone() for n, p in heads.named_parameters()}
    recorder = GradientRecorder()
    trainer = make_trainer(max_steps=3, callbacks=[recorder])
    trainer.fit(model, data())
    assert len(recorder.student) == 3
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in heads.parameters())  # the heads are trained parameters
    for student_grads, teacher_grads in zip(recorder.student, recorder.teacher):
        assert not any(teacher_grads)
        reached = {n: g for n, g in student_grads.items() if not n.startswith("fc.")}  # the head is downstream
        assert all(reached.values()), [n for n, g in reached.items() if not g]
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())  # BN stats too
    unchanged = [n for n, p in heads.named_parameters() if torch.equal(p, heads_before[n])]
    assert not unchanged, f"{method}: untrained head parameters {unchanged}"
    assert torch.isfinite(trainer.callback_metrics[f"train/{method}_loss"])
    assert {k for k in model.state_dict() if k.startswith(f"{'crd' if method == 'crd' else 'review'}.")}


def test_crd_memories_move_once_per_optimizer_step_for_the_batch_rows_only(teacher_ckpt):  # noqa: F811
    model = student(teacher_ckpt, crd_weight=0.8, crd_kwargs={"nce_k": 64, "num_samples": 1797}, distill_unlabeled=True)
    batch = digits_batch(model, num_labeled=100, batch_size=8, uratio=1)
    before = {k: v.clone() for k, v in model.crd.state_dict().items() if not k.startswith("embed")}
    model.compute_losses(batch)
    model.compute_losses(batch)  # two passes in one step (a second micro-batch, say)
    assert all(torch.equal(v, model.crd.state_dict()[k]) for k, v in before.items()), "the loss wrote its memory"
    with model.step_state.frozen():
        model.compute_losses(batch)  # FGM's/PGD's extra pass proposes nothing
    assert model.step_state.pending == 1
    model.step_state.commit()
    index = torch.cat([batch["labeled"]["index"], batch["unlabeled"]["index"]]).unique()
    others = torch.ones(1797, dtype=torch.bool)
    others[index] = False
    for name in ("memory_student", "memory_teacher"):
        memory = getattr(model.crd, name)
        assert torch.equal(memory[others], before[name][others])
        assert (memory[index] - before[name][index]).abs().sum(dim=1).min() > 0
        torch.testing.assert_close(memory[index].norm(dim=1), torch.ones(len(index)))  # rows are unit vectors
    assert (model.crd.normalizer > 0).all() and before["normalizer"].eq(-1).all()  # Z set once, from the first batch
    z = model.crd.normalizer.clone()
    model.compute_losses(batch)
    model.step_state.commit()
    assert torch.equal(model.crd.normalizer, z)


def test_crd_memory_is_sized_from_the_datamodule_and_checks_indices(teacher_ckpt):  # noqa: F811
    model = student(teacher_ckpt, crd_weight=0.8, crd_kwargs={"nce_k": 32})
    assert model.crd.num_samples == 0
    with pytest.raises(RuntimeError, match="num_samples"):
        model.compute_losses(digits_batch(model))
    make_trainer(max_steps=1).fit(model, data())
    dm = data()
    dm.setup("fit")
    assert model.crd.num_samples == dm.data_facts().num_indices
    small = student(teacher_ckpt, crd_weight=0.8, crd_kwargs={"nce_k": 32, "num_samples": 5})
    with pytest.raises(ValueError, match="num_samples must cover"):
        small.compute_losses(digits_batch(small))


def test_reviewkd_warmup_starts_at_zero_as_the_authors(teacher_ckpt):  # noqa: F811
    model = student(teacher_ckpt, ce_weight=1.0, kd_weight=0.0, reviewkd_layers=REVIEW_LEVELS, reviewkd_warmup_steps=4)
    losses = {"labeled_loss": torch.tensor(2.0), "kd_loss": torch.tensor(0.0), "reviewkd_loss": torch.tensor(3.0)}
    assert float(model.total_loss(losses)) == 2.0  # global step 0: min(1, epoch / 20) is 0 in epoch 0
    with pytest.raises(ValueError, match="layer pairs"):
        student(teacher_ckpt, reviewkd_layers=[["groups.0"]])

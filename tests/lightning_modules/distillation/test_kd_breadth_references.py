"""DKD, DIST, PKT and VID against torchdistill 1.1.5 where it has the method, else against the authors' code.

torchdistill 1.1.5 has ``DISTLoss``, ``PKTLoss`` and ``VIDLoss`` (``torchdistill/losses/mid_level.py``) but no DKD; DKD
is checked against mdistiller's ``dkd_loss`` (megvii-research/mdistiller ``mdistiller/distillers/DKD.py:8-51``)
written out in plain tensor arithmetic below, and against the paper's decomposition of Hinton KD
through torchdistill's ``KDLoss``. VID is also written out as RepDistiller's ``distiller_zoo/VID.py:38-54``
(pooling the larger map, the softplus variance), with our regressor's weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import DISTLoss, KDLoss, PKTLoss, VIDLoss

from lightning_modules.distillation.logit_losses import dist_loss, dkd_loss
from lightning_modules.distillation.probabilistic_losses import VIDRegressor, pkt_loss, vid_loss


def io(tensor: torch.Tensor, path: str = "x", kind: str = "output") -> dict[str, dict[str, torch.Tensor]]:
    return {path: {kind: tensor}}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours.double(), reference.double(), rtol=1e-5, atol=1e-7)


# ---- DKD ------------------------------------------------------------------------------------------


def _mdistiller_dkd(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float,
                    temperature: float) -> torch.Tensor:
    """mdistiller DKD.py:8-32 step by step: the target's probability and the rest's sum as a 2-class
    distribution (cat_mask, lines 47-51), KL summed and divided by N, times T^2; the non-target
    distribution by a softmax with the target's logit lowered by 1000 (lines 21-26)."""
    n = len(targets)
    gt = torch.zeros_like(student).scatter_(1, targets.unsqueeze(1), 1.0)
    p_s, p_t = (student / temperature).softmax(1), (teacher / temperature).softmax(1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * temperature**2 / n
    q_t = (teacher / temperature - 1000.0 * gt).softmax(1)
    log_q_s = (student / temperature - 1000.0 * gt).log_softmax(1)
    # F.kl_div(input, target) with a zero target contributes 0 (xlogy), as here through where
    nckd = torch.where(q_t > 0, q_t * (q_t.log() - log_q_s), torch.zeros_like(q_t)).sum() * temperature**2 / n
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 6.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference_mdistiller(alpha, beta, temperature):
    student, teacher = 3 * randn(16, 10, seed=1), 3 * randn(16, 10, seed=2)
    targets = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    ours = dkd_loss(student, teacher, targets, temperature, alpha, beta)
    close(ours, _mdistiller_dkd(student, teacher, targets, alpha, beta, temperature))


def test_dkd_matches_reference_mdistiller_on_confident_teachers():
    # A teacher almost sure of the target: 1 - p_y is tiny, where the logsumexp form must stay exact.
    teacher = randn(8, 5, seed=4)
    targets = torch.arange(8) % 5
    teacher[torch.arange(8), targets] += 25.0
    student = randn(8, 5, seed=5)
    close(dkd_loss(student, teacher, targets, 1.0), _mdistiller_dkd(student, teacher, targets, 1.0, 8.0, 1.0))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_reweighted_as_the_paper_is_hinton_kd_matches_reference_torchdistill(temperature):
    # Zhao et al. Eq. 1-3: KD = TCKD + (1 - p_y^t) NCKD, per sample. One sample at a time, DKD with
    # alpha 1 and beta = 1 - p_y^t must be torchdistill's KDLoss (bare KL) times T^2.
    student, teacher = 2 * randn(6, 7, seed=6), 2 * randn(6, 7, seed=7)
    targets = torch.tensor([0, 3, 6, 2, 2, 5])
    kd = KDLoss("s", "output", "t", "output", temperature=temperature, beta=1.0)
    for i in range(6):
        s, t, y = student[i : i + 1], teacher[i : i + 1], targets[i : i + 1]
        beta = 1 - (t / temperature).softmax(1)[0, y].item()
        close(dkd_loss(s, t, y, temperature, alpha=1.0, beta=beta), temperature**2 * kd(io(s, "s"), io(t, "t")))


def test_dkd_refuses_samples_without_a_class():
    student, teacher = randn(4, 3, seed=8), randn(4, 3, seed=9)
    with pytest.raises(ValueError, match=r"ground-truth class in \[0, 3\).*unlabeled samples \(-1\)"):
        dkd_loss(student, teacher, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="N class indices"):
        dkd_loss(student, teacher, torch.tensor([0, 1]))


# ---- DIST -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "beta", "gamma"), [(1.0, 1.0, 1.0), (4.0, 1.0, 1.0), (2.0, 0.5, 2.0)])
def test_dist_matches_reference_torchdistill(temperature, beta, gamma):
    student, teacher = 2 * randn(12, 10, seed=10), 2 * randn(12, 10, seed=11)
    reference = DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=temperature)
    close(dist_loss(student, teacher, None, temperature, beta, gamma), reference(io(student, "."), io(teacher, ".")))


def test_dist_matches_reference_authors_pearson_written_out():
    # hunto/image_classification_sota lib/models/losses/dist_kd.py:4-34, with the correlation spelled out per row.
    student, teacher, tau = randn(5, 4, seed=12), randn(5, 4, seed=13), 4.0
    y_s, y_t = (student / tau).softmax(1), (teacher / tau).softmax(1)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (a.norm() * b.norm() + 1e-8)

    inter = 1 - torch.stack([pearson(y_s[i], y_t[i]) for i in range(5)]).mean()
    intra = 1 - torch.stack([pearson(y_s[:, c], y_t[:, c]) for c in range(4)]).mean()
    close(dist_loss(student, teacher, None, tau), tau**2 * (inter + intra))


# ---- PKT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d_student", "d_teacher"), [(2, 3, 3), (8, 16, 64), (32, 5, 11)])
def test_pkt_matches_reference_torchdistill(n, d_student, d_teacher):
    # RepDistiller and torchdistill both carry the authors' cosine_similarity_loss (nn/pkt.py:88-113) unchanged.
    student, teacher = randn(n, d_student, seed=14), randn(n, d_teacher, seed=15)
    reference = PKTLoss("fc", "input", "fc", "input")(io(student, "fc", "input"), io(teacher, "fc", "input"))
    close(pkt_loss(student, teacher), reference)


def test_pkt_of_non_negative_features_matches_reference_torchdistill():
    # pooled post-ReLU features (what fc:input holds in a WRN) are non-negative: cosines in [0, 1]
    student, teacher = randn(16, 32, seed=16).relu(), randn(16, 128, seed=17).relu()
    reference = PKTLoss("fc", "input", "fc", "input")(io(student, "fc", "input"), io(teacher, "fc", "input"))
    close(pkt_loss(student, teacher), reference)
    assert pkt_loss(teacher, teacher) < 1e-12  # no loss when the geometries agree


# ---- VID ------------------------------------------------------------------------------------------


def _torchdistill_vid(mean: torch.Tensor, variance: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # torchdistill reads (pred_mean, pred_var) from the student's io (its VariationalDistributor4VID's output)
    pairs = {"pair1": {"student": {"io": "output", "path": "regressor"}, "teacher": {"io": "output", "path": "layer1"},
                       "weight": 1}}
    return VIDLoss(pairs)(io((mean, variance.view(1, -1, 1, 1)), "regressor"), io(teacher, "layer1"))


def test_vid_loss_matches_reference_torchdistill():
    mean, teacher, variance = randn(4, 6, 3, 3, seed=18), randn(4, 6, 3, 3, seed=19), randn(6, seed=20).exp()
    close(vid_loss(mean, variance, teacher), _torchdistill_vid(mean, variance, teacher))


def _repdistiller_vid(head: VIDRegressor, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """VID.py:38-54 by hand: pool the larger map, 1x1 convs as channel products, softplus variance + eps."""
    s_h, t_h = student.shape[2], teacher.shape[2]
    if s_h > t_h:
        student = F.adaptive_avg_pool2d(student, (t_h, t_h))
    elif s_h < t_h:
        teacher = F.adaptive_avg_pool2d(teacher, (s_h, s_h))
    w1, w2, w3 = (conv.weight.detach().double()[:, :, 0, 0] for conv in head.mean if isinstance(conv, torch.nn.Conv2d))
    hidden = torch.einsum("oc,nchw->nohw", w1, student).relu()
    hidden = torch.einsum("oc,nchw->nohw", w2, hidden).relu()
    mean = torch.einsum("oc,nchw->nohw", w3, hidden)
    variance = (torch.log(1.0 + torch.exp(head.alpha.detach().double())) + 1e-5).view(1, -1, 1, 1)
    return (0.5 * ((mean - teacher) ** 2 / variance + variance.log())).mean()


@pytest.mark.parametrize(("student_size", "teacher_size"), [(4, 4), (8, 4), (2, 4)])
def test_vid_regressor_matches_reference_repdistiller_and_torchdistill(student_size, teacher_size):
    torch.manual_seed(21)
    head = VIDRegressor(student_channels=3, teacher_channels=5).double()
    with torch.no_grad():
        head.alpha.normal_()  # a learned variance per channel, not the initial 5
    student, teacher = randn(4, 3, student_size, student_size, seed=22), randn(4, 5, teacher_size, teacher_size, seed=23)
    close(head(student, teacher), _repdistiller_vid(head, student, teacher))
    if student_size == teacher_size:
        close(head(student, teacher), _torchdistill_vid(head.mean(student), head.variance(), teacher))


def test_vid_variance_starts_at_the_authors_initial_value():
    # VID.py:33-35: log_scale = log(exp(5 - eps) - 1), so softplus(log_scale) + eps = 5
    head = VIDRegressor(3, 4)
    torch.testing.assert_close(head.variance(), torch.full((4,), 5.0))
    assert head.alpha[0].item() == pytest.approx(math.log(math.exp(5.0 - 1e-5) - 1.0))

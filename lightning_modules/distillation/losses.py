"""Knowledge-distillation losses and the connectors they need. Plain functions and modules, no Lightning.

Conventions shared by every loss here:

* The first argument is the student's, the second the teacher's. Teacher tensors are targets:
  each loss detaches them, so no gradient ever reaches the teacher, whatever the caller did.
* Everything is computed in float32 (inputs are cast with ``.float()``), so the losses are safe
  inside a bf16/fp16 autocast region.
* Loss weights (e.g. AT's beta = 1000) are the caller's business; each function returns the
  unweighted term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.distillation.probabilistic_losses import pkt_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al., 2015), for ``(N, C)`` logits.

    ``batchmean``: summed over classes, averaged over samples. The ``T^2`` keeps the gradient
    magnitude independent of ``T``, since the soft-target gradients scale as ``1 / T^2``.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class ConvConnector(nn.Module):
    """FitNets regressor (Romero et al., 2015): ``(N, Cs, Hs, Ws) -> (N, Ct, Ht, Wt)``, conv-BN-ReLU.

    Same size: 3x3 conv, stride 1. Student ``k`` times larger: 3x3 conv, stride ``k``. Teacher ``k``
    times larger: ``k x k`` transposed conv, stride ``k``. Shapes are ``(C, H, W)`` tuples.
    ``relu=False`` drops the ReLU: a ReLU output cannot regress a teacher feature that takes
    negative values (e.g. a pre-activation residual-block output such as a WRN group's).
    """

    def __init__(
        self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], relu: bool = True
    ) -> None:
        super().__init__()
        (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
        if (h_s, w_s) == (h_t, w_t):
            conv = nn.Conv2d(c_s, c_t, 3, stride=1, padding=1, bias=False)
        elif h_s % h_t == 0 and w_s % w_t == 0:
            # kernel 3, padding 1, stride k maps k*H to exactly H.
            conv = nn.Conv2d(c_s, c_t, 3, stride=(h_s // h_t, w_s // w_t), padding=1, bias=False)
        elif h_t % h_s == 0 and w_t % w_s == 0:
            stride = (h_t // h_s, w_t // w_s)
            conv = nn.ConvTranspose2d(c_s, c_t, stride, stride=stride, bias=False)
        else:
            raise ValueError(
                f"cannot connect student feature (C, H, W) = {tuple(student_shape)} to teacher feature "
                f"{tuple(teacher_shape)}: the spatial sizes must be equal or one an integer multiple of the other"
            )
        # conv bias is redundant before BatchNorm.
        layers = [conv, nn.BatchNorm2d(c_t)] + ([nn.ReLU(inplace=True)] if relu else [])
        self.layers = nn.Sequential(*layers)

    def forward(self, student_feature: torch.Tensor) -> torch.Tensor:
        return self.layers(student_feature)


class LinearConnector(nn.Linear):
    """``(N, d_student) -> (N, d_teacher)`` linear map for flat features (e.g. pooled penultimate)."""

    def __init__(self, d_student: int, d_teacher: int) -> None:
        super().__init__(d_student, d_teacher)


def build_connector(student_feature: torch.Tensor, teacher_feature: torch.Tensor, relu: bool = True) -> nn.Module:
    """A connector for these example features: ``LinearConnector`` for 2-D, ``ConvConnector`` for 4-D.

    ``relu`` is passed to ``ConvConnector``; the linear connector has no activation.
    """
    if student_feature.ndim == teacher_feature.ndim == 2:
        return LinearConnector(student_feature.shape[1], teacher_feature.shape[1])
    if student_feature.ndim == teacher_feature.ndim == 4:
        return ConvConnector(tuple(student_feature.shape[1:]), tuple(teacher_feature.shape[1:]), relu=relu)
    raise ValueError(
        "build_connector needs two (N, D) or two (N, C, H, W) features, got shapes "
        f"{tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}"
    )


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., 2015): ``mean (r(f_s) - f_t)^2`` over all elements.

    ``student_feature`` is the connector output ``r(f_s)``; it must already have the teacher's shape.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"hint_loss needs equal shapes, got student {tuple(student_feature.shape)} and teacher "
            f"{tuple(teacher_feature.shape)}: map the student feature through a connector first "
            "(build_connector(student_feature, teacher_feature))"
        )
    return F.mse_loss(student_feature.float(), teacher_feature.detach().float())


def _attention_energy(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_c |f_c|^p``: the ``(N, H, W)`` spatial map before flattening and normalisation."""
    return feature.float().abs().pow(p).mean(dim=1)


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """``a = vec(mean_c |f_c|^p) / ||vec(mean_c |f_c|^p)||_2`` (Zagoruyko & Komodakis, 2017), ``(N, H*W)``."""
    return F.normalize(_attention_energy(feature, p).flatten(1), dim=1)


def attention_transfer_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], p: float = 2
) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017): ``sum_pairs mean_{n, hw} (a_s - a_t)^2``.

    The authors' code (attention-transfer ``utils.py:18-23``; ``cifar.py:223`` adds ``beta *`` it with
    ``--beta 1e+3``) and RepDistiller (``distiller_zoo/AT.py:26``, ``-b 1000``) both weight this squared,
    element-averaged term by 1000, unhalved; the paper's Eq. 2, ``beta / 2 * sum ||a_s - a_t||_p``, is
    torchdistill's ``ATLoss(mode="paper")``. The caller applies beta. Maps of different sizes: both
    energies ``mean_c |f|^p`` are average-pooled to the smaller (RepDistiller pools the features).
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"attention_transfer_loss needs matching non-empty feature lists, got {len(student_features)} "
            f"student and {len(teacher_features)} teacher features"
        )
    total = torch.zeros((), device=student_features[0].device)
    for student, teacher in zip(student_features, teacher_features):
        energy_s, energy_t = _attention_energy(student, p), _attention_energy(teacher.detach(), p)
        size = (min(energy_s.shape[1], energy_t.shape[1]), min(energy_s.shape[2], energy_t.shape[2]))
        if energy_s.shape[1:] != size:
            energy_s = F.adaptive_avg_pool2d(energy_s.unsqueeze(1), size).squeeze(1)
        if energy_t.shape[1:] != size:
            energy_t = F.adaptive_avg_pool2d(energy_t.unsqueeze(1), size).squeeze(1)
        a_s, a_t = F.normalize(energy_s.flatten(1), dim=1), F.normalize(energy_t.flatten(1), dim=1)
        total = total + (a_s - a_t).pow(2).mean()
    return total


def _off_diagonal(n: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _normalised_distances(emb: torch.Tensor) -> torch.Tensor:
    """``||e_i - e_j|| / mean_{i != j} ||e_i - e_j||`` for the ``N (N - 1)`` pairs ``i != j``."""
    squared = (emb.unsqueeze(0) - emb.unsqueeze(1)).pow(2).sum(dim=2)
    # The diagonal is dropped before sqrt, whose gradient at 0 is infinite.
    distances = squared[_off_diagonal(len(emb), emb.device)].clamp_min(1e-12).sqrt()
    return distances / distances.mean().clamp_min(1e-12)


def _check_pairable(student_emb: torch.Tensor, teacher_emb: torch.Tensor, name: str) -> None:
    if len(student_emb) != len(teacher_emb) or len(student_emb) < 2:
        raise ValueError(
            f"{name} needs the same N >= 2 samples for student and teacher, got {len(student_emb)} and {len(teacher_emb)}"
        )


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD distance (Park et al., 2019): ``mean_{i != j} huber(psi_s(i, j), psi_t(i, j))``, Huber beta = 1.

    ``psi(i, j) = ||e_i - e_j|| / mu``, ``mu`` the mean distance over pairs ``i != j``: invariant to
    the embedding's scale. Inputs ``(N, ...)`` are flattened; the dimensions need not match.
    """
    _check_pairable(student_emb, teacher_emb, "rkd_distance_loss")
    psi_student = _normalised_distances(student_emb.float().flatten(1))
    psi_teacher = _normalised_distances(teacher_emb.detach().float().flatten(1))
    return F.smooth_l1_loss(psi_student, psi_teacher, beta=1.0)


def _triplet_cosines(emb: torch.Tensor) -> torch.Tensor:
    """``cos angle(e_i - e_j, e_k - e_j)`` for all triplets with ``i != j`` and ``k != j``."""
    directions = F.normalize(emb.unsqueeze(0) - emb.unsqueeze(1), dim=2)  # [j, i] = unit(e_i - e_j)
    cosines = torch.bmm(directions, directions.transpose(1, 2))  # [j, i, k]
    off = _off_diagonal(len(emb), emb.device)
    return cosines[off.unsqueeze(2) & off.unsqueeze(1)]


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD angle (Park et al., 2019): ``mean_{ijk} huber(cos_s(i, j, k), cos_t(i, j, k))``, Huber beta = 1.

    ``cos(i, j, k) = <unit(e_i - e_j), unit(e_k - e_j)>``, the angle at ``j``, over triplets with
    ``i != j != k``. Costs ``O(N^3)`` memory. Inputs ``(N, ...)`` are flattened; dimensions may differ.
    """
    _check_pairable(student_emb, teacher_emb, "rkd_angle_loss")
    cos_student = _triplet_cosines(student_emb.float().flatten(1))
    cos_teacher = _triplet_cosines(teacher_emb.detach().float().flatten(1))
    return F.smooth_l1_loss(cos_student, cos_teacher, beta=1.0)


def _similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def similarity_preserving_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, 2019): ``||G_s - G_t||_F^2 / N^2``.

    ``G = row_l2_normalise(F F^T)`` with ``F`` the ``(N, -1)`` flattened feature; only the batch
    size must match between student and teacher.
    """
    if len(student_feature) != len(teacher_feature):
        raise ValueError(f"batch sizes differ: {len(student_feature)} vs {len(teacher_feature)}")
    g_student = _similarity_matrix(student_feature.float())
    g_teacher = _similarity_matrix(teacher_feature.detach().float())
    return (g_student - g_teacher).pow(2).sum() / len(student_feature) ** 2


def _category_structure(emb: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos(e_i, c_{y_i}) for each i, cos(c_a, c_b) for all present classes a, b)``."""
    emb = F.normalize(emb, dim=1)
    _, class_index = torch.unique(targets, return_inverse=True)
    members = F.one_hot(class_index).to(emb.dtype)  # (N, K)
    centers = (members.T @ emb) / members.sum(dim=0).unsqueeze(1)
    intra = F.cosine_similarity(emb, centers[class_index], dim=1)
    unit_centers = F.normalize(centers, dim=1)
    return intra, unit_centers @ unit_centers.T


def category_structure_loss(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Category structure KD (Chen et al., ECCV 2020), cosine form: ``(intra_loss, inter_loss)``.

    Class centers ``c_k = mean_{i: y_i = k} e_i / ||e_i||`` over the classes present in the batch.
    ``intra_loss = mean_i (cos_s(e_i, c_{y_i}) - cos_t(e_i, c_{y_i}))^2``;
    ``inter_loss = mean_{a, b} (cos_s(c_a, c_b) - cos_t(c_a, c_b))^2``. Cosines make both
    dimension-free, so student and teacher widths may differ. Samples with ``target < 0``
    (unlabeled) are ignored; with fewer than two classes present the inter loss is a graph-connected 0.
    """
    labeled = targets >= 0
    student, teacher = student_emb.float().flatten(1), teacher_emb.detach().float().flatten(1)
    # A 0 that still depends on the student keeps backward() and DDP's unused-parameter check happy.
    zero = student.sum() * 0.0
    if not labeled.any():
        return zero, zero
    intra_s, inter_s = _category_structure(student[labeled], targets[labeled])
    intra_t, inter_t = _category_structure(teacher[labeled], targets[labeled])
    intra_loss = F.mse_loss(intra_s, intra_t)
    inter_loss = F.mse_loss(inter_s, inter_t) if len(inter_s) >= 2 else zero
    return intra_loss, inter_loss


def mutual_learning_loss(logits_list: Sequence[torch.Tensor], temperature: float = 1.0) -> list[torch.Tensor]:
    """Deep Mutual Learning (Zhang et al., 2018): one mimicry loss per peer.

    ``L_k = 1 / (K - 1) * sum_{j != k} T^2 KL(softmax(z_j / T) || softmax(z_k / T))``, batchmean.
    The peers' distributions are detached targets, so ``L_k`` trains peer ``k`` only; add each
    peer's cross-entropy separately.
    """
    if len(logits_list) < 2:
        raise ValueError(f"mutual learning needs at least 2 peers, got {len(logits_list)}")
    return [
        torch.stack([kd_loss(z_k, z_j, temperature) for j, z_j in enumerate(logits_list) if j != k]).mean()
        for k, z_k in enumerate(logits_list)
    ]


def relation_losses(weights: dict[str, float], student: torch.Tensor | None, teacher: torch.Tensor | None,
                    targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The relation terms whose weight is non-zero, on the embeddings ``student``/``teacher`` (PKT from
    :mod:`~lightning_modules.distillation.probabilistic_losses`; CRD is computed by its own module)."""
    terms = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss, "sp": similarity_preserving_loss,
             "cskd": lambda s, t: sum(category_structure_loss(s, t, targets)), "pkt": pkt_loss}
    return {f"{name}_loss": loss(student, teacher) for name, loss in terms.items() if weights.get(name)}


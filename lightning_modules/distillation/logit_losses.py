"""Response-based distillation losses beyond Hinton KD: DKD and DIST. Plain functions, no Lightning.

Same conventions as :mod:`~lightning_modules.distillation.losses`: student first, teacher second and
detached, computed in float32. :data:`LOGIT_LOSSES` maps the names ``KDStudent(logit_loss=...)``
accepts to these functions; each takes ``(student_logits, teacher_logits, targets, temperature,
**options)`` and returns the unweighted term (``kd_weight`` is the caller's).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lightning_modules.distillation.feature_normalized_kd import fnkd_loss
from lightning_modules.distillation.losses import kd_loss


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str) -> None:
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{name} needs (N, C) student and teacher logits of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")


def _non_target_index(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, C - 1)`` column indices of every class but ``targets[n]``, in order (no host sync, unlike a mask)."""
    columns = torch.arange(num_classes - 1, device=targets.device)
    return columns + (columns >= targets.unsqueeze(1)).long()


def _binary_and_non_target(log_probs: torch.Tensor, targets: torch.Tensor,
                           others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log [p_y, 1 - p_y]`` as ``(N, 2)``, and the non-target columns ``(N, C - 1)``."""
    log_target = log_probs.gather(1, targets.unsqueeze(1))
    non_target = log_probs.gather(1, others)
    # log(1 - p_y) as a logsumexp over the other classes: exact where 1 - p_y rounds to 0
    return torch.cat([log_target, non_target.logsumexp(dim=1, keepdim=True)], dim=1), non_target


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 (alpha TCKD + beta NCKD)``, each KL batch-mean.

    With ``p = softmax(z / T)`` and ``y`` the ground-truth class,
    ``TCKD = KL([p_y^t, 1 - p_y^t] || [p_y^s, 1 - p_y^s])`` (the binary target-vs-rest split) and
    ``NCKD = KL(softmax(z^t_{-y} / T) || softmax(z^s_{-y} / T))`` over the ``C - 1`` non-target
    classes. Hinton KD is ``TCKD + (1 - p_y^t) NCKD``; DKD frees the NCKD weight. The authors' code
    (mdistiller ``mdistiller/distillers/DKD.py:8-32``) masks the target with ``- 1000`` before the
    softmax; dropping its column is the same up to ``exp(-1000)``. Their CIFAR-100 recipe
    (``mdistiller/engine/cfg.py:162-167``): CE weight 1, alpha 1, beta 8 (6 for WRN-40-2 -> WRN-16-2,
    ``configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml``), T 4, the whole term warmed up linearly over 20
    epochs (``DKD.py:72``; ``KDStudent(kd_warmup_steps=...)``).
    """
    _check_logits(student_logits, teacher_logits, "dkd_loss")
    num_classes = student_logits.shape[1]
    if num_classes < 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(f"dkd_loss needs (N, C >= 2) logits and N class indices, got logits "
                         f"{tuple(student_logits.shape)} and targets {tuple(targets.shape)}")
    # the value check reads the targets on the host: free on the CPU, a sync per step on a GPU (there
    # gather fails on an index out of range by itself)
    if not targets.is_cuda and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"dkd_loss needs the ground-truth class in [0, {num_classes}) of every sample (DKD "
                         f"decouples around it), got targets in [{int(targets.min())}, {int(targets.max())}]: "
                         "unlabeled samples (-1) have none")
    others = _non_target_index(targets, num_classes)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    binary_s, non_target_s = _binary_and_non_target(log_p_s, targets, others)
    binary_t, non_target_t = _binary_and_non_target(log_p_t, targets, others)
    tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True)
    # renormalising the non-target log-probabilities is log_softmax of the non-target logits
    nckd = F.kl_div(F.log_softmax(non_target_s, dim=1), F.log_softmax(non_target_t, dim=1),
                    reduction="batchmean", log_target=True)
    return temperature**2 * (alpha * tckd + beta * nckd)


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise Pearson correlation: the cosine of the rows after subtracting each row's mean."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
              temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``T^2 (beta (1 - mean_i rho(Y^s_i, Y^t_i)) + gamma (1 - mean_c rho(Y^s_c, Y^t_c)))``.

    ``Y = softmax(z / T)`` is ``(N, C)``; ``rho`` the Pearson correlation. The inter-class term
    correlates each sample's class distribution (a row), the intra-class term each class's scores
    across the batch (a column), so only the ranking and the relative spread have to match, not
    the values. Follows the authors' ``lib/models/losses/dist_kd.py:4-34`` in
    hunto/image_classification_sota (``eps`` added to the product of norms). Their recipes: beta =
    gamma = 1 and loss weight 2 beside CE 1 (``configs/strategies/distill/*.yaml``), T 1 on ImageNet,
    T 4 on CIFAR-100 (``kd: dist_t4``). ``targets`` is unused: DIST needs no labels.
    """
    _check_logits(student_logits, teacher_logits, "dist_loss")
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    inter = 1 - _pearson(y_s, y_t, eps).mean()
    intra = 1 - _pearson(y_s.T, y_t.T, eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
                   temperature: float = 4.0) -> torch.Tensor:
    """:func:`~lightning_modules.distillation.losses.kd_loss` in this module's signature (labels unused)."""
    return kd_loss(student_logits, teacher_logits, temperature)


#: ``KDStudent(logit_loss=name)``: the response term, weighted by ``kd_weight``
LOGIT_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"kd": hinton_kd_loss, "dkd": dkd_loss, "dist": dist_loss,
                                                        "fnkd": fnkd_loss}
#: losses that also read the heads' inputs and biases (keyword-only arguments the caller supplies)
NEEDS_HEAD_INPUTS = frozenset({"fnkd"})
#: losses that decouple around the ground-truth class, so cannot use unlabeled images
NEEDS_LABELS = frozenset({"dkd"})


def check_logit_loss(name: str, options: dict[str, Any], distill_unlabeled: bool) -> None:
    """Refuse, with the fix in the message, a name not in :data:`LOGIT_LOSSES`, an option its function does
    not take, or a loss that needs labels on unlabeled images."""
    if name not in LOGIT_LOSSES:
        raise ValueError(f"logit_loss={name!r} is not one of {sorted(LOGIT_LOSSES)}")
    parameters = inspect.signature(LOGIT_LOSSES[name]).parameters.values()
    accepted = {p.name for p in parameters if p.kind != p.KEYWORD_ONLY} - {"student_logits", "teacher_logits",
                                                                           "targets", "temperature"}
    if set(options) - accepted:
        raise ValueError(f"logit_loss_kwargs {sorted(set(options) - accepted)} are not options of "
                         f"logit_loss={name!r}, which takes {sorted(accepted)} (set the temperature with temperature)")
    if name in NEEDS_LABELS and distill_unlabeled:
        raise ValueError(f"logit_loss={name!r} decouples around the ground-truth class, which unlabeled images "
                         "lack: use logit_loss='kd' or 'dist' with distill_unlabeled=True")

"""Feature-normalized KD (Xu, Liu, Li & Loy, ECCV 2020): a per-sample temperature from the feature's L2 norm. No Lightning.

The paper reads a large penultimate-feature norm ``||f_i||`` as a sign of a sample the one-hot label fits badly,
and softens both networks' responses per sample by the norm instead of one global ``T``. For a linear head
``z = W f + b`` the authors' code (aztc/FNKD ``models/symbol_Resnet_cifar.py:258-263``) rescales the feature to
``f_i min(||f_i||, tau) / ||f_i||`` before the head, which is the per-sample temperature

    T_i = ||f_i|| / min(||f_i||, tau) = max(||f_i|| / tau, 1),      z~_i = (W f_i) / T_i + b = (z_i - b) / T_i + b

for teacher and student alike, and the loss (``train_gluon_script_cifar.py:476-496``) is

    L = CE(z^s, y) + w sum_c -softmax(z~^t_i)_c log softmax(z~^s_i)_c

with the hard-label CE on the plain logits. Here the distillation term is the KL divergence (the same
gradient: the teacher's entropy is a constant), batch-mean, times ``T^2`` for a further global ``T`` (1 in the
authors' recipe). Their CIFAR recipe: ``tau = 2`` (``opt.norm``), ``w = 9`` (``norm_distill_w``), CE weight 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_normalized_logits(logits: torch.Tensor, features: torch.Tensor, bias: torch.Tensor | None,
                              feature_norm: float) -> torch.Tensor:
    """``(z - b) / T_i + b`` with ``T_i = max(||f_i|| / tau, 1)``: the head applied to the norm-clipped feature."""
    if features.ndim != 2 or len(features) != len(logits):
        raise ValueError(f"feature-normalized KD needs the (N, D) inputs of the linear head (e.g. 'fc:input'), got "
                         f"features {tuple(features.shape)} for logits {tuple(logits.shape)}")
    norms = features.float().norm(dim=1, keepdim=True)
    scale = norms.clamp(max=feature_norm) / norms.clamp_min(1e-12)  # 1 / T_i
    offset = 0.0 if bias is None else bias.float()  # (z - b) s + b = W (s f) + b: the bias gets its full gradient
    return (logits.float() - offset) * scale + offset


def fnkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
              temperature: float = 1.0, feature_norm: float = 2.0, *, student_features: torch.Tensor,
              teacher_features: torch.Tensor, student_bias: torch.Tensor | None = None,
              teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 KL(softmax(z~^t / T) || softmax(z~^s / T))``, batch-mean, with ``z~`` the feature-normalized logits.

    ``feature_norm`` is ``tau``; the keyword-only arguments are the heads' ``(N, D)`` inputs and biases, which
    :class:`~lightning_modules.distillation.kd_student.KDStudent` captures. ``targets`` is unused.
    """
    if feature_norm <= 0:
        raise ValueError(f"feature_norm (tau) must be > 0, got {feature_norm}")
    student = feature_normalized_logits(student_logits, student_features, student_bias, feature_norm)
    with torch.no_grad():
        teacher = feature_normalized_logits(teacher_logits.detach(), teacher_features.detach(), teacher_bias, feature_norm)
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def head_inputs(student_net: torch.nn.Module, teacher_net: torch.nn.Module, pair: tuple[str, str],
                student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """FNKD's inputs: the features entering each network's linear head (``pair``, ``"<head>:input"`` paths,
    captured in ``student``/``teacher``) and each head's bias."""
    (s, t), biases = pair, []
    for net, path in ((student_net, s), (teacher_net, t)):
        biases.append(getattr(net.get_submodule(path.removesuffix(":input")), "bias", None))
    return dict(student_features=student[s], teacher_features=teacher[t], student_bias=biases[0], teacher_bias=biases[1])


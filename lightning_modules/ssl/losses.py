"""Loss pieces shared by semi-supervised methods. Plain functions, no Lightning.

All of them take logits with classes on dimension 1, so ``(N, C)`` image logits and
``(N, C, H, W)`` per-pixel logits work alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# moved to its own module (AdaMatch, ReMixMatch and SoftMatch share it); importable from here as before
from lightning_modules.ssl.distribution_alignment import distribution_alignment  # noqa: F401


def confident_pseudo_labels(logits: torch.Tensor, threshold: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels ``argmax softmax(logits / T)`` and the mask ``max softmax >= threshold``.

    The logits are detached: pseudo-labels are targets, never a path for gradient.
    Returns ``(pseudo_labels, confidence_mask)``, the mask as a float tensor of 0/1.
    """
    probs = torch.softmax(logits.detach().float() / temperature, dim=1)
    confidence, pseudo_labels = probs.max(dim=1)
    return pseudo_labels, (confidence >= threshold).to(probs.dtype)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_i mask_i * CE(logits_i, targets_i)``: averaged over all samples, masked ones count as 0.

    Dividing by the batch size rather than by ``mask.sum()`` is FixMatch's convention: the loss
    grows with the fraction of confident predictions.
    """
    return (F.cross_entropy(logits, targets, reduction="none") * mask).mean()


def masked_accuracy(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Accuracy of ``predictions`` over the masked entries with a known target (``>= 0``); 0 if none."""
    weight = mask * (targets >= 0)
    return ((predictions == targets) * weight).sum() / weight.sum().clamp(min=1)


# Ramp-up lengths of the CIFAR recipes, in optimizer steps of their 2^20-step runs (1024 epochs of 1024).
RECIPE_STEPS = 2**20
RAMPUP_STEPS_40_PERCENT = int(0.4 * RECIPE_STEPS)  # 419,430: TorchSSL's 40 % (Pi-model, Pseudo-Label, Mean Teacher, VAT)
RAMPUP_STEPS_80_OF_300_EPOCHS = int(80 / 300 * RECIPE_STEPS)  # 279,620: Laine & Aila's 80 of 300 epochs
RAMPUP_STEPS_1_OF_64 = RECIPE_STEPS // 64  # 16,384: MixMatch's 1024 kimg of 64 images, USB ReMixMatch's 1/64


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^(1/T) / sum_c p_c^(1/T)`` over dimension 1 (MixMatch, ReMixMatch)."""
    powered = probs.clamp_min(1e-12) ** (1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: ``lam' x + (1 - lam') x_perm`` and likewise the soft targets.

    One ``lam ~ Beta(alpha, alpha)`` per batch and ``lam' = max(lam, 1 - lam)``, so a mixed sample
    stays closer to its own input (MixMatch). Returns ``(mixed_inputs, mixed_targets, lam')``.
    """
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = beta.sample().to(inputs.device)
    lam = torch.maximum(lam, 1 - lam)
    perm = torch.randperm(len(inputs), device=inputs.device, generator=generator)
    mixed_inputs = lam * inputs + (1 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    return mixed_inputs, mixed_targets, lam


def masked_tempered_kl(logits: torch.Tensor, target_scores: torch.Tensor, weight: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """``mean_i w_i KL(softmax(s_i / T) || softmax(logits_i / T))`` over dimension 1, no ``T^2`` factor.

    ``target_scores`` are detached and tempered like logits (ReFixMatch passes the weak view's probabilities,
    as USB does); averaged over all samples, weight-0 ones counting as 0, as :func:`masked_cross_entropy`.
    """
    targets = torch.softmax(target_scores.detach().float() / temperature, dim=1)
    log_probs = torch.log_softmax(logits.float() / temperature, dim=1)
    kl = F.kl_div(log_probs, targets, reduction="none").sum(dim=1)
    return (kl * weight).mean()

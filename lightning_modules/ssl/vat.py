"""Virtual Adversarial Training (Miyato, Maeda, Koyama and Ishii, TPAMI 2018, "Virtual Adversarial
Training: A Regularization Method for Supervised and Semi-Supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.core.batch_norm import frozen_buffers
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.losses import RAMPUP_STEPS_40_PERCENT


def _unit_per_sample(d: torch.Tensor) -> torch.Tensor:
    """Scale each sample of ``d`` (dimension 0) to L2 norm 1.

    Dividing by the largest magnitude first keeps tiny gradients (they scale with xi = 1e-6) from
    underflowing when squared.
    """
    flat = d.flatten(1)
    flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return flat.view_as(d)


def _kl_from_logits(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``mean_b KL(softmax(target_b) || softmax(logits_b))`` in float32, no gradient through the target."""
    log_p = F.log_softmax(target_logits.detach().float(), dim=1)
    log_q = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


class VAT(SemiSupervisedModule):
    """The prediction must not move under the worst small perturbation of the unlabeled input.

    Loss: ``L = L_s + lambda_u * mean_b KL(p(y | u_b) || p(y | u_b + r_adv,b)) + w_ent * H(p(y | u))``
    with ``p(y | u_b)`` held fixed (no gradient) inside the KL, ``u`` the weak view, and
    ``r_adv,b = eps * g_b / ||g_b||_2``, ``g = grad_d KL(p(y | u) || p(y | u + xi d))`` at ``d`` a
    random unit vector per sample (one power iteration; ``power_iterations`` repeats it with ``d = g``).
    ``H`` is the mean prediction entropy (VAT + EntMin), not ramped and not scaled by lambda_u.

    Defaults follow the WRN-28-2 re-implementations the reference errors come from (USB / TorchSSL
    classic CV, CIFAR-10): eps = 6 and xi = 1e-6 (the paper's CIFAR-10 values, chosen there for
    ZCA-whitened inputs; here inputs are mean/std normalized, as in USB), one power iteration,
    lambda_u = 0.3 (TorchSSL ``vat.py`` line 297 ``--vat_weight 0.3``, mixmatch ``vat.py`` line 111;
    USB's classic config leaves it at its global default 1.0) ramped up linearly over the first
    40 % of training (``unsup_warm_up 0.4``, 0.4 * 2^20 steps; pass ``rampup_steps`` for shorter
    runs), entropy weight 0.06 (USB's ``ent_loss_ratio``), unlabeled ratio 1 and the shared
    SGD/cosine/EMA recipe. The paper itself trained a ConvLarge with Adam for 48k steps;
    ``entropy_weight=0`` gives plain VAT. In float32 the ``xi = 1e-6`` finite difference is noisy (the
    references' too): on a digits batch the resulting loss was 5 % off a float64 computation.

    BatchNorm and forwards: as in the references (USB ``semilearn/algorithms/vat/vat.py`` lines
    49-63, TorchSSL ``models/vat/vat.py`` lines 114-121, google-research/mixmatch ``vat.py`` lines
    44-48), the labeled batch has its own forward, the only one that updates the running
    statistics; the clean unlabeled forward, the power iteration and the adversarial forward run on
    the unlabeled batch alone, in training mode (batch statistics) inside :func:`frozen_buffers`.
    So the clean and the perturbed predictions are normalized over the same images and
    ``KL(p(y | u) || p(y | u + r))`` is 0 at ``r = 0``: with ``xi = 1e-6`` any other difference
    between the two passes (e.g. clean logits from a forward that also held the labeled images)
    would dominate the finite difference and fix the "adversarial" direction whatever the random
    start. ``concat_forward=True`` is therefore refused (``supports_concat_forward = False``). The
    power-iteration gradient is taken with ``torch.autograd.grad`` with respect to ``d`` only, so it
    never reaches the weights' ``.grad``.

    After each step ``last_perturbation_norm`` holds the per-sample L2 norms of ``r_adv`` (detached).

    Args:
        eps: norm of the adversarial perturbation.
        xi: finite-difference step of the power iteration.
        power_iterations: power iterations to estimate the adversarial direction (>= 1).
        entropy_weight: weight of the entropy-minimization term on the unlabeled predictions.
        unlabeled_loss_weight, rampup, rampup_steps: lambda_u and its ramp (defaults above).
        concat_forward: ``False``, the only value the base accepts for VAT (see BatchNorm and forwards above).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak",)
    supports_concat_forward = False  # the clean and perturbed unlabeled passes must see the same batch

    def __init__(
        self,
        eps: float = 6.0,
        xi: float = 1e-6,
        power_iterations: int = 1,
        entropy_weight: float = 0.06,
        unlabeled_loss_weight: float = 0.3,
        rampup: str | None = "linear",
        rampup_steps: int = RAMPUP_STEPS_40_PERCENT,
        concat_forward: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps,
                         concat_forward=concat_forward, **kwargs)
        if eps <= 0 or xi <= 0:
            raise ValueError(f"eps and xi must be positive, got eps={eps}, xi={xi}")
        if power_iterations < 1:
            raise ValueError(f"power_iterations must be at least 1, got {power_iterations}")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be non-negative, got {entropy_weight}")
        self.eps, self.xi, self.power_iterations, self.entropy_weight = eps, xi, power_iterations, entropy_weight
        self.last_perturbation_norm: torch.Tensor | None = None

    def adversarial_perturbation(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``r_adv`` for ``images`` whose clean logits are ``logits``, by power iteration; detached.
        Its forwards run in training mode: call it inside :func:`frozen_buffers`."""
        images = images.detach()
        d = _unit_per_sample(torch.randn_like(images, dtype=torch.float32))
        with torch.enable_grad():
            for _ in range(self.power_iterations):
                d = (self.xi * d).requires_grad_(True)
                kl = _kl_from_logits(logits, self.net(images + d.to(images.dtype)))
                (grad,) = torch.autograd.grad(kl, d)
                d = _unit_per_sample(grad.detach())
        return (self.eps * d).to(images.dtype)

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        losses = super().compute_losses({"labeled": labeled})  # labeled forward(s): BatchNorm statistics move here only
        if unlabeled is not None:
            with frozen_buffers(self.net):  # one scratch copy for the clean, power-iteration and adversarial passes
                clean_logits = self.net(unlabeled["weak"])
                losses.update(self.unlabeled_terms(clean_logits, unlabeled))
        return losses

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unlabeled terms from the clean logits ``logits["weak"]``, leaving the network's buffers alone."""
        with frozen_buffers(self.net):
            return self.unlabeled_terms(logits["weak"], batch)

    def unlabeled_terms(self, clean_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The KL to the adversarial prediction, the entropy and diagnostics; call it inside :func:`frozen_buffers`."""
        images = batch["weak"]
        r_adv = self.adversarial_perturbation(images, clean_logits)
        self.last_perturbation_norm = r_adv.detach().float().flatten(1).norm(dim=1)
        adversarial_logits = self.net(images.detach() + r_adv)
        probs = torch.softmax(clean_logits.float(), dim=1)
        entropy = -(probs * F.log_softmax(clean_logits.float(), dim=1)).sum(dim=1).mean()
        targets = batch["target"]
        known = (targets >= 0).float()
        return {
            "unlabeled_loss": _kl_from_logits(clean_logits, adversarial_logits),
            "entropy": entropy,
            "perturbation_norm": self.last_perturbation_norm.mean(),
            "unlabeled_acc": ((probs.argmax(dim=1) == targets).float() * known).sum() / known.sum().clamp(min=1),
        }

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().total_loss(losses)
        if self.entropy_weight > 0 and "entropy" in losses:
            loss = loss + self.entropy_weight * losses["entropy"]
        return loss

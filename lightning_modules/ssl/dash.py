"""Dash (Xu et al., ICML 2021, "Dash: Semi-Supervised Learning with Dynamic Thresholding")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.losses import masked_accuracy
from lightning_modules.ssl.threshold_state import gather_rows


class Dash(SemiSupervisedModule):
    """FixMatch's consistency on the unlabeled samples whose loss is under a threshold that falls with time.

    After ``supervised_warmup_steps`` steps without an unlabeled loss, the threshold at step
    ``t`` (``k = (t - warm-up) // rho_update_steps`` updates so far) is

        ``rho_t = max(C * gamma^-k * rho^, rho_min)``,

    and with ``q_b = softmax(logits(weak(u_b)) / T)`` (soft targets) while ``rho_t > rho_min`` and
    ``q_b = onehot(argmax logits(weak(u_b)))`` once ``rho_t = rho_min`` (no gradient through ``q_b``),
    a sample is kept when its weak view's own loss is small: ``m_b = 1[H(q_b, p(y | weak(u_b))) <= rho_t]``.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b m_b H(q_b, p(y | strong(u_b)))``, ``H`` the cross-entropy.

    ``rho^`` is the loss of the warmed-up model. USB estimates it as the EMA model's mean loss on its
    evaluation set, which is the test set (``dash.py`` lines 145-150); we select nothing by the test set
    (docs/design.md, "The command line"), so ``rho^`` is the mean labeled cross-entropy of the training
    batches of the last ``rho_window`` warm-up steps (every rank's), or ``rho_init`` when given (a loss
    measured on held-out images, say).

    Against the authors' code (USB ``semilearn/algorithms/dash/utils.py`` lines 24-51: ``rho`` updated every
    10 epochs of 1024 steps, floored at ``rho_min``, hard labels once it reaches it, the mask from the
    loss of the weak view against its own pseudo-label with ``<=``; ``dash.py`` lines 182-197 the masked
    cross-entropy averaged over the batch), pinned by ``tests/lightning_modules/ssl/test_adamatch_dash.py``.
    USB runs its warm-up (``dash.py`` lines 60-154) as extra steps before the 2^20 and on labeled batches
    only; here the warm-up steps are the first steps of the run, the unlabeled views are still forwarded
    (BatchNorm sees them) and only their loss is off.

    Paper recipe as USB runs it (CIFAR-10, WRN-28-2, ``config/classic_cv/dash/*.yaml``): T = 0.5,
    gamma = 1.27, C = 1.0001, rho_min = 0.05, warm-up 2048 steps, an update every 10240 steps (10 epochs),
    lambda_u = 1, mu = 7, B = 64, SGD 0.03 Nesterov, weight decay 5e-4, cosine 7/16 over 2^20 steps,
    EMA 0.999 (USB's CIFAR-10 error at 40 labels: 15.01 %).

    State: buffers ``rho_loss_sum`` and ``rho_loss_count`` (the warm-up losses that make ``rho^``), in
    ``state_dict``; the labeled loss proposes its per-sample values in the window, committed once after
    the optimizer step (docs/design.md, "Running state"). ``rho_t`` itself is a function of the step.

    Args:
        temperature: T of the soft pseudo-labels.
        gamma: the threshold is divided by gamma at each update.
        rho_scale: C, the factor of the first threshold over ``rho^``.
        rho_min: the floor of the threshold; reaching it switches to hard pseudo-labels.
        supervised_warmup_steps: steps before the unlabeled loss starts.
        rho_update_steps: steps between two updates of the threshold.
        rho_window: the last warm-up steps whose labeled losses make ``rho^``.
        rho_init: ``rho^`` itself, instead of the estimate.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = FixMatch.unlabeled_views

    def __init__(self, temperature: float = 0.5, gamma: float = 1.27, rho_scale: float = 1.0001,
                 rho_min: float = 0.05, supervised_warmup_steps: int = 2048, rho_update_steps: int = 10240,
                 rho_window: int = 64, rho_init: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if temperature <= 0 or gamma < 1 or rho_scale <= 0 or rho_min < 0:
            raise ValueError(f"Dash needs temperature > 0, gamma >= 1, rho_scale > 0 and rho_min >= 0; got "
                             f"{temperature}, {gamma}, {rho_scale}, {rho_min}")
        if rho_update_steps < 1 or supervised_warmup_steps < 0 or rho_window < 1:
            raise ValueError(f"Dash needs rho_update_steps >= 1, supervised_warmup_steps >= 0 and rho_window >= 1; "
                             f"got {rho_update_steps}, {supervised_warmup_steps}, {rho_window}")
        if rho_init is None and supervised_warmup_steps == 0:
            raise ValueError("Dash estimates rho^ from the labeled loss of its warm-up steps, and "
                             "supervised_warmup_steps=0 leaves none: give supervised_warmup_steps > 0 or rho_init")
        if rho_init is not None and rho_init <= 0:
            raise ValueError(f"rho_init must be a positive loss, got {rho_init}")
        self.temperature, self.gamma, self.rho_scale, self.rho_min = temperature, gamma, rho_scale, rho_min
        self.supervised_warmup_steps, self.rho_update_steps = supervised_warmup_steps, rho_update_steps
        self.rho_window, self.rho_init = rho_window, rho_init
        self.register_buffer("rho_loss_sum", torch.zeros(()))
        self.register_buffer("rho_loss_count", torch.zeros((), dtype=torch.long))

    # --- state -----------------------------------------------------------------------------
    def estimating_rho(self, step: int) -> bool:
        """Whether step ``step``'s labeled losses go into ``rho^`` (the last ``rho_window`` warm-up steps)."""
        end = self.supervised_warmup_steps
        return self.rho_init is None and end - self.rho_window <= step < end

    @torch.no_grad()
    def update_rho_estimate(self, losses: torch.Tensor) -> None:
        """The commit: add the step's per-sample labeled losses, from every rank, to the running sum."""
        losses = gather_rows(self, losses)
        self.rho_loss_sum += losses.sum().to(self.rho_loss_sum.dtype)
        self.rho_loss_count += losses.numel()

    def rho_hat(self) -> torch.Tensor:
        """``rho^``: ``rho_init``, or the mean warm-up labeled loss committed so far."""
        if self.rho_init is not None:
            return self.rho_loss_sum.new_tensor(self.rho_init, dtype=torch.float32)
        return (self.rho_loss_sum / self.rho_loss_count.clamp_min(1)).float()

    def rho(self, step: int) -> torch.Tensor:
        """``rho_t = max(C * gamma^-k * rho^, rho_min)`` at optimizer step ``step`` (past the warm-up)."""
        updates = max(step - self.supervised_warmup_steps, 0) // self.rho_update_steps
        return (self.rho_scale * self.gamma ** -updates * self.rho_hat()).clamp_min(self.rho_min)

    # --- loss ------------------------------------------------------------------------------
    def labeled_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.training and self.estimating_rho(self.global_step):
            self.step_state.propose(self.update_rho_estimate, F.cross_entropy(logits.detach().float(), targets,
                                                                              reduction="none"))
        return super().labeled_loss(logits, targets)

    def pseudo_targets(self, weak_logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """Soft ``softmax(weak / T)``, or the one-hot argmax where ``hard`` (a tensor: no host sync)."""
        weak_logits = weak_logits.detach().float()
        soft = torch.softmax(weak_logits / self.temperature, dim=1)
        one_hot = F.one_hot(weak_logits.argmax(dim=1), weak_logits.shape[1]).to(soft.dtype)
        return torch.where(hard, one_hot, soft)

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weak, strong = logits["weak"], logits["strong"]
        pseudo_labels = weak.detach().argmax(dim=1)
        if self.global_step < self.supervised_warmup_steps:  # warm-up: no unlabeled loss (a zero keeps the graph)
            zero = strong.float().sum() * 0.0
            return {"unlabeled_loss": zero, "mask_ratio": zero.detach(), "rho": zero.detach()}
        rho = self.rho(self.global_step).to(weak.device)
        targets = self.pseudo_targets(weak, rho <= self.rho_min)
        weak_loss = -(targets * torch.log_softmax(weak.detach().float(), dim=1)).sum(dim=1)
        mask = (weak_loss <= rho).to(targets.dtype)
        strong_loss = -(targets * torch.log_softmax(strong.float(), dim=1)).sum(dim=1)
        return {
            "unlabeled_loss": (strong_loss * mask).mean(),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], mask),
            "rho": rho,
        }

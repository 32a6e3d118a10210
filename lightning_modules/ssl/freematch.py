"""FreeMatch (Wang et al., ICLR 2023, "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.threshold_state import class_histogram, ema_step, gather_rows, self_adaptive_thresholds


class FreeMatch(SemiSupervisedModule):
    """FixMatch with self-adaptive thresholds (SAT) and a self-adaptive fairness loss (SAF).

    With ``q_b = softmax(logits(weak(u_b)))`` (no gradient), momentum ``lambda`` and the step's
    unlabeled batch gathered from all ranks, each step first updates

    * the global threshold ``tau_t = lambda tau_{t-1} + (1 - lambda) mean_b max q_b``, ``tau_0 = 1/C``;
    * the local class model ``p~_t = lambda p~_{t-1} + (1 - lambda) mean_b q_b``, ``p~_0 = 1/C``;
    * the label histogram ``h~_t = lambda h~_{t-1} + (1 - lambda) Hist_b(argmax q_b)``, ``h~_0 = 1/C``;

    then thresholds with ``tau_t(c) = MaxNorm(p~_t)(c) * tau_t = p~_t(c) / max_c' p~_t(c') * tau_t``
    and mask ``m_b = 1[max q_b > tau_t(argmax q_b)]``.

    Loss: ``L = L_s + lambda_u L_u + w_f L_f`` with
    ``L_u = 1/(mu B) sum_b m_b CE(argmax q_b, Q_b)``, ``Q_b = p(y | strong(u_b))``, and the fairness term
    ``L_f = -H(SumNorm(p~_t / h~_t), SumNorm(p_bar / h_bar)) = sum_c a_c log b_c`` where ``p_bar`` is the
    mean of ``Q_b`` over the masked samples (with gradient) and ``h_bar`` the histogram of their
    ``argmax Q_b``; ``a`` carries no gradient; ``L_f = 0`` when no sample passes the mask. Minimizing
    it raises the cross-entropy between the two, which discourages collapsing onto few classes.

    Paper recipe (CIFAR-10, 4000 labels, WRN-28-2): FixMatch's training recipe (hard labels,
    lambda_u = 1, mu = 7, B = 64, SGD 0.03 Nesterov, weight decay 5e-4, cosine 7/16 over 2^20
    steps, EMA 0.999) with lambda = 0.999 and w_f = 0.001: every one of USB's released FreeMatch
    configs (``config/classic_cv/freematch/*.yaml``, CIFAR-10/100, STL-10 and SVHN at every label
    count) sets ``ent_loss_ratio: 0.001``; only its argparse default is 0.01 (``freematch.py`` line
    150). The paper's own table of w_f was not checked here.

    Against the authors' code (USB ``algorithms/freematch/utils.py`` lines 14-66, ``freematch.py``
    lines 16-44 and 96-118, pinned by ``tests/lightning_modules/ssl/test_ssl_references_thresholds.py``):
    the same recurrence and losses, except that the mask uses the paper's strict ``>`` where USB
    uses ``>=`` (line 65). They differ only on ties, e.g. exactly uniform predictions at ``tau_0 = 1/C``,
    which USB would all keep.

    State: buffers ``global_threshold`` (scalar), ``class_model`` and ``label_hist`` (``(C,)``), in
    ``state_dict``. The loss computes the step's ``(tau_t, p~_t, h~_t)`` from the committed buffers
    without writing them and proposes the gathered ``q``; the buffers take that step once, after the
    optimizer step, identically on every rank (docs/design.md, "Running state").

    Args:
        ema_momentum: lambda, the momentum of the three moving averages.
        fairness_weight: w_f; 0 turns the fairness loss off.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = FixMatch.unlabeled_views

    def __init__(self, ema_momentum: float = 0.999, fairness_weight: float = 0.001, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1), got {ema_momentum}")
        self.ema_momentum, self.fairness_weight = ema_momentum, fairness_weight
        num_classes = self.hparams.num_classes
        self.register_buffer("global_threshold", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))

    # --- state -----------------------------------------------------------------------------
    @property
    def committed_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The committed ``(tau_t, p~_t, h~_t)``."""
        return self.global_threshold, self.class_model, self.label_hist

    @torch.no_grad()
    def next_state(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One EMA step of the committed ``(tau_t, p~_t, h~_t)`` from weak-view probabilities ``probs`` (every
        rank's); writes nothing."""
        confidence, prediction = probs.max(dim=1)
        observed = (confidence.mean(), probs.mean(dim=0), class_histogram(prediction, self.hparams.num_classes))
        return tuple(ema_step(s, v, self.ema_momentum) for s, v in zip(self.committed_state, observed))

    @torch.no_grad()
    def update_state(self, probs: torch.Tensor) -> None:
        """The commit: the buffers take :meth:`next_state` (``probs``: the step's proposed rows)."""
        for buffer, value in zip(self.committed_state, self.next_state(probs)):
            buffer.copy_(value)

    def class_thresholds(self, state: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``tau_t(c) = p~_t(c) / max p~_t * tau_t``, shape ``(C,)``, from ``state`` (the committed one by default)."""
        tau, class_model, _ = state if state is not None else self.committed_state
        return self_adaptive_thresholds(tau, class_model)

    def fairness_loss(self, strong_logits: torch.Tensor, mask: torch.Tensor,
                      state: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``L_f = sum_c SumNorm(p~_t / h~_t)_c log SumNorm(p_bar / h_bar)_c`` over the masked samples."""
        _, class_model, label_hist = state if state is not None else self.committed_state
        selected = mask > 0
        if not selected.any():
            return strong_logits.sum() * 0.0  # keeps the graph (and DDP's used parameters) intact
        probs = torch.softmax(strong_logits[selected].float(), dim=1)
        mean_prob = probs.mean(dim=0)
        hist = class_histogram(probs.detach().argmax(dim=1), self.hparams.num_classes, probs.dtype)
        target = _sum_norm(class_model / label_hist)
        batch = _sum_norm(mean_prob * _safe_reciprocal(hist))
        return (target.detach() * torch.log(batch + 1e-12)).sum()

    # --- loss ------------------------------------------------------------------------------
    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probs = torch.softmax(logits["weak"].detach().float(), dim=1)
        observed = gather_rows(self, probs)  # every rank's batch moves the state this step's mask uses
        state = self.next_state(observed)
        self.step_state.propose(self.update_state, observed)
        confidence, pseudo_labels = probs.max(dim=1)
        mask = (confidence > self.class_thresholds(state)[pseudo_labels]).to(probs.dtype)
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], pseudo_labels, mask),
            "fairness_loss": self.fairness_loss(logits["strong"], mask, state),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], mask),
            "global_threshold": state[0],
        }

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().total_loss(losses)
        if "fairness_loss" in losses and self.fairness_weight:
            loss = loss + self.fairness_weight * losses["fairness_loss"]
        return loss


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum().clamp_min(1e-12)


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` with 0 where ``x == 0`` (a class absent from the masked batch gets no weight)."""
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-12), torch.zeros_like(x))

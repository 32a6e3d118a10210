"""SoftMatch (Chen et al., ICLR 2023, "SoftMatch: Addressing the Quantity-Quality Trade-off in
Semi-supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.distribution_alignment import distribution_alignment, marginal_step
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.threshold_state import ema_step, gather_rows


class SoftMatch(SemiSupervisedModule):
    """FixMatch with a soft, truncated-Gaussian weight in place of the hard confidence mask.

    With ``q_b = softmax(logits(weak(u_b)))`` (no gradient), momentum ``m`` and the step's batch
    gathered from all ranks, each step:

    1. uniform alignment (UA, on by default): ``E_t[q] = m E_{t-1}[q] + (1 - m) mean_b q_b``
       from the raw probabilities, started at the first batch's mean (``E_1 = mean_b q_b``), then
       ``q^_b = Normalize(q_b * (1/C) / E_t[q])`` (without UA, ``q^_b = q_b``);
    2. ``mu_t = m mu_{t-1} + (1 - m) mean_b max q^_b`` and
       ``sigma_t^2 = m sigma_{t-1}^2 + (1 - m) var_b max q^_b`` (unbiased batch variance) on the
       aligned probabilities, ``mu_0 = 1/C``, ``sigma_0^2 = 1``;
    3. weight ``lambda(q^_b) = lambda_max`` if ``max q^_b >= mu_t``, else
       ``lambda_max * exp(-(max q^_b - mu_t)^2 / (2 sigma_t^2 / n_sigma^2))``.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b lambda(q^_b) CE(argmax q_b, p(y | strong(u_b)))``:
    the pseudo-label is the argmax of the *raw* probabilities; UA only shapes the weights.

    This follows the authors' code (USB ``semilearn/algorithms/softmatch/softmatch.py`` lines
    86-104: the aligned probabilities feed the weighting hook, and the pseudo-labels are made from
    the raw logits, "uniform alignment in softmatch do not use aligned probs for generating pesudo
    labels"; ``hooks/dist_align.py`` lines 48-51 start the class marginal from the first batch;
    ``softmatch/utils.py`` lines 24-40, 76 the Gaussian state and weight), pinned over several
    steps by ``tests/lightning_modules/ssl/test_ssl_references_thresholds.py``.

    The paper's Eq. for lambda is the Gaussian with variance ``sigma_t^2``; the authors' released
    configuration narrows it to standard deviation ``sigma_t / n_sigma`` with ``n_sigma = 2``, which
    is the default here (``n_sigma = 1`` gives the equation as printed). The global (not per-class)
    mean and variance are used, as in the paper's main results. (USB registers the alignment hook
    whatever its ``dist_align`` flag says; here ``uniform_alignment=False`` really turns UA off.)

    Paper recipe (CIFAR-10, 4000 labels, WRN-28-2): FixMatch's training recipe (hard labels,
    lambda_u = 1, mu = 7, B = 64, SGD 0.03 Nesterov, weight decay 5e-4, cosine 7/16 over 2^20
    steps, EMA 0.999) with m = 0.999, lambda_max = 1, n_sigma = 2, UA on.

    State: buffers ``conf_mean``, ``conf_var`` (scalars) and ``prob_mean`` (``(C,)``, UA; all zeros
    until the first batch, as a mean of probabilities never is), in ``state_dict``. The loss computes
    the step's ``E_t[q]``, ``mu_t`` and ``sigma_t^2`` from the committed buffers without writing them
    and proposes the gathered ``q``; the buffers take that step once, after the optimizer step,
    identically on every rank (docs/design.md, "Running state").

    Args:
        ema_momentum: m, the momentum of the moving averages.
        n_sigma: the Gaussian's standard deviation is ``sigma_t / n_sigma``.
        lambda_max: the largest weight.
        uniform_alignment: align the weak-view probabilities to the uniform distribution.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = FixMatch.unlabeled_views

    def __init__(self, ema_momentum: float = 0.999, n_sigma: float = 2.0, lambda_max: float = 1.0,
                 uniform_alignment: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1), got {ema_momentum}")
        if n_sigma <= 0:
            raise ValueError(f"n_sigma must be positive, got {n_sigma}")
        self.ema_momentum, self.n_sigma, self.lambda_max = ema_momentum, n_sigma, lambda_max
        self.uniform_alignment = uniform_alignment
        num_classes = self.hparams.num_classes
        self.register_buffer("conf_mean", torch.tensor(1.0 / num_classes))
        self.register_buffer("conf_var", torch.tensor(1.0))
        self.register_buffer("prob_mean", torch.zeros(num_classes))  # zeros: not started

    # --- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def aligned_confidence(self, probs: torch.Tensor, prob_mean: torch.Tensor) -> torch.Tensor:
        """``max q^_b``: max-probabilities, under UA aligned to the uniform distribution with ``E_t[q] = prob_mean``."""
        if self.uniform_alignment:
            probs = distribution_alignment(probs, prob_mean, torch.full_like(prob_mean, 1.0 / len(prob_mean)))
        return probs.max(dim=1).values

    @torch.no_grad()
    def next_state(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of the committed ``(E_t[q], mu_t, sigma_t^2)`` from weak-view probabilities ``probs`` (every
        rank's); writes nothing."""
        m, prob_mean = self.ema_momentum, self.prob_mean
        if self.uniform_alignment:
            prob_mean = marginal_step(prob_mean, probs, m)  # the first batch's mean, then an EMA
        confidence = self.aligned_confidence(probs, prob_mean)
        var = confidence.var() if confidence.numel() > 1 else torch.zeros_like(confidence.sum())
        return prob_mean, ema_step(self.conf_mean, confidence.mean(), m), ema_step(self.conf_var, var, m)

    @torch.no_grad()
    def update_state(self, probs: torch.Tensor) -> None:
        """The commit: the buffers take :meth:`next_state` (``probs``: the step's proposed rows)."""
        for buffer, value in zip((self.prob_mean, self.conf_mean, self.conf_var), self.next_state(probs)):
            buffer.copy_(value)

    def sample_weights(self, confidence: torch.Tensor, mean: torch.Tensor | None = None,
                       var: torch.Tensor | None = None) -> torch.Tensor:
        """Truncated Gaussian ``lambda(max q)`` from ``mu_t`` and ``sigma_t^2`` (the committed ones by default)."""
        mu = self.conf_mean if mean is None else mean
        var = self.conf_var if var is None else var
        gauss = torch.exp(-(confidence - mu) ** 2 / (2.0 * var.clamp_min(1e-12) / self.n_sigma**2))
        return self.lambda_max * torch.where(confidence >= mu, torch.ones_like(gauss), gauss)

    # --- loss ------------------------------------------------------------------------------
    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probs = torch.softmax(logits["weak"].detach().float(), dim=1)
        pseudo_labels = probs.argmax(dim=1)  # raw, not aligned: UA only shapes the weights
        observed = gather_rows(self, probs)  # every rank's batch moves the state these weights use
        prob_mean, mean, var = self.next_state(observed)
        self.step_state.propose(self.update_state, observed)
        weights = self.sample_weights(self.aligned_confidence(probs, prob_mean), mean, var)
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], pseudo_labels, weights),
            "mask_ratio": weights.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], weights),
            "conf_mean": mean,
            "conf_std": var.sqrt(),
        }

"""AdaMatch (Berthelot et al., ICLR 2022, "AdaMatch: A Unified Approach to Semi-Supervised Learning and
Domain Adaptation"), in its semi-supervised form as USB runs it."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.ssl.distribution_alignment import distribution_alignment, marginal_step
from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.threshold_state import gather_rows


class AdaMatch(SemiSupervisedModule):
    """FixMatch with distribution alignment and a threshold relative to the labeled batch's confidence.

    With ``p_l = softmax(logits(x))`` on the labeled (weak) batch and ``q_b = softmax(logits(weak(u_b)))``
    on the unlabeled one (no gradient through either), each step

    * moves the marginals: ``p_model <- m p_model + (1 - m) mean_b q_b`` (the first batch's mean at the
      start), ``p_target <- m p_target + (1 - m) mean p_l`` (from uniform);
    * aligns: ``q~_b = Normalize(q_b * (p_target + 1e-6) / (p_model + 1e-6))``;
    * thresholds relatively: ``tau_t = tau * mean_i max p_l,i`` and ``m_b = 1[max q~_b >= tau_t]``.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b m_b CE(argmax q~_b, p(y | strong(u_b)))``.

    Against the authors' code (USB ``semilearn/algorithms/adamatch/adamatch.py`` lines 83-109: softmax of
    the detached labeled and weak logits, alignment before masking; ``hooks/dist_align.py`` lines 26-55 with
    ``p_target_type='model'``: both marginals stepped with this batch before aligning, ``p_model`` started at
    the first batch, ``p_target`` at uniform; ``adamatch/utils.py`` lines 29-32 the relative threshold with
    ``>=``; hard labels from the aligned probabilities), pinned over several steps by
    ``tests/lightning_modules/ssl/test_adamatch_dash.py``. Like USB we leave out the paper's random logit
    interpolation and its lambda_u warm-up (both for domain adaptation's two BatchNorm batches). Under DDP
    the marginals and the labeled confidence are those of every rank's batch (USB gathers the marginals'
    batches but thresholds with each rank's own labeled batch), so two ranks train as one process would.

    Paper recipe as USB runs it (CIFAR-10, WRN-28-2, ``config/classic_cv/adamatch/*.yaml``): tau = 0.95,
    m = 0.999, hard labels, lambda_u = 1, mu = 7, B = 64, SGD 0.03 Nesterov, weight decay 5e-4, cosine
    7/16 over 2^20 steps, EMA 0.999 (USB's CIFAR-10 error at 40 labels: 5.05 %).

    State: buffers ``da_model_marginal`` (zeros until the first batch) and ``da_target_marginal``
    (uniform at the start), in ``state_dict``; the loss computes the step's marginals from them and proposes
    the gathered probabilities, committed once after the optimizer step (docs/design.md, "Running state").

    The base's ``compute_losses`` hands the labeled logits to ``unlabeled_loss`` under the key ``"labeled"``.
    R-Drop is refused: the threshold and the target marginal are USB's, from one labeled pass.

    Args:
        threshold: tau, the fraction of the labeled batch's mean confidence an aligned prediction must reach.
        ema_momentum: m, the momentum of both class marginals.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = FixMatch.unlabeled_views

    def __init__(self, threshold: float = 0.95, ema_momentum: float = 0.999, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # one labeled pass (docstring)
        super().__init__(**kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (a fraction of the labeled confidence), got {threshold}")
        if not 0.0 <= ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1), got {ema_momentum}")
        self.threshold, self.ema_momentum = threshold, ema_momentum
        num_classes = self.hparams.num_classes
        self.register_buffer("da_model_marginal", torch.zeros(num_classes))  # zeros: not started
        self.register_buffer("da_target_marginal", torch.full((num_classes,), 1.0 / num_classes))

    # --- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def next_marginals(self, unlabeled_probs: torch.Tensor,
                       labeled_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p_model, p_target)`` after one step with these probabilities (every rank's); writes nothing."""
        return (marginal_step(self.da_model_marginal, unlabeled_probs, self.ema_momentum),
                marginal_step(self.da_target_marginal, labeled_probs, self.ema_momentum))

    @torch.no_grad()
    def update_marginals(self, unlabeled_probs: torch.Tensor, labeled_probs: torch.Tensor) -> None:
        """The commit: the buffers take :meth:`next_marginals` of the step's proposed rows."""
        for buffer, value in zip((self.da_model_marginal, self.da_target_marginal),
                                 self.next_marginals(unlabeled_probs, labeled_probs)):
            buffer.copy_(value)

    # --- loss ------------------------------------------------------------------------------
    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "labeled" not in logits:
            raise ValueError("AdaMatch's unlabeled_loss needs the labeled batch's logits under 'labeled' "
                             "(its relative threshold and target marginal come from them); compute_losses passes them")
        labeled_probs = torch.softmax(logits["labeled"].detach().float(), dim=1)
        probs = torch.softmax(logits["weak"].detach().float(), dim=1)
        observed = gather_rows(self, probs), gather_rows(self, labeled_probs)
        model_marginal, target_marginal = self.next_marginals(*observed)
        self.step_state.propose(self.update_marginals, *observed)
        aligned = distribution_alignment(probs, model_marginal, target_marginal)
        relative_threshold = self.threshold * observed[1].max(dim=1).values.mean()
        confidence, pseudo_labels = aligned.max(dim=1)
        mask = (confidence >= relative_threshold).to(probs.dtype)
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], pseudo_labels, mask),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], mask),
            "relative_threshold": relative_threshold,
        }

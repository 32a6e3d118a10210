"""MultiMatch (Sirbu et al. 2025, "MultiMatch: Multihead Consistency Regularization Matching for Semi-Supervised
Text Classification"), on our image networks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.multihead_agreement import (MultiHeadNet, agreement_targets, apm_cutoffs, apm_step,
                                                       other_heads, pseudo_margins)
from lightning_modules.ssl.threshold_state import (ema_step, flexible_thresholds, gather_rows,
                                                  self_adaptive_thresholds, write_last_)

THRESHOLD_ALGOS = ("freematch", "flexmatch", "none")


class MultiMatch(SemiSupervisedModule):
    """Three classifier heads on one backbone; each head learns on the strong view from the pseudo-labels its two
    peers agree on, filtered by their running pseudo-margins (APM) and their FreeMatch thresholds.

    With ``z^h_b`` head ``h``'s logits on the weak view of ``u_b`` (no gradient) and ``y^h_b = argmax z^h_b``:
    the pseudo-margin ``pm^h_b(c) = z^h_b(c) - max z^h_b`` for ``c != y^h_b`` and ``max - second max`` at
    ``y^h_b``; the APM per sample ``A^h_n <- w pm^h_n + (1 - w) A^h_n``, ``w = smoothness / (1 + epoch)``; per
    head ``h`` and class ``c`` a cutoff ``gamma^h_c``: the ``apm_percentile`` quantile of the two other heads'
    APM at ``c`` over the samples both label ``c``, clamped at 0, recalibrated at every epoch end (or every
    ``recalibrate_every`` steps). Head ``h``'s target from its peers ``j, k`` (label passes: ``A(y) >= gamma^h_y``):
    agree and both pass, weight 1; exactly one passes, that label, weight ``disagreement_weight``; else 0; and
    0 throughout epoch 0. The weight is multiplied by ``max(m^j_b, m^k_b)``, the peers' FreeMatch masks.

    ``L = sum_h CE(p^h(y | x), y) + lambda_u 1/H sum_h 1/(mu B) sum_b w^h_b CE(y^h-target_b, p^h(y | strong(u_b)))``;
    the prediction is the mean of the heads' logits.

    Against the authors' code (USB ``semilearn/algorithms/multimatch/multimatch.py`` lines 67-180 and 207-217,
    ``multimatch/utils.py`` lines 57-156, ``freematch/utils.py`` lines 23-66, ``nets/bert/bert_multihead.py``
    lines 13-52; pinned by ``tests/lightning_modules/ssl/test_multimatch.py``), with these decisions:

    * USB recalibrates at an epoch's end through ``Hook.end_of_epoch`` (``core/hooks/hook.py`` line 36), which
      reads ``it + 1 % len(loader) == 0``, i.e. ``it + 1 == 0``: never, so with ``num_recalibrate_iter: 0`` (its
      default and the released config) its cutoffs stay 0. We recalibrate at each epoch end as the paper and
      the hook's name intend (before the next epoch's first batch, from the same committed state, so a
      checkpoint taken at the epoch end resumes exactly).
    * USB's recalibration loop ``break``s at the first class no sample agrees on (utils.py lines 139-141), leaving
      every later class's cutoff stale; we read it as a ``continue`` (that class gets 0, the others are computed).
    * USB calls each head's FreeMatch hook twice per step (once for each head it serves as a peer, lines 98-101),
      so its moving averages move twice per step; ours move once, from the step's weak view.
    * The FreeMatch mask is strict (``>``) as in our :class:`FreeMatch`, USB's ``>=`` (a difference on ties only).
    * The APM, the weak labels and the thresholds' state are proposed in the loss and committed after the optimizer
      step, from every rank's rows (the loss reads each sample's APM after this step's observation, as USB,
      which updates it before labeling, lines 136-139). An index drawn twice in one step is updated once,
      from its last row (USB updates it twice in sequence).
    * Three heads only: the agreement rule pairs exactly two peers (USB: "This works only for 3 heads").

    Recipe (``configs/multimatch_cifar10.yaml``): FixMatch's image hyper-parameters; USB's MultiMatch defaults
    (``get_argument``, lines 257-275): 3 heads, ``apm_percentile`` 0.05, ``smoothness`` 0.997,
    ``apm_disagreement_weight`` 3, FreeMatch thresholds with ``ema_p`` 0.999, sum of the heads' labeled losses.
    USB's text config (``config/usb_nlp/multimatch/multimatch_ag_news_200_0.yaml``) sets ``no_low: True`` and
    ``ulb_loss_ratio: 3.0``; we keep the argparse default (clamp at 0) and FixMatch's lambda_u = 1.

    State (in ``state_dict``): ``apm`` ``(N, H, C)``, ``weak_labels`` ``(N, H)`` (-1: never seen), ``apm_cutoff``
    ``(H, C)``, ``calibrated_at`` (the epoch, or step, of the last recalibration), per head ``head_threshold``
    ``(H,)`` and ``head_class_model`` ``(H, C)`` (FreeMatch) or ``head_memory`` ``(N, H)`` (FlexMatch), with
    ``N`` the DataModule's index space (``data_facts.num_indices``, or ``num_unlabeled``).

    Args:
        num_heads: classifier heads (3 only).
        narrow_heads: hidden width ``d // num_heads`` instead of ``d`` (USB's ``adjust_clf_size``).
        apm_percentile: the quantile of the agreeing samples' APM that becomes a class's cutoff.
        smoothness: weight of a new pseudo-margin in epoch 0 (divided by ``1 + epoch`` later).
        disagreement_weight: weight of a label only one peer's APM passes (USB's ``apm_disagreement_weight``).
        negative_cutoffs: let cutoffs go below 0 (USB's ``no_low``).
        recalibrate_every: recalibrate every this many steps; 0: at every epoch end (USB's ``num_recalibrate_iter``).
        threshold_algo: the peers' extra mask: ``freematch``, ``flexmatch`` or ``none``.
        ema_momentum: FreeMatch's momentum (USB's ``ema_p``). threshold, threshold_warmup: FlexMatch's.
        average_labeled_losses: mean instead of sum of the heads' labeled losses (USB's ``average_losses``).
        num_unlabeled: size of the index space when the DataModule publishes no facts.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "strong")
    trains_through_forward_views = False  # its own forward over every head (compute_losses)

    def __init__(self, num_heads: int = 3, narrow_heads: bool = False, apm_percentile: float = 0.05,
                 smoothness: float = 0.997, disagreement_weight: float = 3.0, negative_cutoffs: bool = False,
                 recalibrate_every: int = 0, threshold_algo: str = "freematch", ema_momentum: float = 0.999,
                 threshold: float = 0.95, threshold_warmup: bool = True, average_labeled_losses: bool = False,
                 num_unlabeled: int | None = None, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # its own forward (compute_losses)
        if num_heads != 3:
            raise ValueError(f"MultiMatch needs num_heads=3 (each head learns from the agreement of exactly two "
                             f"others, as in the authors' code), got {num_heads}")
        if threshold_algo not in THRESHOLD_ALGOS:
            raise ValueError(f"threshold_algo must be one of {THRESHOLD_ALGOS}, got {threshold_algo!r}")
        if not 0.0 <= apm_percentile <= 1.0 or not 0.0 < smoothness <= 1.0 or recalibrate_every < 0:
            raise ValueError(f"MultiMatch needs apm_percentile in [0, 1], smoothness in (0, 1] and recalibrate_every "
                             f">= 0 (0: each epoch), got {apm_percentile}, {smoothness}, {recalibrate_every}")
        super().__init__(**kwargs)
        self.num_heads, self.percentile, self.smoothness = num_heads, apm_percentile, smoothness
        self.disagreement_weight, self.clamp_at_zero = disagreement_weight, not negative_cutoffs
        self.recalibrate_every, self.threshold_algo, self.ema_momentum = recalibrate_every, threshold_algo, ema_momentum
        self.threshold, self.threshold_warmup, self._checked_mark = threshold, threshold_warmup, None
        num_classes, size = self.hparams.num_classes, num_unlabeled or 0
        self.register_buffer("apm", torch.zeros(size, num_heads, num_classes))
        self.register_buffer("weak_labels", torch.full((size, num_heads), -1, dtype=torch.long))
        self.register_buffer("apm_cutoff", torch.zeros(num_heads, num_classes))
        self.register_buffer("calibrated_at", torch.tensor(0, dtype=torch.long))
        self.register_buffer("head_threshold", torch.full((num_heads,), 1.0 / num_classes))
        self.register_buffer("head_class_model", torch.full((num_heads, num_classes), 1.0 / num_classes))
        self.register_buffer("head_memory", torch.full((size if threshold_algo == "flexmatch" else 0, num_heads), -1,
                                                       dtype=torch.long))

    def build_net(self) -> nn.Module:
        hp = self.hparams
        return MultiHeadNet(super().build_net(), hp.num_classes, hp.num_heads, hp.narrow_heads, hp.network)

    # --- state -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        facts = self.data_facts
        if facts is None or facts.num_indices is None:
            if self.apm.shape[0] == 0:
                raise ValueError("MultiMatch needs the unlabeled set's size: use a DataModule that publishes "
                                 "data_facts() (every labelwise DataModule does) or pass num_unlabeled")
            return
        if self.apm.shape[0] != facts.num_indices:  # a resumed run keeps its state
            size, (_, heads, classes) = facts.num_indices, self.apm.shape
            self.apm = torch.zeros(size, heads, classes, device=self.device)
            self.weak_labels = torch.full((size, heads), -1, dtype=torch.long, device=self.device)
            if self.threshold_algo == "flexmatch":  # -2: outside the unlabeled set, neither used nor unused
                outside = -2 if facts.unlabeled_indices is not None else -1
                self.head_memory = torch.full((size, heads), outside, dtype=torch.long, device=self.device)
                if facts.unlabeled_indices is not None:
                    self.head_memory[facts.unlabeled_indices.to(self.device)] = -1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("apm", "weak_labels", "head_memory"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=self.apm_cutoff.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_apm(self, index: torch.Tensor, apm: torch.Tensor, weak_labels: torch.Tensor) -> None:
        """The commit: every rank's rows of the APM and weak labels written (the last row of an index wins)."""
        index, apm, weak_labels = (gather_rows(self, t) for t in (index, apm, weak_labels))
        write_last_(self.apm, index, apm)
        write_last_(self.weak_labels, index, weak_labels)

    @torch.no_grad()
    def next_head_state(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FreeMatch's step of every head's ``(tau, p~)`` from weak-view probabilities ``(N, H, C)``; writes nothing."""
        return (ema_step(self.head_threshold, probs.max(dim=2).values.mean(dim=0), self.ema_momentum),
                ema_step(self.head_class_model, probs.mean(dim=0), self.ema_momentum))

    @torch.no_grad()
    def update_head_state(self, probs: torch.Tensor) -> None:
        for buffer, value in zip((self.head_threshold, self.head_class_model), self.next_head_state(probs)):
            buffer.copy_(value)

    @torch.no_grad()
    def update_head_memory(self, index: torch.Tensor, confidence: torch.Tensor, prediction: torch.Tensor) -> None:
        """FlexMatch's memory of each head: its predictions with confidence above ``threshold``, every rank's."""
        index, confidence, prediction = (gather_rows(self, t) for t in (index, confidence, prediction))
        for h in range(self.num_heads):
            selected = confidence[:, h] > self.threshold
            write_last_(self.head_memory[:, h], index[selected], prediction[selected, h])

    @torch.no_grad()
    def recalibrate_cutoffs(self) -> None:
        """The per-class APM cutoffs from the committed APM and weak labels (identical on every rank)."""
        self.apm_cutoff.copy_(apm_cutoffs(self.apm, self.weak_labels, self.percentile, self.clamp_at_zero))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # USB's after_train_step at an epoch's end (or every N steps), run before the next batch instead, from the
        # same committed state: Lightning 2.6 skips on_train_epoch_start when it resumes from an epoch-end checkpoint
        super().on_train_batch_start(batch, batch_idx)
        every = self.recalibrate_every
        mark = self.global_step if every else self.current_epoch
        if mark == self._checked_mark or (every and mark % every) or mark == 0:
            return
        self._checked_mark = mark  # the buffer read once per epoch (or per N steps), not per batch
        if mark > int(self.calibrated_at):
            self.recalibrate_cutoffs()
            self.calibrated_at.fill_(mark)

    # --- loss ------------------------------------------------------------------------------
    def peer_masks(self, weak: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each head's FreeMatch (or FlexMatch) mask ``(H, N)`` of its weak-view logits ``(H, N, C)``; proposes
        the step's threshold state."""
        if self.threshold_algo == "none":  # USB line 93
            return torch.ones(weak.shape[:2], device=weak.device)
        probs = torch.softmax(weak, dim=2)
        confidence, prediction = probs.max(dim=2)
        if self.threshold_algo == "freematch":
            observed = gather_rows(self, probs.transpose(0, 1))  # every rank's batch moves the thresholds
            tau, class_model = self.next_head_state(observed)
            self.step_state.propose(self.update_head_state, observed)
            thresholds = self_adaptive_thresholds(tau, class_model)
        else:  # the memory before the step, as FlexMatch
            thresholds = torch.stack([flexible_thresholds(self.head_memory[:, h], weak.shape[2], self.threshold,
                                                          self.threshold_warmup) for h in range(self.num_heads)])
            self.step_state.propose(self.update_head_memory, index, confidence.T, prediction.T)
        return (confidence > thresholds.gather(1, prediction)).to(weak.dtype)

    def multihead_loss(self, weak_logits: torch.Tensor, strong_logits: torch.Tensor, index: torch.Tensor,
                       epoch: int, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The unlabeled loss and diagnostics from every head's weak and strong logits ``(H, N, C)`` of the samples
        ``index`` in ``epoch``; proposes the step's APM, weak labels and threshold state."""
        weak = weak_logits.detach().float()
        index = index.to(self.apm.device)
        apm = apm_step(self.apm[index].transpose(0, 1), pseudo_margins(weak), self.smoothness, epoch)  # (H, N, C)
        labels = weak.argmax(dim=2)  # (H, N)
        self.step_state.propose(self.update_apm, index, apm.transpose(0, 1), labels.T)
        masks = self.peer_masks(weak, index)
        margins = apm.gather(2, labels[..., None])[..., 0]  # each head's APM at its own label
        losses, kept, correct = [], [], []
        for h, j, k in other_heads(self.num_heads):
            target, weight = agreement_targets(labels[j], labels[k], margins[j], margins[k], self.apm_cutoff[h],
                                               self.disagreement_weight)
            weight = weight * torch.maximum(masks[j], masks[k]) * (epoch > 0)  # no cutoffs yet in epoch 0
            losses.append(masked_cross_entropy(strong_logits[h].float(), target, weight))
            kept.append((weight > 0).float().mean())
            if targets is not None:
                correct.append(masked_accuracy(target, targets, (weight > 0).float()))
        out = {"unlabeled_loss": sum(losses) / self.num_heads, "mask_ratio": sum(kept) / self.num_heads,
               "mean_apm_cutoff": self.apm_cutoff.mean()}
        if correct:
            out["pseudo_label_acc"] = sum(correct) / self.num_heads
        return out

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        images = [labeled["image"]] + ([unlabeled["weak"], unlabeled["strong"]] if unlabeled is not None else [])
        if self.hparams.concat_forward:
            heads = self.net(torch.cat(images), all_heads=True).split([len(x) for x in images], dim=1)
        else:
            heads = [self.net(x, all_heads=True) for x in images]
        labeled_loss = sum(self.labeled_loss(logits, labeled["target"]) for logits in heads[0])
        losses = {"labeled_loss": labeled_loss / (self.num_heads if self.hparams.average_labeled_losses else 1)}
        if unlabeled is not None:
            losses.update(self.multihead_loss(heads[1], heads[2], unlabeled["index"], self.current_epoch,
                                              unlabeled.get("target")))
        return losses

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        raise ValueError("MultiMatch's loss needs every head's logits: call compute_losses (or multihead_loss)")

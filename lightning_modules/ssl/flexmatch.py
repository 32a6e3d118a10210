"""FlexMatch (Zhang et al., NeurIPS 2021, "FlexMatch: Boosting Semi-Supervised Learning with
Curriculum Pseudo Labeling")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.threshold_state import flexible_thresholds, gather_rows, write_last_

#: memory value of an unlabeled sample with no confident prediction yet
UNUSED = -1
#: memory value of an index outside the unlabeled set (never sampled; not counted as unused)
OUTSIDE = -2


class FlexMatch(FixMatch):
    """FixMatch with a per-class threshold that follows how well each class is learned (CPL).

    A memory ``m_n`` over the unlabeled set holds the latest class predicted for sample ``n`` with
    confidence ``> tau`` (``-1`` until there is one). The learning effect of class ``c`` is
    ``sigma_c = sum_n 1[m_n = c]``, normalized with threshold warm-up as
    ``beta_c = sigma_c / max(max_c' sigma_c', N_unused)`` (without warm-up: ``/ max_c' sigma_c'``),
    and the flexible threshold is ``T_c = M(beta_c) * tau`` with the convex mapping ``M(x) = x / (2 - x)``.

    Loss: ``L = L_s + lambda_u * 1/(mu B) sum_b 1[max q_b > T_{argmax q_b}] CE(argmax q_b, p(y | strong(u_b)))``,
    ``q_b = softmax(logits(weak(u_b)) / T)``, no gradient through ``q_b``. The thresholds of a step
    come from the memory before the step; the loss proposes the step's samples with ``max q_b > tau``,
    and after the optimizer step the memory records them, gathered from all ranks, so every rank holds
    the same memory (docs/design.md, "Running state": FGM's and PGD's extra passes record nothing).

    Early in training every ``beta_c`` is 0, so every ``T_c`` is 0 and nearly all pseudo-labels are
    used; the thresholds rise towards ``tau`` as the memory fills.

    Against the authors' code (USB ``algorithms/flexmatch/utils.py`` lines 15-63, pinned by
    ``tests/lightning_modules/ssl/test_ssl_references_thresholds.py``): the same recurrence, with the
    paper's strict ``>`` where USB compares with ``>=`` (lines 53, 55; a difference only on ties),
    and the memory synchronized across ranks where USB's is not.

    Paper recipe (CIFAR-10, 4000 labels, WRN-28-2): FixMatch's (tau = 0.95, hard labels,
    lambda_u = 1, mu = 7, B = 64, SGD 0.03 Nesterov, weight decay 5e-4, cosine 7/16 over 2^20
    steps, EMA 0.999) with the convex mapping and threshold warm-up on.

    State: the buffer ``memory`` (int64, one entry per ``index`` of the data), sized at fit start from
    the DataModule's facts (``data_facts.num_indices``, ``data_facts.unlabeled_indices``; or from
    ``num_unlabeled``); indices outside the unlabeled set hold ``-2`` and count neither as used nor
    unused. It is saved in ``state_dict``; loading a checkpoint resizes it to the saved size.

    Args:
        threshold: tau, the upper limit of the per-class thresholds.
        temperature: softmax temperature of ``q_b``.
        threshold_warmup: include the count of unused samples in the normalization of ``beta``.
        num_unlabeled: size of the index space when the DataModule publishes no facts (``data_facts()``).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    def __init__(self, threshold: float = 0.95, temperature: float = 1.0, threshold_warmup: bool = True,
                 num_unlabeled: int | None = None, **kwargs: Any) -> None:
        super().__init__(threshold=threshold, temperature=temperature, **kwargs)
        self.threshold_warmup = threshold_warmup
        self.register_buffer("memory", torch.full((num_unlabeled or 0,), UNUSED, dtype=torch.long))

    # --- state -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        memory = self._fresh_memory()
        if memory is not None and memory.shape != self.memory.shape:  # a resumed run keeps its memory
            self.memory = memory

    def _fresh_memory(self) -> torch.Tensor | None:
        facts = self.data_facts  # received from the DataModule in setup (lightning_modules/core/data_contract.py)
        if facts is None or facts.unlabeled_indices is None:
            if self.memory.numel() == 0:
                raise ValueError("FlexMatch needs the unlabeled set's size: use a DataModule that publishes "
                                 "data_facts() (every labelwise DataModule does) or pass num_unlabeled")
            return None
        memory = torch.full((facts.num_indices,), OUTSIDE, dtype=torch.long, device=self.device)
        memory[facts.unlabeled_indices.to(self.device)] = UNUSED
        return memory

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "memory")
        if saved is not None and saved.shape != self.memory.shape:
            self.memory = torch.empty_like(saved, device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def class_thresholds(self) -> torch.Tensor:
        """``T_c = M(beta_c) * tau`` from the current memory, shape ``(C,)``."""
        return flexible_thresholds(self.memory, self.hparams.num_classes, self.threshold, self.threshold_warmup)

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, confidence: torch.Tensor, prediction: torch.Tensor) -> None:
        """Record ``prediction`` for the samples with ``confidence > tau``, from every rank's batch (the commit)."""
        index, confidence, prediction = (gather_rows(self, t) for t in (index, confidence, prediction))
        selected = confidence > self.threshold
        write_last_(self.memory, index[selected].to(self.memory.device), prediction[selected])

    # --- loss ------------------------------------------------------------------------------
    def flexible_mask(self, weak_logits: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``probs``, ``pseudo_labels``, ``mask`` (``max q_b > T_{argmax q_b}``) and ``thresholds`` of a weak
        view; proposes the step's memory rows (SequenceMatch masks with it too)."""
        probs = torch.softmax(weak_logits.detach().float() / self.temperature, dim=1)
        confidence, pseudo_labels = probs.max(dim=1)
        thresholds = self.class_thresholds().to(probs.device)
        mask = (confidence > thresholds[pseudo_labels]).to(probs.dtype)
        self.step_state.propose(self.update_memory, index, confidence, pseudo_labels)
        return {"probs": probs, "pseudo_labels": pseudo_labels, "mask": mask, "thresholds": thresholds}

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        flex = self.flexible_mask(logits["weak"], batch["index"])
        pseudo_labels, mask = flex["pseudo_labels"], flex["mask"]
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], pseudo_labels, mask),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], mask),
            "mean_threshold": flex["thresholds"].mean(),
        }

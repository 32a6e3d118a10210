"""Temporal Ensembling (Laine & Aila, ICLR 2017, "Temporal Ensembling for Semi-Supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.ssl.losses import RAMPUP_STEPS_80_OF_300_EPOCHS


class TemporalEnsembling(SemiSupervisedModule):
    """Each unlabeled image's prediction should agree with the average of its past predictions.

    Memory: an ensemble ``Z_i`` per training image ``i`` and a count ``t_i`` of its updates. After
    a step that saw image ``i`` with prediction ``z_i = softmax(logits(weak(u_i)))``:
    ``Z_i <- alpha Z_i + (1 - alpha) z_i``, ``t_i <- t_i + 1``; its target is the bias-corrected
    ``z~_i = Z_i / (1 - alpha^t_i)`` (Adam-style startup correction).

    Loss: ``L = L_s + w(t) * 1/(mu B C) sum_b 1[t_b > 0] ||z_b - z~_b||^2`` with the targets read
    before this step's update (so ``z~`` holds only past predictions and carries no gradient), and
    ``w(t) = lambda_u exp(-5 (1 - t)^2)``. Images never seen before have no target and count 0
    (the paper's first epoch, where ``Z = 0`` and ``w = 0``, has the same effect).

    Differences from the paper, which updates ``Z`` once per epoch after the whole pass and counts
    ``t`` in epochs: the loss proposes the step's predictions and the update runs once after every
    optimizer step (docs/design.md, "Running state"; FGM's and PGD's extra passes propose nothing),
    and ``t`` counts the updates of that sample, so the correction stays exact with random sampling
    (an image may be drawn zero or several times in an epoch).

    The memory is a pair of plain tensor attributes, not registered buffers (DDP would overwrite
    them from rank 0 on each forward); each rank gathers the (index, prediction) pairs of all
    ranks with ``all_gather`` and applies the same update, so the copies stay identical. Repeated
    indices in one gathered step (micro-batches of one optimizer step included) are averaged into
    one update. Checkpoints carry the memory.

    Recipe (paper, CIFAR-10, 4000 labels, 12.16 % error with its own ConvNet), the defaults here:
    alpha = 0.6, w_max = 30 scaled by labeled/total (30 * 4000 / 50000 = 2.4; rescale for other
    label counts), ramp ``exp(-5 (1 - t)^2)`` over the first 80 of 300 epochs (279,620 of 2^20
    steps; pass ``rampup_steps`` for shorter runs). The optimizer is the shared SGD / WRN-28-2
    recipe of the other methods.

    Args:
        ensemble_momentum: alpha.
        memory_size: number of training images (indices run ``0 .. memory_size - 1``); by default the
            DataModule's ``data_facts.num_indices`` at fit start, and the memory grows if a larger index appears.
        unlabeled_loss_weight, rampup, rampup_steps: w_max and its ramp-up (defaults above).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak",)

    def __init__(self, ensemble_momentum: float = 0.6, memory_size: int | None = None,
                 unlabeled_loss_weight: float = 2.4, rampup: str | None = "sigmoid",
                 rampup_steps: int = RAMPUP_STEPS_80_OF_300_EPOCHS, **kwargs: Any) -> None:
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps, **kwargs)
        if not 0.0 <= ensemble_momentum < 1.0:
            raise ValueError(f"ensemble_momentum must lie in [0, 1), got {ensemble_momentum}")
        self.ensemble_momentum = ensemble_momentum
        # Plain attributes, deliberately not buffers (see the class docstring).
        self.ensemble = torch.zeros(0, self.hparams.num_classes)
        self.update_counts = torch.zeros(0, dtype=torch.long)
        if memory_size is not None:
            self._ensure_memory(memory_size)

    # --- memory ----------------------------------------------------------------------------
    def _ensure_memory(self, size: int, device: torch.device | None = None) -> None:
        """Grow the memory to ``size`` rows (new rows are unseen) and move it to ``device``."""
        device = device if device is not None else self.ensemble.device
        self.ensemble = self.ensemble.to(device)
        self.update_counts = self.update_counts.to(device)
        if size > len(self.ensemble):
            extra = size - len(self.ensemble)
            self.ensemble = torch.cat([self.ensemble, self.ensemble.new_zeros(extra, self.ensemble.shape[1])])
            self.update_counts = torch.cat([self.update_counts, self.update_counts.new_zeros(extra)])

    def on_fit_start(self) -> None:
        super().on_fit_start()
        facts = self.data_facts  # received from the DataModule in setup (lightning_modules/core/data_contract.py)
        size = facts.num_indices if facts is not None and facts.num_indices is not None else 0
        self._ensure_memory(size, self.device)

    def ensemble_targets(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected targets ``Z / (1 - alpha^t)`` of ``index`` and the mask ``t > 0``; an index beyond the
        memory is unseen. Reads the memory only."""
        ensemble, counts = self.ensemble.to(index.device), self.update_counts.to(index.device)
        if len(ensemble) == 0:
            return ensemble.new_zeros(len(index), ensemble.shape[1]), ensemble.new_zeros(len(index))
        inside = index < len(ensemble)
        rows = index.clamp(max=len(ensemble) - 1)
        counts = counts[rows] * inside
        seen = counts > 0
        correction = 1.0 - self.ensemble_momentum ** counts.clamp(min=1).double()
        targets = ensemble[rows] * inside.unsqueeze(1) / correction.to(ensemble.dtype).unsqueeze(1)
        return targets, seen.to(ensemble.dtype)

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """``Z <- alpha Z + (1 - alpha) z`` and ``t <- t + 1`` for the rows ``index`` only (the commit).

        Gathers ``index`` and ``probs`` from all ranks first (a no-op in one process), so every
        rank applies the same update. A repeated index gets the mean of its predictions, once.
        """
        probs = probs.detach().float()
        if self._trainer is not None:  # all_gather needs the trainer's strategy
            index = self.all_gather(index).reshape(-1)
            probs = self.all_gather(probs).reshape(len(index), -1)
        self._ensure_memory(int(index.max()) + 1 if index.numel() else 0, index.device)
        unique, inverse = torch.unique(index, return_inverse=True)
        summed = probs.new_zeros(len(unique), probs.shape[1]).index_add_(0, inverse, probs)
        hits = probs.new_zeros(len(unique)).index_add_(0, inverse, probs.new_ones(len(index)))
        mean = (summed / hits.unsqueeze(1)).to(self.ensemble.dtype)
        alpha = self.ensemble_momentum
        self.ensemble[unique] = alpha * self.ensemble[unique] + (1.0 - alpha) * mean
        self.update_counts[unique] += 1

    # --- training --------------------------------------------------------------------------
    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = batch["index"]
        targets, seen = self.ensemble_targets(index)
        probs = torch.softmax(logits["weak"].float(), dim=1)
        squared = (probs - targets).pow(2).mean(dim=1)
        self.step_state.propose(self.update_memory, index, probs.detach())
        return {"unlabeled_loss": (squared * seen).mean(), "ensemble_coverage": seen.mean()}

    # --- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["temporal_ensemble"] = {"ensemble": self.ensemble.cpu(), "update_counts": self.update_counts.cpu()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "temporal_ensemble" in checkpoint:
            memory = checkpoint["temporal_ensemble"]
            self.ensemble = memory["ensemble"].to(self.ensemble.device)
            self.update_counts = memory["update_counts"].to(self.update_counts.device)

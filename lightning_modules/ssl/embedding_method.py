"""What the similarity methods share: a projection head beside the classifier, one forward giving logits and
embeddings of the labeled batch and every unlabeled view, and one extra weighted loss term (SimMatch, CoMatch,
SimMatchV2); USB's queue-based distribution alignment towards the uniform marginal and the first epoch without
memory terms (SimMatch, CoMatch)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.ssl.distribution_alignment import distribution_alignment
from lightning_modules.ssl.memory_bank import MarginalQueue
from lightning_modules.ssl.projection import ProjectionHead, logits_and_embeddings, require_features
from lightning_modules.ssl.threshold_state import gather_rows


class EmbeddingMethod(SemiSupervisedModule):
    """Base of the methods with a projection head (CoMatch, SimMatch, SimMatchV2); a subclass writes
    ``embedding_loss`` and sets ``extra_loss_weight``, the weight of its term ``extra_loss``.

    Args:
        proj_size: embedding width (USB: 64 for CoMatch on CIFAR-10, 128 otherwise).
        projection_heads: MLPs averaged in the head (1: the papers'; 3: USB's EPASS recipes).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    #: the name of the subclass's extra loss term, and its weight
    extra_loss, extra_loss_weight = "extra_loss", 1.0

    def __init__(self, proj_size: int = 128, projection_heads: int = 1, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # its own forward (compute_losses)
        super().__init__(**kwargs)
        width = require_features(self.net, type(self).__name__, self.hparams.network)
        self.projection = ProjectionHead(width, proj_size, projection_heads)

    # --- loss ------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        if unlabeled is None:  # no unlabeled stream: supervised only
            return super().compute_losses(batch)
        images = [labeled["image"]] + [unlabeled[v] for v in self.unlabeled_views]
        logits, embeddings = logits_and_embeddings(self.net, self.projection, images, self.hparams.concat_forward)
        names = ("labeled", *self.unlabeled_views)
        losses = {"labeled_loss": self.labeled_loss(logits[0], labeled["target"])}
        losses.update(self.embedding_loss(dict(zip(names, logits)), dict(zip(names, embeddings)), labeled, unlabeled))
        return losses

    def embedding_loss(self, logits: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor],
                       labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"unlabeled_loss", <extra_loss>, <diagnostics>}`` from the logits and embeddings of the labeled
        batch (``"labeled"``) and each unlabeled view."""
        raise NotImplementedError

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise ValueError(f"{type(self).__name__}'s losses need the embeddings: call compute_losses")

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().total_loss(losses)
        if self.extra_loss in losses:
            loss = loss + self.extra_loss_weight * losses[self.extra_loss]
        return loss

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The base's modules plus the projection head, under the same weight-decay rule."""
        return super().trainable_modules() + [self.projection]


class QueueAlignedMethod(EmbeddingMethod):
    """What SimMatch and CoMatch share beyond the head: USB's queue alignment to the uniform marginal and the
    first epoch without the memory terms.

    Args:
        dist_align_length: batch means in the distribution-alignment queue (USB ``da_len``: 32); 0 turns
            alignment off.
        bank_warmup_epochs: epochs before the memory terms start (USB: 1, its ``self.epoch > 0``).
        **kwargs: :class:`EmbeddingMethod` arguments.
    """

    def __init__(self, dist_align_length: int = 32, bank_warmup_epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dist_align_length < 0:
            raise ValueError(f"dist_align_length must be 0 (no alignment) or positive, got {dist_align_length}")
        if bank_warmup_epochs < 0:
            raise ValueError(f"bank_warmup_epochs must be 0 or more, got {bank_warmup_epochs}")
        self.bank_warmup_epochs = bank_warmup_epochs
        self.dist_align = MarginalQueue(dist_align_length, self.hparams.num_classes) if dist_align_length else None

    def aligned_probs(self, weak_logits: torch.Tensor) -> torch.Tensor:
        """``softmax`` of the weak view, aligned to the uniform marginal by the queue with this step's batch
        mean (every rank's), which it proposes for the queue."""
        probs = torch.softmax(weak_logits.detach().float(), dim=1)
        if self.dist_align is None:
            return probs
        batch_mean = gather_rows(self, probs).mean(dim=0)
        self.step_state.propose(self.dist_align.update_, batch_mean[None])
        uniform = torch.full_like(batch_mean, 1.0 / len(batch_mean))
        return distribution_alignment(probs, self.dist_align.marginal(batch_mean), uniform)

    def bank_warmed_up(self) -> bool:
        """USB's ``self.epoch > 0``: the memory terms start with the second epoch (1024 steps in the recipes)."""
        return self.current_epoch >= self.bank_warmup_epochs

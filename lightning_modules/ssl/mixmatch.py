"""MixMatch (Berthelot, Carlini, Goodfellow, Papernot, Oliver and Raffel, NeurIPS 2019, "MixMatch:
A Holistic Approach to Semi-Supervised Learning")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.core.batch_norm import frozen_buffers
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_criterion, refuse_rdrop
from lightning_modules.ssl.losses import RAMPUP_STEPS_1_OF_64, masked_accuracy, mixup, sharpen


class MixMatch(SemiSupervisedModule):
    """Sharpened guesses over K weak views, then mixup of labeled and unlabeled images together.

    Guess: ``q_b = Sharpen(1/K sum_k softmax(logits(weak_k(u_b))), T)``, no gradient through ``q``.
    Mix: ``W = shuffle(concat(X, U))`` with ``X`` the labeled images with one-hot targets and ``U``
    the ``K * uB`` unlabeled views each with its guess; ``X' = MixUp(X, W[:B])`` and
    ``U' = MixUp(U, W[B:])`` with ``lam' = max(lam, 1 - lam)``, ``lam ~ Beta(alpha, alpha)``.
    Loss: ``L = 1/B sum_{X'} H(p', p(y | x')) + lambda_u * 1/(C K uB) sum_{U'} ||q' - p(y | u')||^2``.

    Implementation of the mix: one ``lam`` and one random permutation of the whole concatenation
    (:func:`lightning_modules.ssl.losses.mixup`), then the first ``B`` rows form ``X'`` and the rest
    ``U'``: the same operation as the paper's shuffle-then-pair, written once. One ``lam`` per step
    is USB's choice (``algorithms/utils/ops.py`` lines 48-63); the official code draws one per sample
    (google-research/mixmatch ``libml/layers.py`` line 168). The step is pinned to USB's
    ``algorithms/mixmatch/mixmatch.py`` by ``tests/lightning_modules/ssl/test_ssl_references.py``.

    Paper recipe (CIFAR-10, WRN-28-2): K = 2, T = 0.5, alpha = 0.75, lambda_u = 75 ramped up
    linearly over the first 16,000 steps (the official code ramps over 1024 kimg, i.e. 16,384 steps
    of 64 labeled images: the default ``rampup_steps``), B = 64, one unlabeled image per labeled
    one (``--data.uratio 1``). The paper optimizes with Adam (lr 0.002, decoupled weight decay
    0.02 * lr per step, EMA 0.999 for evaluation); the defaults here keep the shared SGD / cosine /
    EMA 0.999 recipe of USB and TorchSSL, whose WRN-28-2 errors the configs compare against. USB's classic config differs: alpha 0.5 and a ramp over 40 % of training.

    BatchNorm: the guess forward runs in training mode under ``no_grad`` inside
    :func:`lightning_modules.core.batch_norm.frozen_buffers`, so it does not move the running statistics; with
    ``concat_forward`` the whole mixed batch (``B + K uB`` images) then goes through one forward,
    so BatchNorm sees labeled and unlabeled mixtures together and updates its statistics once. The
    official code instead interleaves the batch into ``K + 1`` chunks of labeled-like size, each
    with a share of labeled rows, and forwards them separately (a trick for BatchNorm across
    several devices); one concatenated forward gives BatchNorm the same mix without the shuffle.
    ``concat_forward=False`` forwards the labeled part and each view's part separately.

    After each step ``last_split`` holds ``(B, K * uB)``, the sizes of ``X'`` and ``U'``.

    Args:
        temperature: sharpening temperature T.
        mixup_alpha: alpha of the Beta distribution of the mixup coefficient.
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "weak2")

    def __init__(
        self,
        temperature: float = 0.5,
        mixup_alpha: float = 0.75,
        unlabeled_loss_weight: float = 75.0,
        rampup: str | None = "linear",
        rampup_steps: int = RAMPUP_STEPS_1_OF_64,
        **kwargs: Any,
    ) -> None:
        # its labeled loss is the cross-entropy to mixed soft targets, in its own forward
        refuse_criterion(type(self).__name__, kwargs.get("criterion", "ce"))
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if mixup_alpha <= 0:
            raise ValueError(f"mixup_alpha must be positive, got {mixup_alpha}")
        self.temperature, self.mixup_alpha = temperature, mixup_alpha
        self.last_split: tuple[int, int] | None = None

    @torch.no_grad()
    def guess_labels(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Sharpened mean of the softmax over the K views; running statistics left untouched."""
        with frozen_buffers(self.net):
            logits = self.forward_views(views)
        mean = torch.stack([torch.softmax(x.float(), dim=1) for x in logits]).mean(dim=0)
        return sharpen(mean, self.temperature)

    def mix(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The mixed inputs and targets of a step, and the guesses; rows ``[:B]`` are ``X'``, ``[B:]`` ``U'``."""
        views = [unlabeled[v] for v in self.unlabeled_views]
        guess = self.guess_labels(views)
        one_hot = F.one_hot(labeled["target"], guess.shape[1]).to(guess.dtype)
        inputs = torch.cat([labeled["image"]] + views)
        targets = torch.cat([one_hot] + [guess] * len(views))
        mixed_inputs, mixed_targets, lam = mixup(inputs, targets, self.mixup_alpha)
        return {"inputs": mixed_inputs, "targets": mixed_targets, "lam": lam, "guess": guess,
                "split": (len(labeled["image"]), sum(len(v) for v in views))}

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        if unlabeled is None:
            return super().compute_losses(batch)
        mixed = self.mix(labeled, unlabeled)
        num_labeled, num_unlabeled = self.last_split = mixed["split"]
        view_sizes = [len(unlabeled[v]) for v in self.unlabeled_views]
        pieces = list(mixed["inputs"].split([num_labeled] + view_sizes))
        logits = self.forward_views(pieces)
        labeled_logits, unlabeled_logits = logits[0].float(), torch.cat(logits[1:]).float()
        labeled_targets, unlabeled_targets = mixed["targets"].split([num_labeled, num_unlabeled])
        guess = mixed["guess"]
        return {
            "labeled_loss": -(labeled_targets * F.log_softmax(labeled_logits, dim=1)).sum(dim=1).mean(),
            "unlabeled_loss": F.mse_loss(torch.softmax(unlabeled_logits, dim=1), unlabeled_targets),
            "mixup_lambda": mixed["lam"],
            "guess_confidence": guess.max(dim=1).values.mean(),
            "guess_acc": masked_accuracy(guess.argmax(dim=1), unlabeled["target"], torch.ones_like(guess[:, 0])),
        }

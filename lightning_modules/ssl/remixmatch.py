"""ReMixMatch (Berthelot et al., ICLR 2020, "ReMixMatch: Semi-Supervised Learning with
Distribution Alignment and Augmentation Anchoring")."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_modules.core.batch_norm import frozen_buffers
from lightning_modules.core.optimization import RAMPUPS
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_criterion, refuse_rdrop
from lightning_modules.ssl.distribution_alignment import distribution_alignment
from lightning_modules.ssl.losses import RAMPUP_STEPS_1_OF_64, masked_accuracy, mixup, sharpen


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_c targets_ic log softmax(logits_i)_c`` for soft (probability) targets."""
    return -(targets * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def rotate_batch(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` by ``rotations[i] * 90`` degrees (counter-clockwise); images must be square."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(images.shape[-2:])}")
    out = images.clone()
    for k in range(1, 4):
        rows = rotations == k
        if rows.any():
            out[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
    return out


def _mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over all processes; ``value`` itself in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


class ReMixMatch(SemiSupervisedModule):
    """MixMatch with distribution alignment, augmentation anchoring and a rotation task.

    Per step, with ``B`` labeled images ``x`` (weak view, one-hot ``y``) and ``mu B`` unlabeled images:

    1. Guess (no gradient, BatchNorm's running statistics untouched): ``p = softmax(f(weak(u)))``;
       distribution alignment ``p~ = normalize(p * (p_labeled + 1e-6) / (p_model + 1e-6))``,
       ``p_model`` the mean of ``p`` over the last ``dist_align_window`` batches (all-reduced over
       processes, this batch included; the ring records it once, after the optimizer step);
       ``q = sharpen(p~, T)``.
    2. Augmentation anchoring: ``q`` is the target of the weak view and of every strong view.
    3. Mixup (one ``lam ~ Beta(alpha, alpha)`` per step, ``lam' = max(lam, 1 - lam)``) of
       ``[x, strong(u), strong2(u), weak(u)]`` with a shuffle of itself, targets ``[y, q, q, q]``;
       the first ``B`` rows are ``X'``, the rest ``U'``.
    4. ``L = H(y', f(X')) + lambda_u H(q', f(U')) + lambda_u1 H(q, f(strong(u))) + lambda_r H(r, g(rot_r(strong(u))))``
       with ``H`` the soft cross-entropy (mean over rows) and ``g`` a linear rotation head on the
       network's pooled features predicting the rotation ``r`` in {0, 90, 180, 270} degrees.

    ``lambda_u`` is ``unlabeled_loss_weight``; the base's ``rampup`` ramps both ``lambda_u`` and
    ``lambda_u1`` (not ``lambda_r``).

    Against the authors' code: steps 1-4 are USB's ``semilearn/algorithms/remixmatch/remixmatch.py``
    (lines 120-134 the guess with BatchNorm frozen, 147-152 the mix of labeled, both strong and the
    weak view, 179-198 the losses); google-research/remixmatch ``remixmatch_no_cta.py`` (lines
    111-126) likewise mixes all K + 1 unlabeled views; ``tests/lightning_modules/ssl/test_ssl_references.py``
    pins one step to USB's. Where the two differ we choose:

    * ``p_model``: the paper's "last 128 batches" as a ring over the batches seen so far (the
      official ``layers.PMovingAverage`` pads its ring with uniform rows and updates after the
      step; USB's ReMixMatch uses an EMA with momentum 0.999 started at the first batch, which
      our ring equals on the first step).
    * mixup draws one ``lam`` per step (USB ``algorithms/utils/ops.py`` lines 48-63); the
      official code draws one per sample.
    * BatchNorm: with ``concat_forward`` the mixed batch, the strong view and the rotated images
      go through one forward and update the running statistics once (USB updates them from the
      first labeled-size chunk only, the official code from its last interleaved chunk).
      ``concat_forward=False`` forwards ``X'``, each view's part of ``U'``, the strong view and
      the rotated images separately, which for ``mu = 1`` is USB's chunking.

    Departures from the paper: the strong views are the DataModule's RandAugment + Cutout, not
    CTAugment; the optimizer is the base's SGD recipe (as in TorchSSL/USB), not Adam.

    Recipe (CIFAR-10, 4000 labels, WRN-28-2): T = 0.5, alpha = 0.75, lambda_u = 1.5,
    lambda_u1 = 0.5, lambda_r = 0.5, two strong views, mu = 1 (``--data.uratio``), B = 64,
    lambda ramp-up over the first 1/64 of training.

    Args:
        temperature: sharpening temperature T.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup.
        strong_loss_weight: lambda_u1, weight of the un-mixed strong-view loss.
        rotation_loss_weight: lambda_r; 0 disables the rotation head (needed for networks that do
            not expose ``forward_features`` and ``num_features``, e.g. torchvision or timm models).
        dist_align: use distribution alignment.
        dist_align_target: ``"labeled"`` (class marginal of the DataModule's labeled targets,
            ``data_facts.labeled_marginal`` at fit start; uniform without them) or ``"uniform"``.
        dist_align_window: number of recent batches whose mean prediction forms ``p_model``.
        unlabeled_loss_weight: lambda_u (1.5 here).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak", "strong", "strong2")

    def __init__(
        self,
        temperature: float = 0.5,
        mixup_alpha: float = 0.75,
        strong_loss_weight: float = 0.5,
        rotation_loss_weight: float = 0.5,
        dist_align: bool = True,
        dist_align_target: str = "labeled",
        dist_align_window: int = 128,
        unlabeled_loss_weight: float = 1.5,
        rampup: str | None = "linear",
        rampup_steps: int = RAMPUP_STEPS_1_OF_64,  # USB remixmatch_cifar10 unsup_warm_up 0.015625
        **kwargs: Any,
    ) -> None:
        # its labeled loss is the cross-entropy to mixed soft targets, in its own forward
        refuse_criterion(type(self).__name__, kwargs.get("criterion", "ce"))
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if dist_align_target not in ("labeled", "uniform"):
            raise ValueError(f"dist_align_target must be 'labeled' or 'uniform', got {dist_align_target!r}")
        if dist_align_window < 1:
            raise ValueError(f"dist_align_window must be at least 1, got {dist_align_window}")
        self.temperature, self.mixup_alpha = temperature, mixup_alpha
        self.strong_loss_weight, self.rotation_loss_weight = strong_loss_weight, rotation_loss_weight
        self.dist_align, self.dist_align_target = dist_align, dist_align_target
        num_classes = self.hparams.num_classes
        if rotation_loss_weight > 0:
            if not (hasattr(self.net, "forward_features") and hasattr(self.net, "num_features")):
                raise ValueError(
                    f"ReMixMatch's rotation loss needs a network with forward_features() and num_features "
                    f"(the wrn* networks); {self.hparams.network!r} has neither. Pass rotation_loss_weight=0 "
                    f"to train without it."
                )
            self.rotation_head: nn.Module | None = nn.Linear(self.net.num_features, 4)
        else:
            self.rotation_head = None
        # Distribution-alignment state. Buffers, so checkpoints carry them; every rank commits the same
        # all-reduced batch mean after the optimizer step, so DDP's broadcast from rank 0 changes nothing.
        self.register_buffer("da_target", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("da_history", torch.zeros(dist_align_window, num_classes))
        self.register_buffer("da_count", torch.zeros((), dtype=torch.long))

    # --- distribution alignment ------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.dist_align_target == "labeled":
            self.da_target.copy_(self.labeled_class_marginal())

    def labeled_class_marginal(self) -> torch.Tensor:
        """Class frequencies of the DataModule's labeled split (its facts, received in ``setup``); uniform without."""
        marginal = self.data_facts.labeled_marginal if self.data_facts is not None else None
        if marginal is None:
            num_classes = self.hparams.num_classes
            return torch.full((num_classes,), 1.0 / num_classes, device=self.da_target.device)
        return marginal.to(self.da_target.device)

    def model_marginal(self, batch_mean: torch.Tensor | None = None) -> torch.Tensor:
        """``p_model``: mean of the committed per-batch mean predictions, plus ``batch_mean`` as the newest
        when given (uniform before the first); writes nothing."""
        history, count = self.da_history, int(self.da_count)
        if batch_mean is not None:
            history = history.clone()
            history[count % len(history)] = batch_mean
            count += 1
        filled = min(count, len(history))
        if filled == 0:
            return torch.full_like(self.da_target, 1.0 / len(self.da_target))
        return history[:filled].mean(dim=0)

    @torch.no_grad()
    def update_model_marginal(self, batch_means: torch.Tensor) -> None:
        """The commit: store the step's mean prediction (the mean of its micro-batches' rows) in the ring."""
        self.da_history[int(self.da_count) % len(self.da_history)] = batch_means.mean(dim=0)
        self.da_count += 1

    @torch.no_grad()
    def guess_labels(self, weak_logits: torch.Tensor) -> torch.Tensor:
        """Targets for the unlabeled images: aligned (with this batch's mean, proposed for the ring) and sharpened."""
        probs = torch.softmax(weak_logits.detach().float(), dim=1)
        if self.dist_align:
            batch_mean = _mean_across_ranks(probs.mean(dim=0))
            self.step_state.propose(self.update_model_marginal, batch_mean[None])
            probs = distribution_alignment(probs, self.model_marginal(batch_mean), self.da_target)
        return sharpen(probs, self.temperature)

    # --- losses ----------------------------------------------------------------------------
    def _ramp(self) -> float:
        if self.hparams.rampup is None:
            return 1.0
        return RAMPUPS[self.hparams.rampup](self.global_step, self.hparams.rampup_steps)

    def _forward(self, images: list[torch.Tensor], rotated: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Class logits of each batch in ``images`` and rotation logits of ``rotated``, concatenated or not."""
        if rotated is None:
            return self.forward_views(images), None
        net = self.net
        if self.hparams.concat_forward:
            sizes = [len(x) for x in images]
            features = net.forward_features(torch.cat(images + [rotated]))
            class_features, rot_features = features.split([sum(sizes), len(rotated)])
            return list(net.fc(class_features).split(sizes)), self.rotation_head(rot_features)
        return [net(x) for x in images], self.rotation_head(net.forward_features(rotated))

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        if unlabeled is None:  # no unlabeled stream: supervised cross-entropy only
            return {"labeled_loss": self.labeled_loss(self.net(labeled["image"]), labeled["target"])}
        strong = unlabeled["strong"]
        with torch.no_grad(), frozen_buffers(self.net):  # the guess must not move BatchNorm's statistics
            guess = self.guess_labels(self.net(unlabeled["weak"]))

        # USB's order: labeled, both strong views, then the weak view, all anchored to the guess.
        inputs = [labeled["image"], strong, unlabeled["strong2"], unlabeled["weak"]]
        one_hot = F.one_hot(labeled["target"], self.hparams.num_classes).to(guess.dtype)
        mixed_x, mixed_y, lam = mixup(torch.cat(inputs), torch.cat([one_hot, guess, guess, guess]), self.mixup_alpha)
        sizes = [len(x) for x in inputs]

        rotated = rotations = None
        if self.rotation_head is not None:
            rotations = torch.randint(0, 4, (len(strong),), device=strong.device)
            rotated = rotate_batch(strong, rotations)
        logits, rotation_logits = self._forward(list(mixed_x.split(sizes)) + [strong], rotated)
        mixed_logits, strong_logits = torch.cat(logits[:-1]), logits[-1]

        num_labeled = sizes[0]
        losses = {
            "labeled_loss": soft_cross_entropy(mixed_logits[:num_labeled], mixed_y[:num_labeled]),
            "unlabeled_loss": soft_cross_entropy(mixed_logits[num_labeled:], mixed_y[num_labeled:]),
            "strong_loss": soft_cross_entropy(strong_logits, guess),
        }
        if rotation_logits is not None:
            losses["rotation_loss"] = F.cross_entropy(rotation_logits.float(), rotations)
            losses["rotation_acc"] = (rotation_logits.detach().argmax(1) == rotations).float().mean()
        ones = torch.ones_like(guess[:, 0])
        losses["pseudo_label_acc"] = masked_accuracy(guess.argmax(1), unlabeled["target"], ones)
        losses["mixup_lambda"] = lam.detach().float()
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = losses["labeled_loss"]
        if "unlabeled_loss" in losses:
            loss = loss + self.unlabeled_weight() * losses["unlabeled_loss"]
            loss = loss + self._ramp() * self.strong_loss_weight * losses["strong_loss"]
        if "rotation_loss" in losses:
            loss = loss + self.rotation_loss_weight * losses["rotation_loss"]
        return loss

    # --- optimization ----------------------------------------------------------------------
    def trainable_modules(self) -> list[torch.nn.Module]:
        """The base's modules plus the rotation head, under the same weight-decay rule."""
        head = [] if self.rotation_head is None else [self.rotation_head]
        return super().trainable_modules() + head

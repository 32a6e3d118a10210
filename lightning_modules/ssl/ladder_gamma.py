"""The Ladder Network's Gamma model (Rasmus et al., NIPS 2015, Sec. 3 "Gamma-model": the top layer's
reconstruction only, the paper's Conv-Small / Conv-Large Gamma) on any of our networks.

The corrupted pass adds ``N(0, sigma^2)`` to the input and to the output of every BatchNorm layer; the top's
``z`` is the network's logits normalized over the batch. With ``z = BN(logits(u))`` of the clean pass on the
unlabeled batch, ``logits~`` the corrupted pass's logits, and the vanilla combinator ``g`` of
:mod:`lightning_modules.ssl.ladder`::

    L = CE(y, softmax(logits~(x_l))) + lambda * 1/(N C) sum_n || (z^(n) - mean) / std - z(n) ||^2
    z~ = BN(logits~(u)) + n,   u_top = BN(softmax(logits~(u))),   z^ = g(z~, u_top)

``mean`` and ``std`` are the clean pass's batch statistics of the logits (CuriousAI/ladder ``ladder.py`` lines
234-246, decoder spec ``0-...-0-gauss``: only the top ``g``). The clean unlabeled pass updates the running
statistics used for prediction; the corrupted passes leave them alone. Deviations, because our networks are
not built as ladders: the noise is added after each BatchNorm's scale and shift (a forward hook) where the paper
adds it between normalization and scale, and the top's ``z`` is the logits normalized here (the paper's top
layer has a BatchNorm of its own), whose noise ``n`` reaches the combinator but not ``softmax(logits~)``.

Defaults: the paper's CIFAR-10 Conv-Large Gamma (CuriousAI/ladder README, ``cifar_4k_gamma``): lambda 4.0,
noise std 0.3, Adam lr 0.002 decayed linearly to 0 over the last 14 % (``--lrate-decay 0.86``), no EMA, no
augmentation of the unlabeled images.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.core.batch_norm import frozen_buffers
from lightning_modules.ssl.ladder import EPS, LadderAdam, VanillaCombinator, batch_normalize


@contextlib.contextmanager
def batch_norm_noise(net: nn.Module, noise_std: float) -> Iterator[int]:
    """Inside the block every BatchNorm layer of ``net`` adds ``N(0, noise_std^2)`` to its output; yields how
    many layers it found."""
    layers = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    handles = [m.register_forward_hook(lambda module, inputs, output: output + noise_std * torch.randn_like(output))
               for m in layers]
    try:
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()


class LadderGamma(LadderAdam, SemiSupervisedModule):
    """The ladder's Gamma model over any network with BatchNorm layers (the module docstring has the equations).

    Args:
        noise_std: std of the Gaussian noise on the input, on every BatchNorm output and on the top's ``z~``.
        unlabeled_loss_weight: lambda, the weight of the top layer's denoising cost.
        decay_start: fraction of the run after which Adam's learning rate falls linearly to 0.
        lr, weight_decay, ema_decay: Adam's and the evaluation EMA's (paper: 0.002, 0, none).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("plain",)  # the paper trains on unaugmented images
    supports_concat_forward = False  # labeled and unlabeled images are normalized separately, as the ladder's
    progress_bar_terms = ()

    def __init__(self, noise_std: float = 0.3, unlabeled_loss_weight: float = 4.0, decay_start: float = 0.86,
                 lr: float = 0.002, weight_decay: float = 0.0, ema_decay: float | None = None,
                 concat_forward: bool = False, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))
        if noise_std < 0 or not 0 <= decay_start <= 1:
            raise ValueError(f"noise_std must be >= 0 and decay_start in [0, 1], got {noise_std} and {decay_start}")
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, lr=lr, weight_decay=weight_decay,
                         ema_decay=ema_decay, concat_forward=concat_forward, **kwargs)
        if not any(isinstance(m, _BatchNorm) for m in self.net.modules()):
            raise ValueError(f"LadderGamma corrupts every BatchNorm layer's output, and network={self.hparams.network!r} "
                             "has none: pick a network with BatchNorm (wrn28_2, resnet18, ...) or LadderNetwork's mlp")
        self.combinator = VanillaCombinator(self.hparams.num_classes)

    def trainable_modules(self) -> list[nn.Module]:
        return super().trainable_modules() + [self.combinator]

    def corrupted_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The corrupted pass: noise on the input and every BatchNorm output; running statistics untouched."""
        std = self.hparams.noise_std
        with frozen_buffers(self.net), batch_norm_noise(self.net, std):
            return self.net(images + std * torch.randn_like(images))

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        losses = {"labeled_loss": self.labeled_loss(self.corrupted_logits(labeled["image"]), labeled["target"])}
        if unlabeled is None:
            return losses
        images = unlabeled[self.unlabeled_views[0]]
        clean = self.net(images).float()  # updates the running statistics, as the clean encoder
        noisy = self.corrupted_logits(images).float()
        mean, var = clean.mean(0), clean.var(0, unbiased=False)
        target = (clean - mean) / torch.sqrt(var + EPS)
        noisy_z = batch_normalize(noisy) + self.hparams.noise_std * torch.randn_like(noisy)
        estimate = self.combinator(noisy_z, batch_normalize(torch.softmax(noisy, dim=1)))
        losses["unlabeled_loss"] = ((estimate - mean) / torch.sqrt(var + EPS) - target).pow(2).mean()
        return losses

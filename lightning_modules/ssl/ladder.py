"""Ladder Network (Rasmus, Berglund, Honkala, Valpola & Raiko, NIPS 2015, "Semi-Supervised Learning with
Ladder Networks"), the fully connected model of its MNIST experiments.

Encoder (Algorithm 1), run clean and corrupted with the same weights: ``z~(0) = x + n``, and per layer l
``z~(l) = BN(W(l) h~(l-1)) + n``, ``h~(l) = relu(z~(l) + beta(l))``, at the top ``softmax(gamma * (z~(L) + beta(L)))``,
``n ~ N(0, sigma^2)``. Decoder, top down: ``u(L) = BN(h~(L))``, ``u(l) = BN(V(l+1) z^(l+1))`` and the vanilla
combinator per unit, ``z^ = (z~ - mu(u)) v(u) + mu(u)`` with ``mu = a1 sigmoid(a2 u + a3) + a4 u + a5`` and
``v = a6 sigmoid(a7 u + a8) + a9 u + a10`` (Eq. 2; the authors' ``gauss`` decoder, CuriousAI/ladder
``ladder.py`` lines 569-590, initialized as there: a2 = a7 = 1, the rest 0). The loss::

    L = CE(y, softmax(logits~(x_l))) + sum_l lambda_l / (N m_l) sum_n || z^(l)_BN(n) - z(l)(n) ||^2

with ``z(l)`` the clean pass's normalized ``z`` on the unlabeled batch and ``z^_BN = (z^ - mean) / std``
normalized by that clean pass's batch statistics (``ladder.py`` lines 234-246, ``zestbn='bugfix'``; layer 0,
the input, is compared unnormalized). As in the authors' code, the targets are not detached, labeled and
unlabeled images are normalized by their own batch statistics (separate passes, ``ladder.py`` lines 364-385),
and the reconstruction is on the unlabeled batch only. Prediction is the clean encoder with running BatchNorm
statistics; they are updated from the clean unlabeled pass (the authors keep them from the clean labeled pass
and re-estimate them after training, ``run.py`` lines 313-330).

Which networks: the encoder is the paper's multilayer perceptron (``network: mlp``), built here because the
ladder needs each layer's normalized pre-activation before its scale, shift and nonlinearity; a WRN or timm
network exposes no such points, and the convolutional ladders (the paper's Conv-Large / Conv-Small Gamma)
are not built. Images are flattened: ``input_features`` is C*H*W (64 for digits, 3072 for CIFAR). The paper's
Gamma model on this encoder (only the top layer reconstructed, the authors' ``mnist_100_gamma``) is
``denoising_weights: [0, 0, 0, 0, 0, 0, 0.5]``; on any network with BatchNorm it is ``LadderGamma`` (``ladder_gamma.py``).

Defaults reproduce the paper's MNIST 100-label recipe (README of CuriousAI/ladder, ``mnist_100_full``):
layers 784-1000-500-250-250-250-10, noise std 0.3 (``run.py`` ``--super-noise-std``, ``--f-local-noise-std``),
lambda = 1000, 10, 0.1, 0.1, 0.1, 0.1, 0.1, Adam lr 0.002 decayed linearly to 0 over the last third
(``--lrate-decay 0.67``), batch 100, no weight decay, raw weights evaluated (no EMA), no augmentation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop

EPS = 1e-10  # the authors' variance epsilon (ladder.py line 385)


def batch_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the batch, biased variance, no parameters."""
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + EPS)


class LadderEncoder(nn.Module):
    """The ladder's fully connected encoder; ``forward`` is the clean pass and returns logits."""

    def __init__(self, num_classes: int, in_channels: int = 1, input_features: int = 784,
                 hidden_sizes: Sequence[int] = (1000, 500, 250, 250, 250), bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.sizes = [input_features, *hidden_sizes, num_classes]
        pairs = list(zip(self.sizes[:-1], self.sizes[1:]))
        self.weights = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        # Running statistics only: the clean pass's at evaluation; scale and shift are beta and gamma.
        self.norms = nn.ModuleList(nn.BatchNorm1d(b, eps=EPS, momentum=bn_momentum, affine=False) for _, b in pairs)
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(b)) for _, b in pairs)
        self.gamma = nn.Parameter(torch.ones(num_classes))  # at the softmax only: ReLU needs none (top_c)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images, update_stats=True)[2]

    def encode(self, images: torch.Tensor, noise_std: float = 0.0, update_stats: bool = False
               ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor] | None], torch.Tensor]:
        """``([z(0), ..., z(L)], [(mean, var) of each layer's batch], logits)``; noise when ``noise_std > 0``."""
        h = images.flatten(1)
        if h.shape[1] != self.sizes[0]:
            raise ValueError(f"the ladder's encoder takes {self.sizes[0]} input values per image, got images of "
                             f"shape {tuple(images.shape[1:])} ({h.shape[1]} values): set input_features to C*H*W")
        h = h + noise_std * torch.randn_like(h) if noise_std else h
        zs, stats = [h], []
        for layer, (weight, norm, beta) in enumerate(zip(self.weights, self.norms, self.betas)):
            pre = weight(h)
            if self.training:
                mean, var = pre.mean(0), pre.var(0, unbiased=False)
                z = (pre - mean) / torch.sqrt(var + EPS)
                if update_stats:
                    with torch.no_grad():
                        norm(pre)  # running statistics for evaluation
                stats.append((mean, var))
            else:
                z = norm(pre)
                stats.append(None)
            z = z + noise_std * torch.randn_like(z) if noise_std else z
            zs.append(z)
            top = layer == len(self.weights) - 1
            h = (z + beta) * self.gamma if top else F.relu(z + beta)
        return zs, stats, h


class VanillaCombinator(nn.Module):
    """``g(z~, u) = (z~ - mu(u)) v(u) + mu(u)``, ten parameters per unit (the paper's Eq. 2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.ParameterList(nn.Parameter(torch.full((width,), 1.0 if k in (1, 6) else 0.0)) for k in range(10))

    def forward(self, noisy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        a = self.a
        mu = a[0] * torch.sigmoid(a[1] * u + a[2]) + a[3] * u + a[4]
        v = a[5] * torch.sigmoid(a[6] * u + a[7]) + a[8] * u + a[9]
        return (noisy - mu) * v + mu


class LadderDecoder(nn.Module):
    """Top-down denoising: the estimates ``z^(l)`` for l = 0..L from the corrupted ``z~(l)`` (lateral) and
    the layer above (vertical, ``V(l+1)``)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.vertical = nn.ModuleList(nn.Linear(above, below, bias=False) for below, above in zip(sizes[:-1], sizes[1:]))
        self.combinators = nn.ModuleList(VanillaCombinator(width) for width in sizes)

    def forward(self, noisy_zs: list[torch.Tensor], noisy_output: torch.Tensor) -> list[torch.Tensor]:
        estimates: list[torch.Tensor] = [noisy_output] * len(noisy_zs)
        u = batch_normalize(noisy_output)
        for layer in reversed(range(len(noisy_zs))):
            if layer < len(noisy_zs) - 1:
                u = batch_normalize(self.vertical[layer](estimates[layer + 1]))
            estimates[layer] = self.combinators[layer](noisy_zs[layer], u)
        return estimates


def denoising_costs(clean_zs: list[torch.Tensor], clean_stats: list, estimates: list[torch.Tensor]) -> list[torch.Tensor]:
    """``1/(N m_l) sum_n ||z^_BN(l)(n) - z(l)(n)||^2`` per layer; the estimates above the input are normalized
    by the clean pass's batch mean and variance."""
    costs = []
    for layer, (target, estimate) in enumerate(zip(clean_zs, estimates)):
        if layer > 0:
            mean, var = clean_stats[layer - 1]
            estimate = (estimate - mean) / torch.sqrt(var + EPS)
        costs.append((estimate - target).pow(2).mean())
    return costs


class LadderAdam:
    """The ladder's optimizer, mixed in before the base: Adam, its learning rate decayed linearly to 0 after
    ``decay_start`` of the run (CuriousAI/ladder ``run.py`` lines 497-499, ``--lrate-decay``)."""

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def lr_schedule(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        start = self.hparams.decay_start * total
        factor = lambda k: 1.0 if k < start else max(0.0, (total - k) / max(1.0, total - start))  # noqa: E731
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


class LadderNetwork(LadderAdam, SemiSupervisedModule):
    """The Ladder Network: CE of the corrupted encoder on labeled images plus the weighted per-layer
    denoising cost on unlabeled ones (the module docstring has the equations and the recipe).

    Args:
        network: ``"mlp"``, the only encoder a full ladder is built on (see the module docstring).
        input_features: values per image, C*H*W (784 for MNIST, 64 for digits, 3072 for CIFAR).
        hidden_sizes: widths of the hidden layers.
        noise_std: std of the Gaussian corruption added to the input and to every normalized ``z``.
        denoising_weights: lambda_l for layers 0 (input) .. L (the logits): ``len(hidden_sizes) + 2`` values.
        decay_start: fraction of the run after which Adam's learning rate falls linearly to 0.
        lr, weight_decay, ema_decay: Adam's and the evaluation EMA's (paper: 0.002, 0, none).
        **kwargs: :class:`SemiSupervisedModule` arguments (``network_kwargs`` may set ``bn_momentum``).
    """

    unlabeled_views = ("plain",)  # the paper trains on unaugmented images
    supports_concat_forward = False  # labeled and unlabeled images are normalized separately
    progress_bar_terms = ("denoising_cost_0",)

    def __init__(self, network: str = "mlp", input_features: int = 784,
                 hidden_sizes: Sequence[int] = (1000, 500, 250, 250, 250), noise_std: float = 0.3,
                 denoising_weights: Sequence[float] = (1000.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.1),
                 decay_start: float = 0.67, lr: float = 0.002, weight_decay: float = 0.0,
                 ema_decay: float | None = None, concat_forward: bool = False, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))
        if network != "mlp":
            raise ValueError(f"LadderNetwork builds its own fully connected encoder (network: mlp), got "
                             f"network={network!r}: a ladder needs every layer's normalized pre-activation, which "
                             "a WRN or timm network does not expose; LadderGamma is the top-layer Gamma model on any such network")
        if len(denoising_weights) != len(hidden_sizes) + 2:
            raise ValueError(f"denoising_weights needs one lambda per layer, input and logits included: "
                             f"{len(hidden_sizes) + 2} values for hidden_sizes={list(hidden_sizes)}, got "
                             f"{list(denoising_weights)}")
        if noise_std < 0 or not 0 <= decay_start <= 1:
            raise ValueError(f"noise_std must be >= 0 and decay_start in [0, 1], got {noise_std} and {decay_start}")
        hidden_sizes, denoising_weights = list(hidden_sizes), list(denoising_weights)  # hparams as the CLI has them
        super().__init__(network=network, lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
                         concat_forward=concat_forward, **kwargs)
        self.decoder = LadderDecoder(self.net.sizes)

    def build_net(self) -> nn.Module:
        hp = self.hparams
        return LadderEncoder(hp.num_classes, hp.in_channels, hp.input_features, hp.hidden_sizes,
                             **(hp.network_kwargs or {}))

    def trainable_modules(self) -> list[nn.Module]:
        return super().trainable_modules() + [self.decoder]

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        hp, labeled, unlabeled = self.hparams, batch["labeled"], batch.get("unlabeled")
        _, _, noisy_logits = self.net.encode(labeled["image"], hp.noise_std)
        losses = {"labeled_loss": self.labeled_loss(noisy_logits, labeled["target"])}
        if unlabeled is None:
            return losses
        images = unlabeled[self.unlabeled_views[0]]
        clean_zs, clean_stats, _ = self.net.encode(images, update_stats=True)
        noisy_zs, _, noisy_logits = self.net.encode(images, hp.noise_std)
        costs = denoising_costs(clean_zs, clean_stats, self.decoder(noisy_zs, torch.softmax(noisy_logits, dim=1)))
        losses["unlabeled_loss"] = sum(weight * cost for weight, cost in zip(hp.denoising_weights, costs))
        losses.update({f"denoising_cost_{layer}": cost.detach() for layer, cost in enumerate(costs)})
        return losses

"""MultiMatch's pieces without state or Lightning: the network with several classifier heads, the pseudo-margin
(APM) observation, the agreement of two heads' pseudo-labels and the per-class APM cutoffs
(:mod:`lightning_modules.ssl.multimatch` keeps the state and the loss; USB lines cited there)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.ssl.projection import require_features


class MultiHeadNet(nn.Module):
    """A backbone whose linear classifier is replaced by ``num_heads`` heads ``Linear(d, h) -> GELU -> Linear(h, C)``
    on its pooled features (``h = d``, or ``d // num_heads`` with ``narrow``: USB's ``adjust_clf_size``).

    ``forward(x)`` is the mean of the heads' logits (evaluation, prediction); ``forward(x, all_heads=True)`` gives
    every head's, ``(num_heads, N, C)``. The backbone's own ``fc`` becomes the identity: it would get no gradient
    (DDP refuses unused parameters) and its weights would only confuse a reader of the checkpoint.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_heads: int, narrow: bool = False,
                 network: str = "") -> None:
        super().__init__()
        width = require_features(backbone, "MultiMatch", network)
        hidden = max(1, width // num_heads) if narrow else width
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
            for _ in range(num_heads))

    def forward(self, images: torch.Tensor, all_heads: bool = False) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        logits = torch.stack([head(features) for head in self.heads])
        return logits if all_heads else logits.mean(dim=0)


def other_heads(num_heads: int) -> list[tuple[int, int, int]]:
    """``(h, j, k)``: head ``h`` learns from the agreement of the two other heads ``j < k`` (three heads)."""
    return [(h, *[o for o in range(num_heads) if o != h]) for h in range(num_heads)]


def pseudo_margins(logits: torch.Tensor) -> torch.Tensor:
    """The pseudo-margin of raw ``logits`` (``(..., C)``): ``z_c - z_max`` for every class but the predicted one,
    which gets ``z_max - z_second`` (the margin by which it wins)."""
    top, top_index = logits.topk(2, dim=-1)
    margins = logits - top[..., :1]
    return margins.scatter(-1, top_index[..., :1], top[..., :1] - top[..., 1:])


def apm_step(apm: torch.Tensor, margins: torch.Tensor, smoothness: float, epoch: int) -> torch.Tensor:
    """The running APM after one observation: ``w * margins + (1 - w) * apm`` with ``w = smoothness / (1 + epoch)``
    (the newest margins weigh less as training goes on)."""
    weight = smoothness / (1 + epoch)
    return margins * weight + apm * (1 - weight)


def agreement_targets(labels_j: torch.Tensor, labels_k: torch.Tensor, margin_j: torch.Tensor, margin_k: torch.Tensor,
                      cutoffs: torch.Tensor, disagreement_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo-label and sample weight a head takes from the two other heads' weak-view labels ``labels_j``,
    ``labels_k`` and the APM of each at its own label (``margin_j``, ``margin_k``), against this head's per-class
    ``cutoffs``: a label passes when its APM is at least its class's cutoff.

    Both heads agree and both pass: their label, weight 1. Exactly one passes (whether or not they agree): the
    passing head's label, weight ``disagreement_weight``. Otherwise (none passes, or they disagree and both pass):
    weight 0 (label 0, unused).
    """
    pass_j = margin_j >= cutoffs[labels_j]
    pass_k = margin_k >= cutoffs[labels_k]
    agree = labels_j == labels_k
    one = pass_j ^ pass_k
    labels = torch.where(pass_j | agree, labels_j, labels_k)
    weight = torch.where(agree & pass_j & pass_k, 1.0, torch.where(one, float(disagreement_weight), 0.0))
    return torch.where(weight > 0, labels, torch.zeros_like(labels)), weight.to(margin_j.dtype)


@torch.no_grad()
def apm_cutoffs(apm: torch.Tensor, weak_labels: torch.Tensor, percentile: float, clamp_at_zero: bool = True
                ) -> torch.Tensor:
    """Per head ``h`` and class ``c``, shape ``(H, C)``: the ``percentile`` quantile (linear interpolation) of the
    APM at ``c`` of the two other heads ``j, k`` over the samples both last labeled ``c``, clamped at 0 unless
    ``clamp_at_zero`` is False; 0 for a class no sample was so labeled (and the next class is still computed).

    ``apm``: ``(N, H, C)`` the running APM per sample, ``weak_labels``: ``(N, H)`` each head's last weak-view label
    (-1: never seen).
    """
    num_heads, num_classes = apm.shape[1], apm.shape[2]
    cutoffs = torch.zeros(num_heads, num_classes, dtype=apm.dtype, device=apm.device)
    for h, j, k in other_heads(num_heads):
        agree = weak_labels[:, j] == weak_labels[:, k]
        for c in range(num_classes):
            rows = agree & (weak_labels[:, j] == c)
            if not bool(rows.any()):
                continue
            values = torch.cat((apm[rows, j, c], apm[rows, k, c])).float()
            value = torch.quantile(values, percentile)
            cutoffs[h, c] = value.clamp_min(0.0) if clamp_at_zero else value
    return cutoffs

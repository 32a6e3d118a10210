"""The projection head of the contrastive and similarity methods (CoMatch, SimMatch), and the forward that
gives both the class logits and the L2-normalized embeddings of several views.

The head is the MLP USB puts on the backbone's pooled (penultimate) features (``semilearn/algorithms/
comatch/comatch.py`` lines 14-54, ``simmatch/simmatch.py`` lines 13-51: ``Linear(d, d) -> ReLU ->
Linear(d, proj_size)``, then ``x / ||x||_2``). With ``num_heads > 1`` it is EPASS (Nguyen et al. 2023,
"Boosting Semi-Supervised Learning by bridging high and low-confidence predictions"), which USB's
CIFAR recipes switch on (``use_epass: True``): the mean of ``num_heads`` such MLPs, normalized.

Our networks expose the penultimate features as ``net.forward_features(x)`` (pooled, ``(N, num_features)``)
and the linear classifier as ``net.fc`` (the ``wrn*`` backbones, as ReMixMatch's rotation head uses them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """``normalize(mean_k W2_k relu(W1_k h))`` for the ``num_heads`` MLPs ``k`` (one head: the paper's).

    Args:
        in_features: width ``d`` of the penultimate features ``h``.
        proj_size: width of the embedding.
        num_heads: how many MLPs are averaged (USB's EPASS: 3).
    """

    def __init__(self, in_features: int, proj_size: int = 128, num_heads: int = 1) -> None:
        super().__init__()
        if in_features < 1 or proj_size < 1:
            raise ValueError(f"in_features and proj_size must be positive, got {in_features} and {proj_size}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1 (3 is USB's EPASS), got {num_heads}")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, proj_size))
            for _ in range(num_heads))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = torch.stack([head(features) for head in self.heads]).mean(dim=0)
        return F.normalize(projected.float(), dim=1)


def require_features(net: nn.Module, method: str, network: str) -> int:
    """The width of ``net``'s penultimate features; a clear error for a network that does not expose them."""
    if not (hasattr(net, "forward_features") and hasattr(net, "num_features") and hasattr(net, "fc")):
        raise ValueError(f"{method} needs a network with forward_features(), num_features and fc (the wrn* "
                         f"backbones) for its projection head; {network!r} lacks them")
    return int(net.num_features)


def logits_and_embeddings(net: nn.Module, head: nn.Module, images: Sequence[torch.Tensor], concat: bool
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Class logits and embeddings of each batch in ``images``: one forward over all of them (``concat``,
    USB's ``use_cat``: BatchNorm sees the whole step at once) or one forward each."""
    if concat:
        sizes = [len(x) for x in images]
        features = net.forward_features(torch.cat(list(images)))
        return list(net.fc(features).split(sizes)), list(head(features).split(sizes))
    features = [net.forward_features(x) for x in images]
    return [net.fc(h) for h in features], [head(h) for h in features]

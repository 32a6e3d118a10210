"""Deep Mutual Learning (Zhang et al., CVPR 2018): online distillation among peers trained together.

Every peer k learns from the labels and from the other peers' softened predictions:

    L_k = CE(z_k, y) + w_dml * 1/(K-1) sum_{j != k} T^2 KL(p_j^T || p_k^T),   p_j detached

The peers' losses are summed into one backward; because each peer's targets are detached, peer
k's gradient comes from L_k alone, which is the paper's per-peer update taken simultaneously.
Peer 0 is ``net`` (its EMA is what validation, test, predict and checkpoints' consumers use); the
others are ``peers``. Test logs every peer's own accuracy (raw weights) and that of the mean of
all peers' probabilities. With ``distill_unlabeled`` the peers also match each other on the
DataModule's unlabeled images.

Defaults: two peers of the same network, w_dml = 1 and T = 1 as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.distillation.losses import mutual_learning_loss
from lightning_modules.classification.networks import build_network
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop


class MutualLearning(SemiSupervisedModule):
    """Two or more peer networks trained with Deep Mutual Learning.

    Args:
        peer_networks: architectures of the peers after the first (which is ``network``);
            default one more peer of ``network``'s kind. ``["wrn16_2", "resnet18"]`` gives three peers.
        dml_weight: weight of the mutual (KL) term of each peer.
        temperature: softening temperature of the mutual term.
        distill_unlabeled: also apply the mutual term to the unlabeled (weak view) images.
        **kwargs: the base's network, optimizer, EMA and criterion arguments.
    """

    def __init__(
        self,
        peer_networks: list[str] | None = None,
        dml_weight: float = 1.0,
        temperature: float = 1.0,
        distill_unlabeled: bool = False,
        **kwargs: Any,
    ) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # its own forward over the peers
        super().__init__(**kwargs)
        hp = self.hparams
        names = peer_networks if peer_networks is not None else [hp.network]
        if not names:
            raise ValueError("MutualLearning needs at least one peer besides `network`: give peer_networks")
        self.peers = nn.ModuleList(
            build_network(name, num_classes=hp.num_classes, in_channels=hp.in_channels, **(hp.network_kwargs or {}))
            for name in names)
        self.unlabeled_views = ("weak",) if distill_unlabeled else ()
        self.peer_test_acc = nn.ModuleList(MulticlassAccuracy(hp.num_classes, average="micro") for _ in range(len(names) + 1))
        self.ensemble_test_acc = MulticlassAccuracy(hp.num_classes, average="micro")

    @property
    def all_peers(self) -> list[nn.Module]:
        return [self.net, *self.peers]

    def trainable_modules(self) -> list[nn.Module]:
        return super().trainable_modules() + [self.peers]

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        images = [labeled["image"]]
        if self.unlabeled_views and unlabeled is not None:
            images.append(unlabeled["weak"])
        num_labeled = len(labeled["image"])
        logits = [self._forward_peer(peer, images) for peer in self.all_peers]
        mutual = mutual_learning_loss(logits, self.hparams.temperature)
        losses: dict[str, torch.Tensor] = {}
        for k, (peer_logits, peer_mutual) in enumerate(zip(logits, mutual)):
            losses[f"peer{k}_ce"] = self.labeled_loss(peer_logits[:num_labeled], labeled["target"])
            losses[f"peer{k}_dml"] = peer_mutual
        losses["labeled_loss"] = sum(losses[f"peer{k}_ce"] for k in range(len(logits)))
        losses["dml_loss"] = sum(mutual)
        return losses

    def _forward_peer(self, peer: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
        if self.hparams.concat_forward:
            return peer(torch.cat(images))
        return torch.cat([peer(x) for x in images])

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses["labeled_loss"] + self.hparams.dml_weight * losses["dml_loss"]

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if self.multilabel:
            return
        size = len(batch["target"])
        probs = [torch.softmax(peer(batch["image"]).float(), dim=1) for peer in self.all_peers]
        for k, (p, metric) in enumerate(zip(probs, self.peer_test_acc)):
            metric.update(p.argmax(dim=1), batch["target"])
            self.log(f"test/peer{k}_acc", metric, on_epoch=True, batch_size=size)
        self.ensemble_test_acc.update(torch.stack(probs).mean(0).argmax(dim=1), batch["target"])
        self.log("test/ensemble_acc", self.ensemble_test_acc, on_epoch=True, batch_size=size)

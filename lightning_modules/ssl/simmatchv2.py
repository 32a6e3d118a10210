"""SimMatchV2 (Zheng et al., ICCV 2023, "SimMatchV2: Semi-Supervised Learning with Graph Consistency"), after
the authors' code (mingkai-zheng/SimMatchV2 at f0e054c)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.ssl.embedding_method import EmbeddingMethod
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.memory_bank import FeatureQueue, LabeledBank, size_labeled_bank
from lightning_modules.ssl.threshold_state import ema_step, gather_rows


def propagate_labels(features: torch.Tensor, probs: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                     usable: torch.Tensor, topn: int, temperature: float, alpha: float) -> torch.Tensor:
    """Node-node consistency's pseudo-labels: each sample and its ``topn`` nearest labeled embeddings form a
    graph ``A = softmax(Z Z^T / T)`` (no self loops), and ``(1 - alpha) (I - alpha A)^-1 Y`` propagates the
    labels ``Y`` (the sample's ``probs``, the neighbours' one-hot labels) to the sample's node.

    A bank row not yet ``usable`` (not written yet) is no neighbour: no edge leads into it. A sample without
    any usable neighbour keeps ``probs``.
    """
    k = min(topn, len(bank))
    similarity = (features @ bank.T).masked_fill(~usable, float("-inf"))
    index = similarity.topk(k, dim=1).indices  # the order is irrelevant: the graph is permutation-invariant
    nodes = torch.cat([features[:, None], bank[index]], dim=1)  # (n, k + 1, d)
    labels = torch.cat([probs[:, None], bank_labels[index]], dim=1)  # (n, k + 1, C)
    eye = torch.eye(k + 1, device=features.device)
    edges = nodes @ nodes.transpose(1, 2) / temperature - eye * 1e9
    connected = torch.cat([torch.ones_like(index[:, :1], dtype=torch.bool), usable[index]], dim=1)
    edges = edges.masked_fill(~connected[:, None, :], -1e9)
    propagation = (1.0 - alpha) * torch.linalg.inv(eye - alpha * torch.softmax(edges, dim=-1))
    pseudo_labels = (propagation @ labels)[:, 0]
    return torch.where(connected[:, 1:].any(dim=1, keepdim=True), pseudo_labels, probs)


class SimMatchV2(EmbeddingMethod):
    """Semi-supervised learning as consistency on a graph of samples (nodes) and their similarities (edges).

    With ``p = DA(softmax(f(weak(u))))``, ``z_w``, ``z_s`` the embeddings of the weak and strong views, a
    labeled bank of embeddings and labels and a queue of unlabeled embeddings ``k_j`` with predictions ``p_j``:

    * node-node: pseudo-labels ``p^`` by :func:`propagate_labels` over ``z_w``'s ``topn`` labeled neighbours;
      ``L_nn = 1/(mu B) sum_b 1[max p_b >= tau] H(p^_b, p(y | strong(u_b)))``;
    * edge-edge: ``r_w = softmax_j(z_w . k_j / T)``, ``r_s = softmax_j(z_s . k_j / T)``, ``L_ee = mean H(r_w, r_s)``;
    * node-edge: ``L_ne = mean H(p, r_s P)``, ``P`` the queue's predictions (0 while the queue is empty);
    * ``L = L_s + lambda_nn L_nn + lambda_ee L_ee + lambda_ne L_ne``; after the optimizer step the labeled
      bank takes the labeled batch's embeddings, the queue ``(z_w, p)``, and DA's marginal moves.

    DA is the authors': ``p = normalize(q / m)`` with the committed marginal ``m`` (uniform at the start), then
    ``m <- 0.9 m + 0.1 mean(q)`` (every rank's batch). The threshold is applied to ``p``, not to ``p^``.

    Against the authors' code: ``models/simmatchv2.py`` lines 54-71 (the banks' start), 90-117 (DA, bank
    updates), 168-248 (propagation, the two graph losses, bank updates) and ``main.py`` lines 341-345 (mask on
    the aligned prediction, ``L_nn``, the total), pinned over
    several steps by ``tests/lightning_modules/ssl/test_simmatchv2.py``. Departures: the weak view goes through
    the trained network in the step's forward, without gradient (the authors use an EMA teacher with its own
    head; USB's SimMatch does the same on CIFAR); the labeled bank learns a sample's label when it first
    writes its row (the authors fill all labels at the start), so rows not yet written are no neighbours; one
    strong view (the authors' default, ``--multicrop`` adds five). The head has no LayerNorm (``--norm_feat``).

    Recipe (the authors' ImageNet 10 %, ``script/train.sh``): T = 0.1, alpha = 0.1, topn 128, tau = 0.7,
    lambda_nn = 10, lambda_ee = lambda_ne = 5, DA momentum 0.9, a queue of 256 steps' unlabeled rows. USB
    publishes no CIFAR-10 number for it.

    Args:
        temperature: T of the graphs.
        threshold: tau, on the aligned prediction.
        alpha: the propagation's weight of the neighbours.
        topn: labeled neighbours per sample.
        queue_size: unlabeled rows in the queue (the authors: 256 steps' worth).
        dist_align_momentum: DA's marginal momentum; None turns DA off.
        edge_loss_weight: lambda_ee.
        node_edge_loss_weight: lambda_ne.
        unlabeled_loss_weight: lambda_nn.
        num_labeled: the bank's size without a DataModule's ``labeled_indices`` (as SimMatch's).
        **kwargs: :class:`EmbeddingMethod` arguments.
    """

    unlabeled_views = ("weak", "strong")

    def __init__(self, temperature: float = 0.1, threshold: float = 0.7, alpha: float = 0.1, topn: int = 128,
                 queue_size: int = 256 * 7 * 64, dist_align_momentum: float | None = 0.9, edge_loss_weight: float = 5.0,
                 node_edge_loss_weight: float = 5.0, unlabeled_loss_weight: float = 10.0,
                 num_labeled: int | None = None, proj_size: int = 128, **kwargs: Any) -> None:
        super().__init__(proj_size=proj_size, unlabeled_loss_weight=unlabeled_loss_weight, **kwargs)
        if temperature <= 0 or topn < 1:
            raise ValueError(f"temperature and topn must be positive, got {temperature} and {topn}")
        for name, value in (("threshold", threshold), ("alpha", alpha)):
            if not 0.0 <= value <= 1.0 or (name == "alpha" and value == 1.0):
                raise ValueError(f"{name} must lie in [0, 1{']' if name == 'threshold' else ')'}, got {value}")
        if dist_align_momentum is not None and not 0.0 <= dist_align_momentum < 1.0:
            raise ValueError(f"dist_align_momentum must lie in [0, 1) or be None, got {dist_align_momentum}")
        self.temperature, self.threshold, self.alpha, self.topn = temperature, threshold, alpha, topn
        self.dist_align_momentum = dist_align_momentum
        self.edge_loss_weight, self.node_edge_loss_weight = edge_loss_weight, node_edge_loss_weight
        num_classes = self.hparams.num_classes
        self.bank = LabeledBank(proj_size, momentum=0.0, size=num_labeled or 0)
        self.queue = FeatureQueue(queue_size, proj_size, num_classes, random_features=True)
        self.register_buffer("da_marginal", torch.full((num_classes,), 1.0 / num_classes))

    def on_fit_start(self) -> None:
        size_labeled_bank(self.bank, self.data_facts, type(self).__name__)
        super().on_fit_start()

    @torch.no_grad()
    def update_marginal(self, batch_means: torch.Tensor) -> None:
        """The commit: one moving-average step per proposed batch mean."""
        for mean in batch_means:
            self.da_marginal.copy_(ema_step(self.da_marginal, mean, self.dist_align_momentum))

    def embedding_loss(self, logits: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor],
                       labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        num_classes = self.hparams.num_classes
        with torch.no_grad():
            probs = torch.softmax(logits["weak"].detach().float(), dim=1)
            if self.dist_align_momentum is not None:
                self.step_state.propose(self.update_marginal, gather_rows(self, probs).mean(dim=0)[None])
                probs = probs / self.da_marginal
                probs = probs / probs.sum(dim=1, keepdim=True)
            weak = embeddings["weak"].detach()
            bank_labels = F.one_hot(self.bank.labels, num_classes).to(probs.dtype)
            pseudo_labels = propagate_labels(weak, probs, self.bank.features, bank_labels, self.bank.seen, self.topn,
                                             self.temperature, self.alpha)
            relation_weak = torch.softmax(weak @ self.queue.features.T / self.temperature, dim=1)
            mask = (probs.max(dim=1).values >= self.threshold).to(probs.dtype)
        relation_strong = torch.log_softmax(embeddings["strong"] @ self.queue.features.T / self.temperature, dim=1)
        edge_loss = -(relation_weak * relation_strong).sum(dim=1).mean()
        neighbour_probs = relation_strong.exp() @ self.queue.probs
        # an empty queue predicts nothing (the authors' inf loss, set to 0): log 1 = 0, no gradient
        neighbour_probs = torch.where(self.queue.count > 0, neighbour_probs, torch.ones_like(neighbour_probs))
        node_edge_loss = -(probs * torch.log(neighbour_probs)).sum(dim=1).mean()
        slots = self.bank.slots_of(labeled["index"])
        self.step_state.propose(self.bank.update_, *(gather_rows(self, t) for t in (
            slots, embeddings["labeled"].detach(), labeled["target"])))
        self.step_state.propose(self.queue.update_, gather_rows(self, weak), gather_rows(self, probs))
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], pseudo_labels, mask),
            "edge_loss": edge_loss,
            "node_edge_loss": node_edge_loss,
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels.argmax(dim=1), unlabeled["target"], mask),
        }

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().total_loss(losses)
        if "edge_loss" in losses:
            loss = loss + self.edge_loss_weight * losses["edge_loss"]
            loss = loss + self.node_edge_loss_weight * losses["node_edge_loss"]
        return loss

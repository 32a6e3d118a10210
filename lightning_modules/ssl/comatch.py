"""CoMatch (Li, Xiong and Hoi, ICCV 2021, "CoMatch: Semi-supervised Learning with Contrastive Graph
Regularization"), as USB runs it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.ssl.embedding_method import QueueAlignedMethod
from lightning_modules.ssl.losses import masked_accuracy, masked_cross_entropy
from lightning_modules.ssl.memory_bank import FeatureQueue
from lightning_modules.ssl.threshold_state import gather_rows


def graph_contrastive_loss(embeddings: torch.Tensor, others: torch.Tensor, target_graph: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """``mean_b -sum_j Q_bj log(W_bj + 1e-7)``, ``W = rownorm(exp(z z'^T / T))`` the embedding graph of two
    strong views and ``Q`` the (row-normalized) pseudo-label graph."""
    similarity = torch.softmax(embeddings @ others.T / temperature, dim=1)
    return -(torch.log(similarity + 1e-7) * target_graph).sum(dim=1).mean()


def pseudo_label_graph(probs: torch.Tensor, cutoff: float, all_probs: torch.Tensor | None = None,
                       offset: int = 0) -> torch.Tensor:
    """``Q = rownorm(1[Q' >= cutoff] Q')`` with ``Q' = p p^T``, each sample its own positive (``Q'_bb = 1``).

    Under DDP the rows are this rank's samples and the columns every rank's (``all_probs``, in which this
    rank's rows start at ``offset``): the rows of the graph of the global batch."""
    all_probs = probs if all_probs is None else all_probs
    graph = probs @ all_probs.T
    own = torch.arange(len(probs), device=probs.device)
    graph[own, own + offset] = 1.0
    graph = graph * (graph >= cutoff).to(graph.dtype)
    return graph / graph.sum(dim=1, keepdim=True)


def gather_with_gradient(module: Any, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``tensor`` from every rank (rank 0's rows first; the gradient flows back to each rank's own rows) and
    where this rank's rows start; ``(tensor, 0)`` in one process."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size == 1:
        return tensor, 0
    return module.all_gather(tensor, sync_grads=True).flatten(0, 1), trainer.global_rank * len(tensor)


class CoMatch(QueueAlignedMethod):
    """Class probabilities and embeddings trained together: memory-smoothed pseudo-labels and a contrastive
    loss whose targets are the pseudo-label graph.

    With ``p = DA(softmax(f(weak(u))))`` (aligned to uniform; no gradient), ``z_w``, ``z_0``, ``z_1`` the
    embeddings of the weak view and of two strong views, and a queue of past (embedding, probability) rows
    ``(k_j, p_j)``:

    * memory smoothing: ``q = alpha p + (1 - alpha) sum_j a_j p_j``, ``a = softmax_j(z_w . k_j / T)``
      (after ``bank_warmup_epochs``, from the step after the queue is first full; ``q = p`` before);
    * ``L = L_s + lambda_u 1/(mu B) sum_b 1[max q_b >= tau] H(q_b, p(y | strong_0(u_b)))
      + lambda_c L_c(z_0, z_1, Q(q))`` with :func:`pseudo_label_graph` and :func:`graph_contrastive_loss`;
    * after the optimizer step the queue takes ``(z_w, p)`` of the unlabeled batch and ``(z(x), onehot(y))``
      of the labeled one.

    Against the authors' code: USB ``semilearn/algorithms/comatch/comatch.py`` lines 61-69 (the contrastive
    loss), 147-160 (the queue), 190-228 (alignment, smoothing, mask, queue rows, graph, losses) and
    ``hooks/dist_align.py`` lines 77-137 (the alignment queue), pinned over several steps by
    ``tests/lightning_modules/ssl/test_simmatch_comatch.py``. USB starts smoothing at ``epoch > 0 and it >
    queue_batch``; here after ``bank_warmup_epochs`` once more rows than the queue holds were pushed (the same
    step when a step pushes ``queue_size / queue_batch`` rows, as in USB's recipes). Under DDP the graphs span
    every rank's batch (each rank the rows of its own samples; USB builds them per rank), so two ranks train as
    one process on the global batch would; the queue and the alignment queue take every rank's rows, as USB's.

    Recipe as USB runs it (CIFAR-10 40 labels, WRN-28-2, ``config/classic_cv/comatch/comatch_cifar10_40_0.yaml``):
    T = 0.2, tau = 0.95, contrast_p_cutoff 0.8, lambda_c = 1, alpha = 0.9, proj_size 64, queue of 5 steps'
    rows (5 x (1 + 7) x 64 = 2560), da_len 32, EPASS (3 heads), mu = 7, B = 64, SGD 0.03, cosine over 2^20
    steps, EMA 0.999 (USB's CIFAR-10 error at 40 labels: 5.44 %).

    Args:
        temperature: T of the memory smoothing and of the embedding graph.
        threshold: tau, the confidence the smoothed pseudo-label must reach.
        contrast_threshold: the pseudo-label similarity below which two samples are not connected.
        smoothing_alpha: alpha, the weight of the aligned prediction against the memory's.
        queue_size: rows of the memory (USB: ``queue_batch * (1 + mu) * B``).
        contrast_loss_weight: lambda_c.
        proj_size: the embedding width (USB's CIFAR recipes: 64).
        **kwargs: :class:`QueueAlignedMethod` arguments.
    """

    unlabeled_views = ("weak", "strong", "strong2")
    extra_loss = "contrast_loss"

    def __init__(self, temperature: float = 0.2, threshold: float = 0.95, contrast_threshold: float = 0.8,
                 smoothing_alpha: float = 0.9, queue_size: int = 2560, contrast_loss_weight: float = 1.0,
                 proj_size: int = 64, **kwargs: Any) -> None:
        super().__init__(proj_size=proj_size, **kwargs)
        self.extra_loss_weight = contrast_loss_weight
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for name, value in (("threshold", threshold), ("contrast_threshold", contrast_threshold),
                            ("smoothing_alpha", smoothing_alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.temperature, self.threshold, self.contrast_threshold = temperature, threshold, contrast_threshold
        self.smoothing_alpha = smoothing_alpha
        self.queue = FeatureQueue(queue_size, proj_size, self.hparams.num_classes)

    def embedding_loss(self, logits: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor],
                       labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        probs = self.aligned_probs(logits["weak"])
        weak_embeddings = embeddings["weak"].detach()
        with torch.no_grad():
            affinity = torch.softmax(weak_embeddings @ self.queue.features.T / self.temperature, dim=1)
            smoothed = self.smoothing_alpha * probs + (1.0 - self.smoothing_alpha) * affinity @ self.queue.probs
            # USB's `it > queue_batch`: a step after the queue is first full (a tensor: no host synchronization)
            use_memory = (self.queue.count > self.queue.size) & self.bank_warmed_up()
            smoothed = torch.where(use_memory, smoothed, probs)
            confidence, pseudo_labels = smoothed.max(dim=1)
            mask = (confidence >= self.threshold).to(probs.dtype)
            all_smoothed = gather_rows(self, smoothed)
        others, offset = gather_with_gradient(self, embeddings["strong2"])
        graph = pseudo_label_graph(smoothed, self.contrast_threshold, all_smoothed, offset)
        one_hot = F.one_hot(labeled["target"], self.hparams.num_classes).to(probs.dtype)
        # every rank's unlabeled rows, then every rank's labeled rows: the order one process has on the global batch
        rows = [[gather_rows(self, t) for t in pair] for pair in ((weak_embeddings, embeddings["labeled"].detach()),
                                                                  (probs, one_hot))]
        self.step_state.propose(self.queue.update_, *(torch.cat(pair) for pair in rows))
        return {
            "unlabeled_loss": masked_cross_entropy(logits["strong"], smoothed, mask),
            "contrast_loss": graph_contrastive_loss(embeddings["strong"], others, graph, self.temperature),
            "mask_ratio": mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, unlabeled["target"], mask),
        }

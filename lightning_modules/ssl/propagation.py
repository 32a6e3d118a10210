"""Label propagation over a kNN graph of features (Iscen et al., CVPR 2019), as pure tensor functions.

No Lightning here: :class:`lightning_modules.ssl.label_propagation.LabelPropagation` extracts the
features and keeps the result; these functions turn features and the known labels into pseudo-labels
and weights. The steps follow the authors' ``lp/db_semisuper.py`` ``update_plabels`` (ahmetius/LP-DeepSSL,
lines 261-339), with faiss's exact inner-product search done by chunked matrix products and scipy's
sparse conjugate gradient by the batched one below (all columns at once, in torch, on the features' device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Propagation:
    """What one propagation gives, one row per feature row.

    Attributes:
        scores: Z, float (N, C): the solution of ``(I - alpha W) Z = Y``, negatives set to 0.
        pseudo_labels: int64 (N,): ``argmax Z``; the known label for labeled rows.
        weights: omega, float (N,): ``1 - H(Z_i) / log C`` over its maximum; 1 for labeled rows.
        class_weights: zeta, float (C,): ``(N / C) / |{i: pseudo_label_i = c}|``.
    """

    scores: Tensor
    pseudo_labels: Tensor
    weights: Tensor
    class_weights: Tensor


def knn_affinity(features: Tensor, num_neighbors: int, gamma: float, chunk: int = 4096) -> Tensor:
    """Symmetric, normalized affinity ``W_n = D^-1/2 W D^-1/2`` of the kNN graph, sparse (N, N).

    ``features`` are L2-normalized rows. Each row keeps its ``k`` most similar other rows (the search
    returns ``k + 1`` and the first, itself, is dropped: ``db_semisuper.py`` lines 283-289) with
    affinity ``max(s, 0)^gamma``; then ``W = A + A^T`` (a pair found both ways counts twice, line 293),
    its diagonal is removed (line 296) and ``D = diag(W 1)`` with empty rows given degree 1 (lines 297-301).
    Similarities are clamped at 0 because ``s^3`` of a negative similarity would give a negative edge;
    the authors' features (ReLU then pooling) have none.
    """
    n = len(features)
    if not 0 < num_neighbors < n:
        raise ValueError(f"num_neighbors must lie in 1 .. {n - 1} (the graph has {n} nodes), got {num_neighbors}")
    values, columns = [], []
    for start in range(0, n, chunk):  # N x N similarities never held at once (CIFAR-10: 50,000 rows)
        similarity = features[start:start + chunk] @ features.T
        top, index = similarity.topk(num_neighbors + 1, dim=1)
        values.append(top[:, 1:].clamp_min(0).pow(gamma))
        columns.append(index[:, 1:])
    rows = torch.arange(n, device=features.device).repeat_interleave(num_neighbors)
    values, columns = torch.cat(values).flatten(), torch.cat(columns).flatten()
    both = torch.stack([torch.cat([rows, columns]), torch.cat([columns, rows])])
    w = torch.sparse_coo_tensor(both, torch.cat([values, values]), (n, n), check_invariants=False).coalesce()
    index, values = w.indices(), w.values()
    values = torch.where(index[0] == index[1], torch.zeros_like(values), values)
    degree = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index[0], values)
    degree = torch.where(degree == 0, torch.ones_like(degree), degree).rsqrt()
    values = values * degree[index[0]] * degree[index[1]]
    return torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()


def conjugate_gradient(affinity: Tensor, alpha: float, targets: Tensor, iterations: int,
                       tolerance: float) -> Tensor:
    """Solve ``(I - alpha W) Z = Y`` for every column of ``targets`` (N, C) by conjugate gradient from Z = 0.

    Each column is scipy's ``cg(A, y, rtol=tolerance, maxiter=iterations)`` (``db_semisuper.py`` line 310):
    it stops once ``||r|| < tolerance * ||y||``, checked before each of at most ``iterations`` steps; the
    columns run together, a converged (or all-zero) column no longer moving.
    """
    def apply(x: Tensor) -> Tensor:
        return x - alpha * torch.sparse.mm(affinity, x)

    z = torch.zeros_like(targets)
    r, p = targets.clone(), targets.clone()
    rho = (r * r).sum(0)
    stop = tolerance * targets.norm(dim=0)
    for _ in range(iterations):
        active = (rho.sqrt() >= stop) & (stop > 0)
        if not active.any():
            break
        q = apply(p)
        step = torch.where(active, rho / (p * q).sum(0).where(active, torch.ones_like(rho)), torch.zeros_like(rho))
        z += step * p
        r -= step * q
        rho_next = (r * r).sum(0)
        p = torch.where(active, r + (rho_next / rho.where(active, torch.ones_like(rho))) * p, p)
        rho = torch.where(active, rho_next, rho)
    return z


def propagate_labels(features: Tensor, labels: Tensor, num_classes: int, num_neighbors: int = 50,
                     gamma: float = 3.0, alpha: float = 0.99, iterations: int = 20,
                     tolerance: float = 1e-6) -> Propagation:
    """Pseudo-labels and weights of every row of ``features`` (N, D) from the known ``labels`` (N,; -1: unknown).

    ``Y[i, c] = 1 / |L_c|`` for a labeled row of class c (eq. 5 normalized by the class size, line 309),
    ``Z`` solves ``(I - alpha W_n) Z = Y`` (eq. 10, :func:`conjugate_gradient`), negatives are set to 0
    (line 314), ``pseudo_label = argmax Z``, ``omega_i = 1 - H(Z_i / sum Z_i) / log C`` divided by its
    maximum (eq. 11, lines 317-321; a row Z never reached gets omega 0), labeled rows keep their label with
    omega 1 (lines 328-329), and ``zeta_c = (N / C) / |{i: pseudo_label_i = c}|`` (eq. 12, line 337).
    """
    if labels.shape != (len(features),):
        raise ValueError(f"labels must have one entry per feature row, shape ({len(features)},), "
                         f"got {tuple(labels.shape)}")
    features = F.normalize(features, dim=1)
    labeled = labels >= 0
    counts = torch.bincount(labels[labeled], minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"label propagation needs a labeled image of every class; classes {missing} have none")
    y = torch.zeros(len(features), num_classes, dtype=features.dtype, device=features.device)
    y[labeled, labels[labeled]] = 1.0 / counts[labels[labeled]].to(features.dtype)
    affinity = knn_affinity(features, num_neighbors, gamma)
    scores = conjugate_gradient(affinity, alpha, y, iterations, tolerance).clamp_min(0)
    total = scores.sum(1, keepdim=True)
    p = scores / total.clamp_min(torch.finfo(scores.dtype).tiny)
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(1)
    weights = torch.where(total.squeeze(1) > 0, 1 - entropy / math.log(num_classes), torch.zeros_like(entropy))
    weights = weights / weights.max().clamp_min(torch.finfo(weights.dtype).tiny)
    pseudo_labels = torch.where(labeled, labels, scores.argmax(1))
    weights = torch.where(labeled, torch.ones_like(weights), weights)
    per_class = torch.bincount(pseudo_labels, minlength=num_classes).to(features.dtype)
    class_weights = (len(features) / num_classes) / per_class.clamp_min(1)
    return Propagation(scores, pseudo_labels, weights, class_weights)

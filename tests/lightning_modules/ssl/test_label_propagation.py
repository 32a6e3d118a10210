"""LabelPropagation (Iscen et al. 2019) against the authors' code, and in training on real digits.

The reference test runs the authors' ``update_plabels`` (ahmetius/LP-DeepSSL ``lp/db_semisuper.py`` lines
261-339) written out here in numpy and scipy, exactly as they call them (``scipy.sparse``,
``scipy.sparse.linalg.cg``, ``scipy.stats.entropy``), with faiss's exact inner-product search replaced by a
full sort; nothing from ``lightning_modules`` computes an expected value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import LabelPropagation
from lightning_modules.ssl.propagation import propagate_labels
from tests.ssl_helpers import SMALL_NET, make_trainer

scipy_sparse = pytest.importorskip("scipy.sparse")
from scipy.sparse.linalg import cg  # noqa: E402
from scipy.stats import entropy  # noqa: E402


def _authors_update_plabels(X, labels, labeled_idx, num_classes, k=50, max_iter=20, alpha=0.99):
    """``db_semisuper.py`` lines 264-337 (self.* made arguments; ``labels`` of the unlabeled rows are unused)."""
    X = X / np.linalg.norm(X, axis=1, keepdims=True)  # faiss.normalize_L2, line 277
    N = X.shape[0]
    sims = X @ X.T  # faiss.GpuIndexFlatIP search of k + 1 (line 283): exact, largest first
    I = np.argsort(-sims, axis=1, kind="stable")[:, :k + 1]
    D = np.take_along_axis(sims, I, axis=1)
    D = D[:, 1:] ** 3  # lines 288-289
    I = I[:, 1:]
    row_idx_rep = np.tile(np.arange(N), (k, 1)).T  # lines 290-292
    W = scipy_sparse.csr_matrix((D.flatten("F"), (row_idx_rep.flatten("F"), I.flatten("F"))), shape=(N, N))
    W = W + W.T
    W = W - scipy_sparse.diags(W.diagonal())  # lines 296-301
    S = W.sum(axis=1)
    S[S == 0] = 1
    Dn = scipy_sparse.diags(np.array(1.0 / np.sqrt(S)).reshape(-1))
    Wn = Dn * W * Dn
    Z = np.zeros((N, num_classes))  # lines 304-311
    A = scipy_sparse.eye(N) - alpha * Wn
    for i in range(num_classes):
        cur_idx = labeled_idx[np.where(labels[labeled_idx] == i)]
        y = np.zeros((N,))
        y[cur_idx] = 1.0 / cur_idx.shape[0]
        f, _ = cg(A, y, rtol=1e-6, maxiter=max_iter)  # `tol` in the scipy of 2018
        Z[:, i] = f
    Z[Z < 0] = 0  # line 314
    probs_l1 = F.normalize(torch.tensor(Z), 1).numpy()  # lines 317-322
    probs_l1[probs_l1 < 0] = 0
    weights = 1 - entropy(probs_l1.T) / np.log(num_classes)
    weights = weights / np.max(weights)
    p_labels = np.argmax(probs_l1, 1)
    p_labels[labeled_idx] = labels[labeled_idx]  # lines 328-329
    weights[labeled_idx] = 1.0
    class_weights = np.array([(float(labels.shape[0]) / num_classes) / np.where(p_labels == i)[0].size
                              for i in range(num_classes)])  # lines 335-337
    return Z, p_labels, weights, class_weights


def _digits_features(n=600):
    """Real features: the first ``n`` distinct scikit-learn digits as 64 pixel values (non-negative, as the
    authors' ReLU features are, so no similarity is negative)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    _, first = np.unique(digits.data, axis=0, return_index=True)
    keep = np.sort(first)[:n]
    return digits.data[keep].astype(np.float64), digits.target[keep]


def test_propagation_matches_reference_scipy():
    X, y = _digits_features()
    labeled_idx = np.concatenate([np.where(y == c)[0][:5] for c in range(10)])
    Z, p_labels, weights, class_weights = _authors_update_plabels(X.copy(), y, labeled_idx, 10)

    known = torch.full((len(y),), -1, dtype=torch.long)
    known[labeled_idx] = torch.as_tensor(y[labeled_idx])
    ours = propagate_labels(torch.as_tensor(X), known, num_classes=10)  # k 50, gamma 3, alpha 0.99, 20 CG steps

    torch.testing.assert_close(ours.scores, torch.as_tensor(Z), rtol=1e-7, atol=1e-10)
    assert torch.equal(ours.pseudo_labels, torch.as_tensor(p_labels))
    torch.testing.assert_close(ours.weights, torch.as_tensor(weights), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours.class_weights, torch.as_tensor(class_weights))
    unlabeled = np.setdiff1d(np.arange(len(y)), labeled_idx)
    accuracy = (p_labels[unlabeled] == y[unlabeled]).mean()
    assert 0.7 < accuracy < 1.0, f"propagated-label accuracy {accuracy:.3f}: a vacuous or broken graph"
    assert 0 < weights[unlabeled].min() < weights[unlabeled].max() <= 1  # certainty spreads out


def test_propagation_refuses_a_class_without_labels_and_too_many_neighbours():
    X, y = _digits_features(100)
    known = torch.full((len(y),), -1, dtype=torch.long)
    known[:5] = torch.as_tensor(y[:5])
    with pytest.raises(ValueError, match="labeled image of every class"):
        propagate_labels(torch.as_tensor(X), known, num_classes=10)
    known = torch.as_tensor(y)
    with pytest.raises(ValueError, match="num_neighbors must lie in 1 .. 99"):
        propagate_labels(torch.as_tensor(X), known, num_classes=10, num_neighbors=100)


def test_label_propagation_trains_on_digits_and_its_step_loss_matches_reference():
    """Two epochs through the Trainer (supervised, then propagated); the propagation covers every training
    image, keeps the labeled ones' labels with weight 1, and the step's unlabeled loss is the authors'
    weighted CE (``helpers.py`` lines 206-209: CE * omega * zeta, over the batch) on the stored labels."""
    torch.manual_seed(0)
    model = LabelPropagation(warmup_epochs=1, ema_decay=0.9, **SMALL_NET)
    data = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=4)
    make_trainer(max_epochs=2).fit(model, data)
    assert int(model.propagated_epoch) == 1
    labeled = data.split.labeled
    assert (model.pseudo_labels >= 0).all() and len(model.pseudo_labels) == data.num_indices
    assert torch.equal(model.pseudo_labels[labeled], data.load_train()[1][labeled])
    assert torch.equal(model.pseudo_weights[labeled], torch.ones(len(labeled)))
    unlabeled = data.unlabeled_indices()
    assert 0 < float(model.pseudo_weights[unlabeled].max()) <= 1

    batch = next(iter(data.train_dataloader()))[0]["unlabeled"]
    batch = data.unlabeled_on_device(batch)
    logits = torch.randn(len(batch["index"]), 10, generator=torch.Generator().manual_seed(1))
    out = model.unlabeled_loss({"weak": logits}, batch)
    target = model.pseudo_labels[batch["index"]].numpy()
    omega = model.pseudo_weights[batch["index"]].numpy()
    zeta = model.class_weights.numpy()[target]
    log_p = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    expected = (-log_p[np.arange(len(target)), target] * omega * zeta).sum() / len(target)
    assert out["unlabeled_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_label_propagation_is_supervised_during_warmup_and_refuses_bad_arguments():
    torch.manual_seed(0)
    model = LabelPropagation(warmup_epochs=5, ema_decay=0.9, **SMALL_NET)
    data = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=2)
    make_trainer(max_epochs=1).fit(model, data)
    assert int(model.propagated_epoch) == -1 and (model.pseudo_labels == -1).all()
    with pytest.raises(ValueError, match="alpha must lie in"):
        LabelPropagation(alpha=1.0, **SMALL_NET)
    with pytest.raises(ValueError, match="no_such"):
        LabelPropagation(feature_layer="no_such", **SMALL_NET)

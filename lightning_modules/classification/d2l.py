"""D2L, dimensionality-driven learning (Ma et al., ICML 2018, "Dimensionality-Driven Learning with Noisy Labels").

Deep networks first learn the clean structure of the data, during which the local intrinsic dimensionality
(LID) of their representations falls, then overfit the noisy labels, when it rises again. D2L watches the LID
every epoch and, from the epoch it turns up, trains on a bootstrapped target that trusts the network's own
prediction more as the dimensionality expands:

    LID(x) = -( 1/k sum_{i=1..k} log(r_i(x) / r_k(x)) )^-1          (MLE over the k nearest neighbours in a batch)
    y*_n   = alpha_i y_n + (1 - alpha_i) onehot(argmax p_n),   alpha_i = exp(-(i / E) LID_i / min_{j < i} LID_j)
    L      = mean_n -sum_c y*_nc log p_nc                       (plain cross-entropy while alpha_i = 1)

The turning point, as the authors' ``callback_util.py:63-80`` (xingjunm/dimensionality-driven-learning): once more
than ``init_epochs + window`` epochs are recorded, the first epoch whose LID exceeds the mean of the ``window``
before it by more than two (population) standard deviations; from then on ``alpha`` is recomputed each epoch
(``:82-85``) and the target is ``loss.py:139-144``'s. The LID is the MLE of ``util.py:74-92`` (``mle_batch``, k = 20).

What differs, and why: a criterion sees only the logits, so the LID is that of the logits of the training batches,
averaged over the epoch (the authors estimate it on the last hidden layer, on a fixed 1,280-image subset at each
epoch's start), and the network is not rolled back to the turning epoch (the authors reload a saved model). Their
released code also trains with symmetric cross-entropy before the turn; this follows the paper (plain CE).
Defaults: ``k=20``, ``window=5``, ``init_epochs=40`` (the authors' CIFAR-10 setting, ``train_models.py:18-19``),
``epochs`` the run's epochs ``E``.

Running state (docs/design.md): ``observe`` proposes the batch's mean LID, ``update_`` adds it once per optimizer
step, ``epoch_end`` records the epoch. All of it is in buffers, so a checkpoint resumes the schedule exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lid_mle(features: Tensor, k: int = 20) -> Tensor:
    """Per-sample LID ``-k / sum_i log(r_i / r_k + 1e-8)`` over each row's ``k`` nearest other rows, ``(N,)``."""
    flat = features.detach().float().flatten(1)
    k = min(k, len(flat) - 1)
    if k < 1:
        raise ValueError(f"LID needs at least 2 samples in the batch, got {len(flat)}")
    distances = torch.cdist(flat, flat).sort(dim=1).values[:, 1:k + 1]  # the sample itself (0) dropped
    ratios = distances / distances[:, -1:].clamp_min(1e-12)
    return -k / torch.log(ratios + 1e-8).sum(dim=1)


class D2L(nn.Module):
    """The D2L criterion: ``--model.criterion d2l --model.criterion_kwargs '{"epochs": 120}'`` (see the module docstring)."""

    multilabel: bool = False

    def __init__(self, num_classes: int, epochs: int = 120, k: int = 20, init_epochs: int = 40, window: int = 5) -> None:
        super().__init__()
        if epochs < 1 or k < 1 or window < 2 or init_epochs < 0:
            raise ValueError(f"D2L needs epochs >= 1 (the run's), k >= 1, window >= 2 and init_epochs >= 0, got "
                             f"epochs={epochs}, k={k}, window={window}, init_epochs={init_epochs}")
        self.num_classes, self.epochs, self.k, self.init_epochs, self.window = num_classes, epochs, k, init_epochs, window
        self.register_buffer("lids", torch.zeros(epochs))  # one LID per finished epoch
        self.register_buffer("recorded", torch.zeros((), dtype=torch.long))
        self.register_buffer("turning_epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("alpha", torch.ones(()))
        self.register_buffer("lid_sum", torch.zeros(()))
        self.register_buffer("lid_batches", torch.zeros(()))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        predicted = F.one_hot(log_probs.detach().argmax(dim=1), self.num_classes).float()
        target = self.alpha * F.one_hot(targets, self.num_classes).float() + (1 - self.alpha) * predicted
        return -(target * log_probs).sum(dim=1).mean()

    @torch.no_grad()
    def observe(self, logits: Tensor, targets: Tensor) -> tuple[Tensor]:
        """This batch's mean LID as one row."""
        return (lid_mle(logits, self.k).mean().reshape(1),)

    @torch.no_grad()
    def update_(self, batch_lids: Tensor) -> None:
        """Add the observed batch LIDs (summed over the ranks)."""
        total = torch.stack([batch_lids.sum(), torch.tensor(float(len(batch_lids)), device=batch_lids.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        self.lid_sum += total[0]
        self.lid_batches += total[1]

    @torch.no_grad()
    def epoch_end(self) -> None:
        """Record the epoch's LID, look for the turning point, set the next epoch's ``alpha``; reset the sums."""
        n = int(self.recorded)
        if n >= self.epochs:
            raise RuntimeError(f"D2L was built for epochs={self.epochs}; set criterion_kwargs epochs to the run's max_epochs")
        lid = float(self.lid_sum / self.lid_batches.clamp_min(1))
        if not lid > 0 and n > 0:  # an illegal estimate repeats the previous one, as the authors do
            lid = float(self.lids[n - 1])
        self.lids[n] = lid
        self.recorded += 1
        self.lid_sum.zero_()
        self.lid_batches.zero_()
        lids = self.lids[:n + 1].double()
        if int(self.turning_epoch) < 0 and n + 1 > self.init_epochs + self.window:
            before = lids[-self.window - 1:-1]
            if lids[-1] - before.mean() > 2 * before.std(unbiased=False):
                self.turning_epoch.fill_(n - 1)
        if int(self.turning_epoch) >= 0:
            self.alpha.fill_(torch.exp(-(n + 1) / self.epochs * lids[-1] / lids.min()).item())

"""Label regularization: criteria that soften, perturb or learn the training targets. No Lightning.

Every criterion maps ``(logits (N, C), targets (N,) int64)`` to a scalar and computes in float32,
so it is safe under bf16 autocast. ``symmetric_kl`` is R-Drop's consistency term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def symmetric_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """``0.5 (KL(p_a || p_b) + KL(p_b || p_a))`` summed over classes (dim 1), mean over the rest.

    ``p = softmax(logits)``. Both sides receive gradient, as R-Drop (Liang et al. 2021) trains both passes.
    The sum of the two KLs simplifies to ``sum_c (p_a - p_b)(log p_a - log p_b)``.
    """
    log_a, log_b = F.log_softmax(logits_a.float(), dim=1), F.log_softmax(logits_b.float(), dim=1)
    return 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(dim=1).mean()


def _soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """``mean_i -sum_c q_ic log softmax(z_i)_c``."""
    return -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _check_unit_interval(name: str, value: float, fix: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1); {fix}")


class CrossEntropy(nn.Module):
    """Plain cross-entropy ``mean_i -log softmax(z_i)_{y_i}``, the unregularized baseline."""

    multilabel: bool = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets)


class LabelSmoothing(nn.Module):
    """Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture").

    ``q = (1 - eps) onehot(y) + eps / C`` and ``L = mean_i -sum_c q_ic log p_ic``; identical to
    ``F.cross_entropy(..., label_smoothing=eps)``. Default ``smoothing=0.1`` is the paper's value.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, smoothing: float = 0.1) -> None:
        super().__init__()
        _check_unit_interval("smoothing", smoothing, "use e.g. smoothing=0.1 (0 gives plain cross-entropy)")
        self.num_classes, self.smoothing = num_classes, smoothing

    def soft_targets(self, targets: Tensor) -> Tensor:
        """The ``(N, C)`` target distribution ``(1 - eps) onehot(y) + eps / C``."""
        onehot = F.one_hot(targets, self.num_classes).float()
        return (1.0 - self.smoothing) * onehot + self.smoothing / self.num_classes

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return _soft_cross_entropy(logits.float(), self.soft_targets(targets))


class OnlineLabelSmoothing(nn.Module):
    """Online label smoothing (Zhang et al. 2021, "Delving Deep into Label Smoothing").

    Each class ``k`` has a learned soft label ``S_k`` (a row of ``soft_labels``), the mean softmax of
    the training samples of class ``k`` that the model classified correctly in the previous epoch:
    ``L = alpha CE(z, y) + (1 - alpha) mean_i -sum_c S_{y_i c} log p_ic``.
    ``S`` starts as uniform label smoothing, ``(1 - eps) I + eps / C``, so the first epoch trains like
    ``LabelSmoothing(eps)`` mixed with CE. Defaults: ``alpha=0.5`` (the paper's), ``smoothing=0.1``.

    Running state (docs/design.md, "Running state"): ``forward`` is pure. The owner of the criterion
    proposes ``observe(logits, targets)``, the step's per-class sums of the correct samples' softmax
    and their counts, and commits them with ``update_`` once per optimizer step, so a loss evaluated
    again within a step (FGM, PGD) adds nothing. Under DDP ``update_`` sums the increments across
    ranks before adding them, so every rank holds the same accumulators and DDP's broadcast of
    buffers from rank 0 changes nothing. Call ``epoch_end()`` once per training epoch.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, alpha: float = 0.5, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} is outside [0, 1]; it weights the hard CE term, e.g. alpha=0.5")
        _check_unit_interval("smoothing", smoothing, "it sets the initial soft labels, e.g. smoothing=0.1")
        self.num_classes, self.alpha = num_classes, alpha
        initial = (1.0 - smoothing) * torch.eye(num_classes) + smoothing / num_classes
        self.register_buffer("soft_labels", initial)
        self.register_buffer("accumulated", torch.zeros(num_classes, num_classes))
        self.register_buffer("counts", torch.zeros(num_classes))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        hard = F.cross_entropy(logits, targets)
        return self.alpha * hard + (1.0 - self.alpha) * _soft_cross_entropy(logits, self.soft_labels[targets])

    @torch.no_grad()
    def observe(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's increments as one row each: ``(1, C, C)`` sums of softmax, ``(1, C)`` counts, per true class."""
        probs = logits.float().softmax(dim=1)
        # Masking by multiplication instead of boolean indexing avoids a host sync per step.
        correct = (probs.argmax(dim=1) == targets).float()
        sums = torch.zeros_like(self.accumulated).index_add_(0, targets, probs * correct[:, None])
        counts = torch.zeros_like(self.counts).index_add_(0, targets, correct)
        return sums[None], counts[None]

    @torch.no_grad()
    def update_(self, sums: Tensor, counts: Tensor) -> None:
        """Add the observed increments (rows summed), summed over the ranks."""
        sums, counts = sums.sum(dim=0), counts.sum(dim=0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        self.accumulated += sums
        self.counts += counts

    @torch.no_grad()
    def epoch_end(self) -> None:
        """Replace each seen class's soft label by its accumulated mean, then reset the accumulators."""
        seen = self.counts > 0
        means = self.accumulated / self.counts.clamp_min(1.0)[:, None]
        self.soft_labels.copy_(torch.where(seen[:, None], means, self.soft_labels))
        self.accumulated.zero_()
        self.counts.zero_()


class DisturbLabel(nn.Module):
    """DisturbLabel (Xie et al. 2016, "DisturbLabel: Regularizing CNN on the Loss Layer").

    In training, each target is replaced with probability ``alpha`` by ``u ~ Uniform{0..C-1}`` (which may
    equal the true class, so a label actually changes with probability ``alpha (C-1)/C``), then
    ``L = CE(z, y~)``. In eval mode ``L = CE(z, y)``. Default ``alpha=0.1`` is in the paper's range.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, alpha: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} is outside [0, 1]; it is the disturbing probability, e.g. alpha=0.1")
        self.num_classes, self.alpha = num_classes, alpha

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.training and self.alpha > 0:
            disturb = torch.rand(targets.shape, device=targets.device) < self.alpha
            random_labels = torch.randint_like(targets, self.num_classes)
            targets = torch.where(disturb, random_labels, targets)
        return F.cross_entropy(logits.float(), targets)


class TfKDRegularization(nn.Module):
    """Teacher-free KD with a virtual teacher, Tf-KD_reg (Yuan et al. 2020, "Revisiting Knowledge
    Distillation via Label Smoothing Regularization"), as the authors' code computes it
    (``my_loss_function.py::loss_kd_regularization``, lines 33-51).

    The virtual teacher ``q`` puts ``a`` on the true class and ``(1 - a)/(C - 1)`` on each other one,
    and is softened as the code does, by a softmax of the *probabilities* over ``T``:
    ``q^T = softmax(q / T)``. The student is not tempered, and there is no ``T^2``:
    ``L = (1 - w) CE(z, y) + w m / (N C) sum_{i,c} q^T_ic log(q^T_ic / softmax(z_i)_c)``.
    The ``1 / (N C)`` is ``nn.KLDivLoss``'s default (element) mean, so ``m / C`` is the weight on
    the per-sample KL. At the optimum ``p = ((1 - w) onehot(y) + (w m / C) q^T) / (1 - w + w m / C)``.

    Defaults are the authors' CIFAR-100 ResNet-18 recipe (``correct_prob`` 0.99 fixed in their code;
    ``experiments/base_experiments/base_resnet18/params.json``: ``reg_alpha`` 0.1, ``reg_temperature``
    20, ``multiplier`` 100); on 100 classes its optimum gives the true class 0.901, like label
    smoothing 0.1. ``w m / C`` sets the strength, so ``multiplier=None`` (the default) means
    ``m = C``: ``w m / C = 0.1`` as in their recipe for any class count (m 100 on 100 classes; on 10
    classes m 10, optimum 0.91, where a fixed m 100 would give 0.53). An explicit multiplier is used as given.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, correct_prob: float = 0.99, temperature: float = 20.0,
                 weight: float = 0.1, multiplier: float | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: the virtual teacher needs at least 2 classes")
        if not 1.0 / num_classes <= correct_prob <= 1.0:
            raise ValueError(f"correct_prob={correct_prob} must lie in [1/C, 1] so the true class is the teacher's "
                             "most likely one, e.g. correct_prob=0.99")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0, e.g. temperature=20")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight={weight} is outside [0, 1]; it mixes CE and the KL term, e.g. weight=0.1")
        if multiplier is None:
            multiplier = float(num_classes)  # the recipe's strength: weight * multiplier / C = weight
        if multiplier < 0:
            raise ValueError(f"multiplier={multiplier} must be >= 0; it scales the KL term, e.g. multiplier=100 "
                             "on 100 classes (keep weight * multiplier / num_classes when C changes)")
        self.num_classes, self.weight, self.multiplier = num_classes, weight, multiplier
        off = (1.0 - correct_prob) / (num_classes - 1)
        teacher = torch.full((num_classes, num_classes), off, dtype=torch.float64).fill_diagonal_(correct_prob)
        log_teacher = torch.log_softmax(teacher / temperature, dim=1).float()
        self.register_buffer("log_teacher_probs", log_teacher, persistent=False)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        kl_sum = F.kl_div(F.log_softmax(logits, dim=1), self.log_teacher_probs[targets], reduction="sum",
                          log_target=True)
        kl = kl_sum / logits.numel() * self.multiplier
        return (1.0 - self.weight) * F.cross_entropy(logits, targets) + self.weight * kl


class KnowledgeRefinery(nn.Module):
    """Learned class-correlation targets, a simplified form of the knowledge-refinery idea (Ding et al.
    2021, "Knowledge Refinery: Learning from Decoupled Label"): a residual matrix trained with the network.

    For true class ``y`` the refined target is ``r_y = softmax(l_y)`` with logits ``l_yy = M`` and
    ``l_yc = (M / 2) tanh(R_yc)`` for ``c != y``; ``R`` (``residual``, C x C) starts at zero, so ``r_y``
    starts near one-hot, and under any ``R`` the true class stays at least ``M / 2`` logits ahead of every
    other class (the diagonal of ``R`` is unused). The loss is
    ``L = CE(z, y) + w T^2 mean_i KL(r_{y_i} || softmax(z_i / T))``
    with gradient into both the logits and ``R``: ``R`` learns which classes the network confuses, and
    the bound stops it from collapsing the target onto a wrong class. Add ``criterion.parameters()``
    to the optimizer. Defaults: ``weight=1, temperature=1, margin=5``.
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, weight: float = 1.0, temperature: float = 1.0, margin: float = 5.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight={weight} must be >= 0, e.g. weight=1.0")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0, e.g. temperature=1.0")
        if margin <= 0:
            raise ValueError(f"margin={margin} must be > 0; it is the true class's refined logit, e.g. margin=5.0")
        self.num_classes, self.weight, self.temperature, self.margin = num_classes, weight, temperature, margin
        self.residual = nn.Parameter(torch.zeros(num_classes, num_classes))
        self.register_buffer("off_diagonal", 1.0 - torch.eye(num_classes), persistent=False)

    def refined_targets(self, targets: Tensor) -> Tensor:
        """The ``(N, C)`` refined target distributions ``r_{y_i}``."""
        bounded = 0.5 * torch.tanh(self.residual.float()) * self.off_diagonal
        refined_logits = self.margin * (bounded + (1 - self.off_diagonal))
        return torch.softmax(refined_logits[targets], dim=1)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        refined = self.refined_targets(targets)
        log_student = F.log_softmax(logits / self.temperature, dim=1)
        kl = (refined * (refined.clamp_min(1e-12).log() - log_student)).sum(dim=1).mean()
        return F.cross_entropy(logits, targets) + self.weight * self.temperature**2 * kl

"""Training criteria selectable by name: ``build_criterion("focal", num_classes=10, gamma=2.0)``.

Every criterion is an ``nn.Module`` with ``forward(logits (N, C), targets) -> scalar``, takes
``num_classes`` first, and says by its ``multilabel`` attribute whether it expects multi-hot targets.
Some hold state: ``OnlineLabelSmoothing`` and ``D2L`` need ``epoch_end()`` each epoch, and ``KnowledgeRefinery`` and
``DropMax`` have parameters the caller must add to the optimizer. A criterion with ``class_scores(logits)``
(``DropMax``) changes what evaluation and prediction score: the task calls it on the network's logits.
"""

from __future__ import annotations

import inspect

from torch import nn

from lightning_modules.classification.d2l import D2L
from lightning_modules.classification.dropmax import DropMax
from lightning_modules.classification.imbalance_losses import (FocalLoss, MultiLabelBCE, SigmoidF1, TopKLoss,
                                                               WeightedCrossEntropy)
from lightning_modules.classification.label_regularization import (
    CrossEntropy,
    DisturbLabel,
    KnowledgeRefinery,
    LabelSmoothing,
    OnlineLabelSmoothing,
    TfKDRegularization,
    symmetric_kl,
)

CRITERIA: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "label_smoothing": LabelSmoothing,
    "online_label_smoothing": OnlineLabelSmoothing,
    "disturb_label": DisturbLabel,
    "tfkd_reg": TfKDRegularization,
    "knowledge_refinery": KnowledgeRefinery,
    "dropmax": DropMax,
    "d2l": D2L,
    "focal": FocalLoss,
    "ohem": TopKLoss,
    "weighted_ce": WeightedCrossEntropy,
    "bce": MultiLabelBCE,
    "sigmoid_f1": SigmoidF1,
}


def build_criterion(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the criterion registered as ``name``; ``kwargs`` go to its constructor."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; valid names: {', '.join(sorted(CRITERIA))}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    cls = CRITERIA[name]
    # A misspelt option should fail with the list of options, not with a bare TypeError.
    accepted = [p for p in inspect.signature(cls).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"criterion {name!r} does not take {', '.join(unknown)}; "
                         f"its options are: {', '.join(accepted) or 'none'}")
    return cls(num_classes, **kwargs)


__all__ = [
    "CRITERIA", "build_criterion", "symmetric_kl", "CrossEntropy", "LabelSmoothing", "OnlineLabelSmoothing",
    "DisturbLabel", "TfKDRegularization", "KnowledgeRefinery", "DropMax", "D2L", "FocalLoss", "TopKLoss", "WeightedCrossEntropy",
    "MultiLabelBCE", "SigmoidF1",
]

"""The supervised baseline every semi-supervised table compares against."""

from __future__ import annotations

from lightning_modules.classification.semi_supervised import SemiSupervisedModule


class Supervised(SemiSupervisedModule):
    """Cross-entropy on the labeled images only.

    Same network, optimizer, schedule, EMA evaluation and steps as the semi-supervised methods,
    so the difference in a table is the unlabeled data alone. The DataModule builds no unlabeled
    stream for it (``unlabeled_views`` is empty).

    Loss: ``L = 1/B sum_b CE(y_b, p(y | weak(x_b)))``.
    """

    unlabeled_views = ()

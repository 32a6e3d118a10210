"""DeFixMatch (Schmutz et al., ICLR 2023, "Don't fear the unlabelled: safe semi-supervised learning via
debiasing"), as USB runs it."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.ssl.fixmatch import FixMatch
from lightning_modules.ssl.losses import confident_pseudo_labels, masked_accuracy, masked_cross_entropy


class DeFixMatch(SemiSupervisedModule):
    """FixMatch debiased: its pseudo-label loss on the labeled images is subtracted from the unlabeled one.

    With ``l(w, s) = 1/n sum_i 1[max q_i >= tau] CE(argmax q_i, p(y | s_i))``, ``q_i = softmax(logits(w_i))``
    (no gradient through ``q``), the weak and strong views of the labeled batch ``x`` and of the unlabeled
    batch ``u``:

        ``L = 1/2 (CE(y, p(y | weak(x))) + CE(y, p(y | strong(x))))
        + lambda_u (l(weak(u), strong(u)) - l(weak(x), strong(x)))``.

    The subtracted term is the same pseudo-label loss evaluated where the labels are known; it makes the
    unlabeled term an unbiased correction of the labeled risk (the paper's debiasing), so a bad pseudo-label
    scheme cannot pull the model further than it pulls the labeled images.

    Against the authors' code (USB ``semilearn/algorithms/defixmatch/defixmatch.py`` lines 48-116: one
    forward over labeled weak, labeled strong, unlabeled weak and strong (``use_cat``), the supervised loss
    the mean of the two labeled views' CE, hard pseudo-labels and the fixed-threshold mask from the detached
    probabilities of both weak views, ``sup + lambda_u * (unsup - anti_unsup)``), pinned by
    ``tests/lightning_modules/ssl/test_defixmatch_refixmatch.py``. USB's classic-CV labeled dataset makes no
    strong labeled view (``datasets/cv_datasets/datasetbase.py`` line 94), so its recipe cannot feed
    ``x_lb_s``; here the module asks for it through ``labeled_views`` and the DataModule draws it.

    Paper recipe as USB runs it (CIFAR-10, WRN-28-2, ``config/classic_cv/defixmatch/*.yaml``): tau = 0.95,
    hard labels (USB's T = 0.5 is then unused), lambda_u = 0.5, mu = 7, B = 64, SGD 0.03 Nesterov, weight
    decay 5e-4, cosine 7/16 over 2^20 steps, EMA 0.999.

    Args:
        threshold: confidence threshold tau, on both weak views.
        unlabeled_loss_weight: lambda_u (USB's ``ulb_loss_ratio`` 0.5).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = FixMatch.unlabeled_views
    labeled_views = ("strong",)
    labeled_loss_views = ("strong",)  # the labeled loss is the mean over both labeled views

    def __init__(self, threshold: float = 0.95, unlabeled_loss_weight: float = 0.5, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # one pass per labeled view (USB)
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = threshold

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pseudo_labels, mask = confident_pseudo_labels(logits["weak"], self.threshold)
        labeled_pseudo_labels, labeled_mask = confident_pseudo_labels(logits["labeled"], self.threshold)
        unlabeled_term = masked_cross_entropy(logits["strong"], pseudo_labels, mask)
        labeled_term = masked_cross_entropy(logits["labeled_strong"], labeled_pseudo_labels, labeled_mask)
        return {
            "unlabeled_loss": unlabeled_term - labeled_term,
            "unlabeled_term": unlabeled_term.detach(),
            "labeled_term": labeled_term.detach(),
            "mask_ratio": mask.mean(),
            "labeled_mask_ratio": labeled_mask.mean(),
            "pseudo_label_acc": masked_accuracy(pseudo_labels, batch["target"], mask),
        }

"""CRMatch (Fan, Kukleva, Dai and Schiele, "Revisiting Consistency Regularization for Semi-Supervised Learning",
GCPR 2021 / IJCV 2022), as USB runs it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_rdrop
from lightning_modules.ssl.losses import confident_pseudo_labels, masked_accuracy, masked_cross_entropy

#: the unlabeled weak view rotated by 90, 180 and 270 degrees (datamodules/classification/views.py)
ROTATED_VIEWS = ("weak_rot90", "weak_rot180", "weak_rot270")


class CRMatchNet(nn.Module):
    """A backbone with CRMatch's two heads (USB ``CRMatch_Net``, ``semilearn/algorithms/crmatch/crmatch.py``
    lines 61-112): ``feature_head``, a linear map of the flattened last feature maps to ``num_features``
    (the "ds" head), and ``rotation_head``, Linear-ReLU-Linear from the pooled features to 4 rotations.

    ``forward(x)`` is the backbone's logits (evaluation, prediction); :meth:`heads` gives all three outputs.
    The maps are average-pooled to ``grid x grid`` before the feature head: USB's size for WRN on 32x32 images
    is 8 (its lines 75-81; 6 on STL-10, 7 on ImageNet), where pooling changes nothing; on smaller images
    (2x2 maps on digits) each map cell is repeated, which keeps the head the same linear map of the cells.
    """

    def __init__(self, backbone: nn.Module, rotation: bool = True, grid: int = 8) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_feature_maps") or not hasattr(backbone, "fc"):
            raise ValueError(f"CRMatch needs a backbone with forward_feature_maps() and an fc head (the wrn networks), "
                             f"got {type(backbone).__name__}: pick network=wrn28_2 (or another wrn)")
        width = backbone.num_features
        self.backbone, self.grid = backbone, grid
        self.feature_head = nn.Linear(grid * grid * width, width)
        self.rotation_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)) if rotation else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def heads(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits``, ``feature_logits`` and, with the rotation head, ``rotation_logits``."""
        maps = self.backbone.forward_feature_maps(images)
        features = maps.mean(dim=(2, 3))
        if maps.shape[-2:] != (self.grid, self.grid):
            maps = F.adaptive_avg_pool2d(maps, self.grid)
        out = {"logits": self.backbone.fc(features), "feature_logits": self.feature_head(maps.flatten(1))}
        if self.rotation_head is not None:
            out["rotation_logits"] = self.rotation_head(features)
        return out


class CRMatch(SemiSupervisedModule):
    """FixMatch plus a feature-distance term and rotation prediction on the unlabeled images.

    With ``q_b = softmax(logits(weak(u_b)))`` (no gradient), ``m_b = 1[max q_b >= tau]``, ``d(x)`` the
    feature head's output and ``r_k(x)`` the image turned by ``k * 90`` degrees:

        ``L = L_s + lambda_u [1/(mu B) sum_b m_b CE(argmax q_b, p(y | strong(u_b)))
        + 1/(mu B) sum_b m_b max(0, cos(d(strong(u_b)), d(weak(u_b))))
        + lambda_rot 1/(4 B_r) sum_{b <= B_r, k} CE(k, rot(r_k(weak(u_b))))]``.

    The middle term pushes the feature-head outputs of the two views apart (a cosine at most 0,
    ``F.cosine_embedding_loss`` with target -1): the paper asks for consistency of the classifier's outputs but
    not of the features, whose distance it keeps large (its FeatDistLoss). Gradient reaches both views' heads.

    Against the authors' code (USB ``semilearn/algorithms/crmatch/crmatch.py`` lines 225-283: one forward over
    labeled, weak, strong and rotated images (``use_cat``), hard labels and the fixed-threshold mask from the
    weak logits, ``Lx + Lu + Ld + Lrot`` with no weight on the unsupervised terms; lines 30-55 and 203-210: the
    rotated batch is ``B_r = B`` unlabeled images under the labeled (weak) transform, each turned 0/90/180/270
    degrees, labels 0-3), pinned by ``tests/lightning_modules/ssl/test_crmatch_sequencematch.py``. USB's
    rotated images come from a loader of their own; here they are the first ``B_r`` images of the unlabeled
    weak view turned by the DataModule (``weak_rot90``, ... in ``unlabeled_views``), the same draw.

    Paper recipe as USB runs it (CIFAR-10, WRN-28-2, ``config/classic_cv/crmatch/*.yaml``): tau = 0.95, hard
    labels, lambda_u = 1 (USB ignores ``ulb_loss_ratio``: 1 reproduces it), lambda_rot = 1, B_r = B = 64,
    mu = 7, SGD 0.03 Nesterov, weight decay 5e-4, cosine 7/16 over 2^20 steps, EMA 0.999 (USB's CIFAR-10
    error at 40 labels: 10.13 %, at 4000: 3.81 %).

    Args:
        threshold: confidence threshold tau.
        rotation_loss_weight: lambda_rot (USB's ``rot_loss_ratio``); 0 drops the rotation head and views.
        rotation_batch_size: B_r, the unlabeled images rotated per step; None: the labeled batch size (USB).
        feature_grid: the feature maps' side before the feature head (8: USB's WRN on 32x32 images).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    trains_through_forward_views = False  # the heads need the feature maps: its own forward (compute_losses)

    def __init__(self, threshold: float = 0.95, rotation_loss_weight: float = 1.0,
                 rotation_batch_size: int | None = None, feature_grid: int = 8, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # its own forward (compute_losses)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if rotation_loss_weight < 0 or feature_grid < 1 or (rotation_batch_size is not None and rotation_batch_size < 1):
            raise ValueError(f"CRMatch needs rotation_loss_weight >= 0, feature_grid >= 1 and rotation_batch_size >= 1 "
                             f"(or None: the labeled batch size); got {rotation_loss_weight}, {feature_grid}, "
                             f"{rotation_batch_size}")
        super().__init__(**kwargs)
        self.threshold, self.rotation_loss_weight, self.rotation_batch_size = threshold, rotation_loss_weight, rotation_batch_size
        self.unlabeled_views = ("weak", "strong") + (ROTATED_VIEWS if rotation_loss_weight > 0 else ())

    def build_net(self) -> nn.Module:
        hp = self.hparams
        return CRMatchNet(super().build_net(), rotation=hp.rotation_loss_weight > 0, grid=hp.feature_grid)

    def forward_heads(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The heads' outputs per batch: one forward over all (``concat_forward``, USB's ``use_cat``) or one each."""
        if not self.hparams.concat_forward:
            return [self.net.heads(x) for x in images]
        joint = self.net.heads(torch.cat(images))
        pieces = {name: out.split([len(x) for x in images]) for name, out in joint.items()}
        return [{name: parts[i] for name, parts in pieces.items()} for i in range(len(images))]

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        if unlabeled is None:  # no unlabeled stream: supervised only
            return {"labeled_loss": self.labeled_loss(self.net(labeled["image"]), labeled["target"])}
        images = [labeled["image"], unlabeled["weak"], unlabeled["strong"]]
        rotated = self.rotation_loss_weight > 0
        if rotated:
            count = self.rotation_batch_size or len(labeled["image"])
            turns = [unlabeled[v][:count] for v in ("weak", *ROTATED_VIEWS)]
            if turns[0].shape[-1] != turns[0].shape[-2]:
                raise ValueError(f"CRMatch's rotation task needs square images, got {tuple(turns[0].shape[-2:])}: "
                                 "crop them square or pass rotation_loss_weight=0")
            images.append(torch.cat(turns))
        outputs = self.forward_heads(images)
        losses = {"labeled_loss": self.labeled_loss(outputs[0]["logits"], labeled["target"])}
        weak, strong = outputs[1], outputs[2]
        pseudo_labels, mask = confident_pseudo_labels(weak["logits"], self.threshold)
        consistency = masked_cross_entropy(strong["logits"], pseudo_labels, mask)
        opposite = -torch.ones(len(mask), device=mask.device)
        distance = (F.cosine_embedding_loss(strong["feature_logits"].float(), weak["feature_logits"].float(), opposite,
                                            reduction="none") * mask).mean()
        unlabeled_loss = consistency + distance
        losses.update(consistency_loss=consistency.detach(), feature_distance_loss=distance.detach())
        if rotated:
            rotation_logits = outputs[3]["rotation_logits"]
            rotation_targets = torch.arange(4, device=mask.device).repeat_interleave(len(rotation_logits) // 4)
            rotation = F.cross_entropy(rotation_logits.float(), rotation_targets)
            unlabeled_loss = unlabeled_loss + self.rotation_loss_weight * rotation
            losses["rotation_loss"] = rotation.detach()
        losses.update(unlabeled_loss=unlabeled_loss, mask_ratio=mask.mean(),
                      pseudo_label_acc=masked_accuracy(pseudo_labels, unlabeled["target"], mask))
        return losses

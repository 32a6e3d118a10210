"""torchvision's R-CNN detectors by name, with configurable anchors, heads and RoI pooling.

``build_detection_network("fasterrcnn_mobilenet_v3_large_fpn", num_classes=81, roi_pool="pool")``
builds the model offline (``weights=None``, ``weights_backbone=None`` unless given); anchors get
one size tuple per FPN map; ``roi_pool="pool"`` swaps RoIAlign for Fast R-CNN's RoI max pooling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import roi_pool
from torchvision.ops.poolers import LevelMapper

from lightning_modules.core.checkpoint_loading import read_weights_file

#: builder and number of FPN feature maps (anchor levels) of each supported network
NETWORKS = {
    "fasterrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, 5),
    "fasterrcnn_resnet50_fpn_v2": (detection.fasterrcnn_resnet50_fpn_v2, 5),
    "fasterrcnn_mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn, 3),
    "maskrcnn_resnet50_fpn": (detection.maskrcnn_resnet50_fpn, 5),
    "maskrcnn_resnet50_fpn_v2": (detection.maskrcnn_resnet50_fpn_v2, 5),
}


class MultiScaleRoIMaxPool(nn.Module):
    """Fast R-CNN's RoI max pooling on an FPN, with the call signature of ``MultiScaleRoIAlign``.

    Each box is pooled from one level, picked by the FPN rule ``k = floor(4 + log2(sqrt(wh) / 224))``
    clamped to the levels present; levels are indexed from the finest map's stride, as
    torchvision's RoIAlign pooler does (on MobileNet's FPN, whose maps share stride 32, only the first is used).
    """

    def __init__(self, featmap_names: list[str], output_size: int = 7) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size)  # FasterRCNN sizes its box head from this

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        maps = [features[name] for name in self.featmap_names if name in features]
        input_height = max(shape[0] for shape in image_shapes)
        scales = [2.0 ** round(math.log2(m.shape[-2] / input_height)) for m in maps]
        levels = LevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])))(proposals)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(proposals)])
        pooled = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (feature_map, scale) in enumerate(zip(maps, scales)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_pool(feature_map, rois[index], self.output_size, spatial_scale=scale).to(pooled.dtype)
        return pooled


def build_detection_network(
    name: str, num_classes: int, weights: str | None = None, weights_backbone: str | None = None,
    anchor_sizes: list[list[int]] | None = None, aspect_ratios: list[float] | None = None, roi_pool: str = "align",
    rpn_kwargs: dict[str, Any] | None = None, roi_heads_kwargs: dict[str, Any] | None = None, **kwargs: Any,
) -> detection.GeneralizedRCNN:
    """A torchvision R-CNN by name; ``kwargs`` go to its constructor (``min_size``, ``max_size``, ...).

    ``rpn_kwargs`` / ``roi_heads_kwargs`` keys may omit their ``rpn_`` / ``box_`` prefix.
    With pretrained ``weights`` the box (and mask) predictors are replaced when ``num_classes``
    differs from the weights' 91 COCO classes.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown detection network {name!r}; choose one of {sorted(NETWORKS)}")
    if roi_pool not in ("align", "pool"):
        raise ValueError(f"roi_pool must be 'align' or 'pool', got {roi_pool!r}")
    builder, feature_maps = NETWORKS[name]
    options = {**_prefixed(rpn_kwargs, "rpn_"), **_prefixed(roi_heads_kwargs, "box_"), **kwargs}
    model = builder(weights=weights, weights_backbone=weights_backbone,
                    num_classes=None if weights is not None else num_classes, **options)
    if roi_pool == "pool":  # swapped in after building: torchvision's constructor accepts only MultiScaleRoIAlign
        default = model.roi_heads.box_roi_pool
        model.roi_heads.box_roi_pool = MultiScaleRoIMaxPool(default.featmap_names, default.output_size[0])
    if weights is not None and model.roi_heads.box_predictor.cls_score.out_features != num_classes:
        replace_predictors(model, num_classes)
    if anchor_sizes is not None or aspect_ratios is not None:
        set_anchors(model, feature_maps, anchor_sizes, aspect_ratios)
    return model


def _prefixed(options: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    return {(k if k.startswith(prefix) else prefix + k): v for k, v in (options or {}).items()}


def set_anchors(model: detection.GeneralizedRCNN, feature_maps: int, sizes: list[list[int]] | None,
                ratios: list[float] | None) -> None:
    """One tuple of anchor sizes per feature map, the same aspect ratios on every map; a new
    RPN head (same depth) when the number of anchors per location changes."""
    old = model.rpn.anchor_generator
    sizes = tuple(tuple(s) for s in sizes) if sizes is not None else old.sizes
    if len(sizes) != feature_maps:
        raise ValueError(f"this network has {feature_maps} feature maps: anchor_sizes needs one list of sizes "
                         f"per map, got {len(sizes)}")
    ratios = (tuple(ratios),) * feature_maps if ratios is not None else old.aspect_ratios
    generator = AnchorGenerator(sizes, ratios)
    per_location = generator.num_anchors_per_location()
    if len(set(per_location)) != 1:
        raise ValueError(f"the RPN head needs the same number of anchors on every map, got {per_location}")
    model.rpn.anchor_generator = generator
    if per_location[0] != old.num_anchors_per_location()[0]:
        model.rpn.head = RPNHead(model.backbone.out_channels, per_location[0], conv_depth=len(model.rpn.head.conv))


def replace_predictors(model: detection.GeneralizedRCNN, num_classes: int) -> None:
    """Fresh box (and mask) class predictors for ``num_classes``: fine-tuning pretrained weights."""
    heads = model.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    if heads.mask_predictor is not None:
        conv = heads.mask_predictor.conv5_mask
        heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes)


def load_network_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file (or a Lightning checkpoint's ``net.*`` weights); refuse one that does not fit."""
    state = read_weights_file(path, "weights_path")
    if "state_dict" in state:
        state = {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"weights_path {path} does not fit this network: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, {len(reshaped)} of another shape {reshaped[:3]}")
    model.load_state_dict(state)


# --- metric helpers ------------------------------------------------------------------------

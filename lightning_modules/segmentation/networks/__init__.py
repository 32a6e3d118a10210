"""Segmentation networks: UNet 3+, RefineNet, Light-Weight RefineNet, and smp's architectures, by name.

Usage::

    >>> import torch
    >>> from lightning_modules.segmentation.networks import build_segmentation_network
    >>> net = build_segmentation_network("unet3plus", encoder_name="resnet18", classes=2).eval()
    >>> net(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
    >>> net = build_segmentation_network("DeepLabV3Plus", encoder_name="resnet18", classes=2)  # smp

Every network is built like smp's: ``get_encoder`` gives the feature maps, a decoder consumes
``encoder.out_channels``, a head maps to ``classes``. Each takes ``encoder_name``,
``encoder_weights``, ``in_channels``, ``classes`` and ``activation``; inputs must have height
and width divisible by the encoder's output stride (32 by default), else ``ValueError``.
``encoder_weights`` defaults to ``None`` everywhere, so nothing is downloaded unless asked for.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from .refinenet import LightWeightRefineNet, RefineNet
from .unet3plus import UNet3Plus

__all__ = [
    "UNet3Plus",
    "RefineNet",
    "LightWeightRefineNet",
    "build_segmentation_network",
    "available_segmentation_networks",
]

_OWN_NETWORKS: dict[str, type[nn.Module]] = {
    "unet3plus": UNet3Plus,
    "refinenet": RefineNet,
    "lw_refinenet": LightWeightRefineNet,
}


def _smp_architectures() -> dict[str, type[nn.Module]]:
    """smp's architectures by lowercase class name (``"unet"``, ``"unetplusplus"``, ``"fpn"``, ...)."""
    return {
        name.lower(): cls
        for name in smp.__all__
        if isinstance(cls := getattr(smp, name, None), type) and issubclass(cls, smp.base.SegmentationModel)
    }


def available_segmentation_networks() -> list[str]:
    """Our names, then smp's class names (any of them also accepted in lower case)."""
    return list(_OWN_NETWORKS) + sorted(cls.__name__ for cls in _smp_architectures().values())


def build_segmentation_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the segmentation network called ``name``; ``kwargs`` go to its constructor.

    ``name``: ``"unet3plus"``, ``"refinenet"``, ``"lw_refinenet"`` (or the class names
    ``"UNet3Plus"``, ``"RefineNet"``, ``"LightWeightRefineNet"``), or an smp architecture by class
    name or in lower case (``"Unet"``, ``"unet"``, ``"UnetPlusPlus"``, ``"FPN"``, ``"DeepLabV3Plus"``...).
    ``encoder_weights`` defaults to ``None`` (random init) for smp's models too, whose own
    default would download ImageNet weights. Raises ``ValueError`` for an unknown name.
    """
    key = name.lower()
    own = _OWN_NETWORKS | {cls.__name__.lower(): cls for cls in _OWN_NETWORKS.values()}
    if key in own:
        return own[key](**kwargs)
    architectures = _smp_architectures()
    if key in architectures:
        kwargs.setdefault("encoder_weights", None)
        return architectures[key](**kwargs)
    raise ValueError(
        f"unknown segmentation network {name!r}; valid names: {', '.join(available_segmentation_networks())} "
        "(case-insensitive)"
    )

"""Backbones by name, timm-style.

Usage::

    >>> from lightning_modules.classification.networks import build_network
    >>> net = build_network("wrn28_2", num_classes=10)                   # registered
    >>> net = build_network("wrn16_4", num_classes=10, dropout=0.3)      # any wrn{depth}_{k}
    >>> net = build_network("resnet18", num_classes=10, in_channels=1)   # torchvision, random init
    >>> net = build_network("timm:resnet18", num_classes=10)  # doctest: +SKIP

Name forms, tried in this order: a registered name (see ``available_networks()``),
``wrn{depth}_{k}``, ``timm:<name>``, ``torchvision:<name>`` or a bare torchvision classification
model name. Nothing is ever downloaded: torchvision and timm models start from random weights.

Add an architecture with the decorator; the factory receives ``num_classes``, ``in_channels``
and any extra keyword arguments given to ``build_network``::

    @register_network("my_net")
    def _my_net(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module: ...
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from .wide_resnet import WideResNet

__all__ = ["WideResNet", "build_network", "available_networks", "register_network"]

NetworkFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, NetworkFactory] = {}
_WRN_PATTERN = re.compile(r"wrn(\d+)_(\d+)")


def register_network(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Register ``factory(num_classes, in_channels=3, **kwargs)`` under ``name``."""

    def decorator(factory: NetworkFactory) -> NetworkFactory:
        if name in _REGISTRY:  # silently replacing an architecture would be a nasty surprise
            raise ValueError(f"network {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_networks() -> list[str]:
    """The explicitly registered names (the pattern and prefix forms are not enumerated)."""
    return sorted(_REGISTRY)


@register_network("wrn28_2")
def _wrn28_2(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    return WideResNet(num_classes, depth=28, widen_factor=2, in_channels=in_channels, **kwargs)


@register_network("wrn28_8")
def _wrn28_8(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    return WideResNet(num_classes, depth=28, widen_factor=8, in_channels=in_channels, **kwargs)


class RepeatChannels(nn.Module):
    """Feeds a 1-channel image to a 3-channel model by repeating it (grey -> RGB).

    Unlike a new first conv, this adds no parameters and keeps the wrapped architecture intact.
    The wrapped model is ``.model``.
    """

    def __init__(self, model: nn.Module, repeats: int = 3) -> None:
        super().__init__()
        self.model = model
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.repeat(1, self.repeats, 1, 1))


@lru_cache(maxsize=1)
def _torchvision_classifiers() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _build_torchvision(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    import torchvision

    if in_channels not in (1, 3):
        raise ValueError(
            f"torchvision models take 3 channels (1 is repeated to 3); got in_channels={in_channels}. "
            f"Use 'timm:{name}' or a 'wrn{{depth}}_{{k}}' network, which accept any channel count."
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return RepeatChannels(model) if in_channels == 1 else model


def _build_timm(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    import timm  # a declared dependency, imported only when asked for: it is slow to import

    if not timm.is_model(name):
        stem = name.rstrip("0123456789_")
        close = timm.list_models(f"{stem}*")[:8] if stem else []
        raise ValueError(f"unknown timm model {name!r} in 'timm:{name}': timm.list_models() lists the names"
                         + (f"; similar: {', '.join(close)}" if close else ""))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def build_network(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the network called ``name`` with a ``num_classes``-way head, randomly initialised.

    ``kwargs`` go to the underlying constructor (e.g. ``dropout=0.3`` for a Wide ResNet).
    Raises ``ValueError`` for a name that matches none of the accepted forms.
    """
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    match = _WRN_PATTERN.fullmatch(name)
    if match:
        depth, k = map(int, match.groups())
        return WideResNet(num_classes, depth=depth, widen_factor=k, in_channels=in_channels, **kwargs)
    if name.startswith("timm:"):
        return _build_timm(name.removeprefix("timm:"), num_classes, in_channels, **kwargs)
    tv_name = name.removeprefix("torchvision:")
    if tv_name in _torchvision_classifiers():
        return _build_torchvision(tv_name, num_classes, in_channels, **kwargs)
    raise ValueError(
        f"unknown network {name!r}. Valid forms: a registered name ({', '.join(available_networks())}); "
        "'wrn{depth}_{k}' with depth = 6n+4 (e.g. 'wrn16_2'); 'torchvision:<name>' or a bare torchvision "
        "classification model name (e.g. 'resnet18'); 'timm:<name>'."
    )

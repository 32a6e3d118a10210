"""UniMatch's feature perturbation: the decoder also runs on a channel-dropped copy of the encoder features.

Within one forward, every feature map ``f`` the encoder returns becomes ``cat(f, Dropout2d(p)(f))`` along the
batch, so the decoder and heads see the clean images and their perturbed copies together (BatchNorm on the
doubled batch) and the output's first half is the ordinary prediction, its second the perturbed one. This is
the authors' ``need_fp`` forward: LiheYoung/UniMatch (commit 0324f3d) ``model/semseg/deeplabv3plus.py``
lines 41-50 (DeepLabv3+: its two decoder inputs) and ``more-scenarios/medical/model/unet.py`` lines 168-173
(UNet: every encoder feature), with ``Dropout2d(0.5)`` in training mode whatever the network's mode.

It is a forward hook on ``net.encoder``, so no network's ``forward`` changes. Supported: every network with an
smp encoder whose output is the list of feature maps its decoder takes: smp's architectures (``Unet``,
``UnetPlusPlus``, ``FPN``, ``DeepLabV3``, ``DeepLabV3Plus``, ``Linknet``, ``MAnet``, ``PAN``, ``PSPNet``,
``UPerNet``, ``Segformer``) and ours (``unet3plus``, ``refinenet``, ``lw_refinenet``). Refused with a
``ValueError``: a network without an ``encoder`` submodule, and an encoder that returns anything but a list of
tensors (smp's ``DPT``, whose encoder adds prefix tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn


def check_feature_perturbation(net: nn.Module, method: str = "UniMatch") -> None:
    """Raise ``ValueError`` unless ``net`` has an ``encoder`` submodule that the hook can wrap."""
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"{method}'s feature perturbation needs a network with an encoder submodule (net.encoder) "
                         f"whose feature maps feed the decoder; {type(net).__name__} has none. Use an smp "
                         "architecture (Unet, FPN, DeepLabV3Plus, ...), unet3plus, refinenet or lw_refinenet")
    if isinstance(net, smp.DPT):  # its encoder returns (features, prefix tokens), not the decoder's feature list
        raise ValueError(f"{method}'s feature perturbation does not support smp's DPT (its encoder returns prefix "
                         "tokens beside the feature maps); use Segformer, UPerNet, Unet, DeepLabV3Plus, ... instead")


@contextmanager
def perturbed_features(net: nn.Module, dropout: float = 0.5) -> Iterator[None]:
    """Within the block, ``net(x)`` returns ``2 N`` predictions: ``x``'s, then those decoded from its encoder
    features with whole channels dropped (probability ``dropout``, survivors scaled by ``1 / (1 - dropout)``)."""
    check_feature_perturbation(net)
    handle = net.encoder.register_forward_hook(_DoubleFeatures(type(net).__name__, dropout))
    try:
        yield
    finally:
        handle.remove()


class _DoubleFeatures:
    def __init__(self, network: str, dropout: float) -> None:
        self.network, self.dropout = network, dropout

    def __call__(self, module: nn.Module, inputs: Any, features: Any) -> list[torch.Tensor]:
        if not isinstance(features, (list, tuple)) or not all(isinstance(f, torch.Tensor) for f in features):
            raise ValueError(f"UniMatch's feature perturbation needs an encoder that returns a list of feature maps; "
                             f"{self.network}'s {type(module).__name__} returns {type(features).__name__} "
                             f"(smp's DPT adds prefix tokens): choose another architecture")
        # the authors' nn.Dropout2d(0.5) is a fresh module, so it drops in eval mode too
        return [torch.cat((f, F.dropout2d(f, self.dropout, training=True))) for f in features]

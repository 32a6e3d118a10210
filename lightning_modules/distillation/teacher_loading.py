"""Frozen teachers for distillation, loaded from a local file (nothing is ever downloaded).

Two kinds of file are accepted:

* a Lightning checkpoint written by any module of this collection (``train.py fit`` writes
  them): its hyper-parameters say which network to build, and the teacher takes the EMA weights
  when the checkpoint has them (they are what that run evaluated), else the trained ``net``;
* a plain ``state_dict`` of a torchvision, timm or labelwise network (``torch.save(net.state_dict(), f)``),
  together with the network's name for :func:`~lightning_modules.classification.networks.build_network`.

Usage::

    teacher = load_teacher("runs/wrn28_8/last.ckpt", num_classes=10, in_channels=3)
    teacher = load_teacher("resnet18_cifar.pt", num_classes=10, in_channels=3, network="resnet18")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.classification.networks import build_network
from lightning_modules.core.checkpoint_loading import read_weights_file

__all__ = ["load_teacher"]


def load_teacher(
    path: str | Path,
    num_classes: int,
    in_channels: int,
    network: str | None = None,
    network_kwargs: dict[str, Any] | None = None,
    use_ema: bool = True,
) -> nn.Module:
    """The network stored in ``path``, in eval mode with ``requires_grad`` off.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` when the file's class
    count, architecture or weights do not match what was asked for, naming both sides.
    """
    path = Path(path)
    stored = read_weights_file(path, "teacher file")
    hparams = stored.get("hyper_parameters") if isinstance(stored, dict) else None
    if hparams is not None:
        network, network_kwargs = _check_checkpoint(path, hparams, num_classes, in_channels, network, network_kwargs)
        state = _checkpoint_weights(stored, use_ema)
    else:
        if network is None:
            raise ValueError(f"teacher file {path} is a plain state_dict, which does not say its architecture: "
                             "give teacher_network (e.g. 'wrn28_8' or 'resnet18')")
        state = stored.get("state_dict", stored) if isinstance(stored, dict) else stored
    teacher = build_network(network, num_classes=num_classes, in_channels=in_channels, **(network_kwargs or {}))
    _load_strict(teacher, state, path, network, num_classes)
    return teacher.eval().requires_grad_(False)


def _check_checkpoint(path: Path, hparams: dict[str, Any], num_classes: int, in_channels: int,
                      network: str | None, network_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    stored_network = hparams.get("network")
    if stored_network is None:
        raise ValueError(f"checkpoint {path} has no 'network' hyper-parameter: it was not written by a "
                         "labelwise classifier; save the teacher's state_dict and pass teacher_network instead")
    if network is not None and network != stored_network:
        raise ValueError(f"teacher checkpoint {path} holds a {stored_network!r} network, but teacher_network="
                         f"{network!r} was asked for: drop teacher_network or pass the matching checkpoint")
    for name, expected in (("num_classes", num_classes), ("in_channels", in_channels)):
        if hparams.get(name, expected) != expected:
            raise ValueError(f"teacher checkpoint {path} was trained with {name}={hparams[name]}, but the student "
                             f"has {name}={expected}: distil from a teacher trained on the same classes and images")
    return stored_network, network_kwargs or hparams.get("network_kwargs") or {}


def _checkpoint_weights(checkpoint: dict[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    if use_ema and "ema" in checkpoint:
        return checkpoint["ema"]["module"]
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def _load_strict(teacher: nn.Module, state: dict[str, torch.Tensor], path: Path, network: str, num_classes: int) -> None:
    own = teacher.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"teacher weights in {path} do not fit a {network!r} network with {num_classes} classes: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(mismatched)} shape mismatches (file vs network) {mismatched[:3]}. Check teacher_network, "
            "its network_kwargs and num_classes"
        )
    teacher.load_state_dict(state)

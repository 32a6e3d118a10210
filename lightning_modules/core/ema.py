"""Exponential moving average of a module's weights, shared by every method that needs one.

The averaged copy is a plain attribute, never a registered submodule, so DDP does not wrap it
(Lightning issue #17847), its buffers are not broadcast from rank 0, and it receives no gradient.
The update is one multi-tensor ``torch._foreach_lerp_`` call per dtype/device group.

Usage::

    ema = EMAModel(net, decay=0.999)
    ...  # after each optimizer step
    ema.update(net)
    logits = ema.module(images)
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn


class EMAModel:
    """Keeps ``module``, an exponential moving average of another module's weights.

    Args:
        model: the module to average; it is deep-copied once.
        decay: weight of the old average, ``ema = decay * ema + (1 - decay) * weights``.
        warmup_power: if set, the decay ramps up as ``min(decay, 1 - (1 + t) ** -warmup_power)``
            over update count ``t`` (timm's ModelEmaV3 warm-up; 2/3 or 3/4 are usual).
        buffers: ``"copy"`` takes BatchNorm statistics from the model (FixMatch, USB),
            ``"average"`` averages floating-point buffers like parameters.
        device: keep the copy on this device (e.g. ``"cpu"`` to save accelerator memory).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        warmup_power: float | None = None,
        buffers: Literal["copy", "average"] = "copy",
        device: torch.device | str | None = None,
    ) -> None:
        check_ema_arguments(decay, buffers)
        self.decay = decay
        self.warmup_power = warmup_power
        self.buffers = buffers
        self.device = torch.device(device) if device is not None else None
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        if self.device is not None:
            self.module.to(self.device)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Make the copy equal to ``model`` again (weights and buffers) and count no updates.

        Under DDP, call it after DDP has broadcast rank 0's weights (``on_fit_start``): a copy made
        in ``__init__`` holds each rank's own initialization, which differs when the ranks were
        seeded differently.
        """
        targets = list(self.module.parameters()) + list(self.module.buffers())
        sources = list(model.parameters()) + list(model.buffers())
        if len(targets) != len(sources):
            raise ValueError("EMAModel.restart got a model with other parameters or buffers than the averaged one")
        for target, source in zip(targets, sources):
            target.copy_(source.detach())
        self.num_updates = 0

    def current_decay(self) -> float:
        if self.warmup_power is None:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.num_updates) ** -self.warmup_power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        weight = 1.0 - self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMAModel.update got a model with another parameter list than the averaged one")
        lerp_grouped(ema_params, params, weight)
        float_pairs, other_pairs = [], []
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            (float_pairs if ema_b.is_floating_point() else other_pairs).append((ema_b, b))
        if self.buffers == "average":
            lerp_grouped([e for e, _ in float_pairs], [b for _, b in float_pairs], weight)
        else:
            other_pairs += float_pairs
        for ema_b, b in other_pairs:
            ema_b.copy_(b)  # blocking across devices: see lerp_grouped
        self.num_updates += 1

    def to(self, device: torch.device | str) -> "EMAModel":
        """Follow the trained model to ``device`` unless a fixed device was asked for."""
        if self.device is None:
            self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


def kept_ema(module: nn.Module) -> EMAModel | None:
    """The EMA a module keeps of its own weights (the base's evaluation EMA, ``ema_decay``), or ``None``.

    One EMA per model (docs/callbacks_ema.md): the ``EMA`` callback refuses a module that keeps one.
    """
    ema = getattr(module, "ema", None)
    return ema if isinstance(ema, EMAModel) else None


#: where Lightning keeps the ``EMA`` callback's state in ``checkpoint["callbacks"]`` (its class name,
#: ``Callback.state_key``); ``{...}`` follows it when the key is made unique by arguments
EMA_CALLBACK_KEY = "EMA"


def ema_callback_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved states of the ``EMA`` callbacks (``callbacks.EMA``) in a checkpoint, each holding the
    ``EMAModel`` state under ``"ema"``. Here, beside the format it reads, because the soup reads it too."""
    return [s for k, s in checkpoint.get("callbacks", {}).items()
            if k.split("{")[0] == EMA_CALLBACK_KEY and isinstance(s, dict) and "ema" in s]


def check_ema_arguments(decay: float, buffers: str) -> None:
    """Refuse a decay outside [0, 1] or an unknown buffer mode, naming the bad value."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    if buffers not in ("copy", "average"):
        raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")


def lerp_grouped(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """``targets += weight * (sources - targets)``, one foreach call per (device, dtype) group.

    A source on another device is copied over with a blocking copy, as timm's ModelEmaV3 does
    (``timm/utils/model_ema.py``, ``model_v.to(device=self.device)``): a non-blocking copy from CUDA
    lands in pinned host memory that the CPU lerp would read before the copy has finished.
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
    for t, s in zip(targets, sources):
        key = (t.device, t.dtype)
        if key not in groups:
            groups[key] = ([], [])
        groups[key][0].append(t)
        groups[key][1].append(s.to(device=t.device, dtype=t.dtype))
    for ts, ss in groups.values():
        torch._foreach_lerp_(ts, ss, weight)


def broadcast_buffers(module: nn.Module, device: torch.device | str, src: int = 0) -> None:
    """Give every process rank ``src``'s floating-point buffers of ``module``, one broadcast per dtype.

    The broadcast runs on ``device``, the one the process group communicates on (the trained
    module's): NCCL takes CUDA tensors only, so a copy kept on the CPU is staged there and back.
    """
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        if b.is_floating_point():
            groups.setdefault(b.dtype, []).append(b)
    for buffers in groups.values():
        flat = torch.cat([b.detach().reshape(-1).to(device) for b in buffers])
        torch.distributed.broadcast(flat, src=src)
        for b, piece in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(piece.view_as(b))

"""``EMA``: an exponential moving average of any LightningModule's weights, as a callback.

The average is an :class:`lightning_modules.core.ema.EMAModel` over the whole LightningModule, updated after
every optimizer step (one ``torch._foreach_lerp_`` per dtype/device group). Validation, test
and predict run with the averaged weights: they are copied into the module at the start of the
loop and the raw weights are copied back, bitwise, at its end. Checkpoints keep the raw weights
in ``"state_dict"`` and the average in the callback's state, so a resumed run continues exactly.
One EMA per model: a module that keeps its own (the base's ``ema_decay``) is refused in ``setup``
(:func:`refuse_a_second_ema`; docs/callbacks_ema.md says why it is refused rather than taken over).

Usage::

    trainer = Trainer(callbacks=[EMA(decay=0.999, warmup_power=3 / 4)])
    python train.py fit ... --trainer.callbacks+=EMA --trainer.callbacks.decay 0.999

    weights = ema_weights_from_checkpoint("last.ckpt")  # the averaged module's state_dict
    model.load_state_dict(weights)

Why the DDP ranks agree: the copy is a plain attribute of the callback, never a submodule of the
LightningModule, so DDP neither wraps nor broadcasts it and it never receives gradients. It is
(re)initialized in ``on_fit_start``, after DDP has broadcast rank 0's weights, and every update
reads the parameters, which DDP keeps identical on all ranks (same start, all-reduced gradients,
same optimizer), through an elementwise deterministic lerp. BatchNorm buffers are the exception:
each rank updates its running statistics from its own batch (DDP only broadcasts them at the next
forward), so before the averaged weights are swapped in the callback broadcasts the copy's
floating-point buffers from rank 0, exactly what DDP itself does to the raw buffers (through the
module's device, so a copy kept on the CPU works under NCCL); checkpoints are written by rank 0
alone, so every rank resumes from rank 0's copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lightning_modules.core.checkpoint_loading import read_checkpoint
from lightning_modules.core.ema import (EMAModel, broadcast_buffers, check_ema_arguments, ema_callback_states,
                                       kept_ema)


__all__ = ["EMA", "ema_weights_from_checkpoint", "ema_callback_states", "refuse_a_second_ema"]


class EMA(L.Callback):
    """Keep an EMA of the LightningModule's weights; validate, test and predict with it.

    Args:
        decay: weight of the old average, ``ema = decay * ema + (1 - decay) * weights``.
        warmup_power: if set, the decay ramps up as ``min(decay, 1 - (1 + t) ** -warmup_power)``
            over update count ``t`` (timm's ModelEmaV3 warm-up).
        buffers: ``"copy"`` takes buffers (BatchNorm statistics) from the model, ``"average"``
            averages floating-point buffers like parameters.
        device: keep the copy on this device (``"cpu"`` saves accelerator memory); ``None``
            follows the module.
        update_every_n_steps: update after optimizer steps whose count is a multiple of this.
        start_step: first update after optimizer step ``start_step + 1``; when it is above 0 the
            first update copies the weights instead of averaging them with the initial ones.
        evaluate_with_ema: swap the averaged weights in for validation, test and predict.
            Nothing is swapped before the first update.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup_power: float | None = None,
        buffers: Literal["copy", "average"] = "copy",
        device: str | None = None,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        evaluate_with_ema: bool = True,
    ) -> None:
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be at least 1, got {update_every_n_steps}")
        if start_step < 0:
            raise ValueError(f"start_step must be at least 0, got {start_step}")
        check_ema_arguments(decay, buffers)
        self.decay = decay
        self.warmup_power = warmup_power
        self.buffers = buffers
        self.device = device
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.evaluate_with_ema = evaluate_with_ema
        self.ema: EMAModel | None = None
        self._last_global_step = 0
        self._loaded = False
        self._pending_state: dict[str, Any] | None = None
        # While the average is swapped in: the raw weights, and their data pointers -> index.
        self._backup: list[torch.Tensor] | None = None
        self._backup_index: dict[int, int] = {}

    # --- creation ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        refuse_a_second_ema(pl_module)
        if self.ema is None:
            self.ema = EMAModel(pl_module, decay=self.decay, warmup_power=self.warmup_power,
                                buffers=self.buffers, device=self.device)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema.to(pl_module.device)
        if self.ema.num_updates == 0 and not self._loaded:
            self.ema.restart(pl_module)  # after DDP's broadcast of rank 0's weights: every rank starts alike

    # --- updates -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self._last_global_step:  # no optimizer step (gradient accumulation)
            return
        self._last_global_step = step
        if step <= self.start_step or step % self.update_every_n_steps:
            return
        if self.ema.num_updates == 0 and self.start_step > 0:
            # Start from the weights at start_step, not from an average with the initial ones.
            self.ema.restart(pl_module)
            self.ema.num_updates = 1
        else:
            self.ema.update(pl_module)

    # --- evaluation with the average ---------------------------------------------------------
    def _swap_in(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema.to(pl_module.device)
        if not self.evaluate_with_ema or self.ema.num_updates == 0 or self._backup is not None:
            return
        self._sync_buffers(pl_module.device)
        raw = _tensors(pl_module)
        with torch.no_grad():
            self._backup = [torch.empty_like(t) for t in raw]
            _copy(self._backup, raw)
            _copy(raw, _tensors(self.ema.module))
        self._backup_index = {t.data_ptr(): i for i, t in enumerate(raw) if t.numel()}

    def _swap_out(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            _copy(_tensors(pl_module), self._backup)
        self._backup, self._backup_index = None, {}

    on_validation_start = on_test_start = on_predict_start = _swap_in
    on_validation_end = on_test_end = on_predict_end = _swap_out

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._swap_out(trainer, pl_module)

    @property
    def swapped(self) -> bool:
        """Whether the averaged weights are in the module now."""
        return self._backup is not None

    def _sync_buffers(self, device: torch.device) -> None:
        """Give every rank rank 0's buffers of the copy (see the module docstring), through ``device``,
        the module's: a copy kept on the CPU (``device="cpu"``) cannot be broadcast by NCCL itself."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            broadcast_buffers(self.ema.module, device)

    # --- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Saved while the average is swapped in (a checkpoint during validation): put the raw
        # weights, kept in the backup, back under "state_dict".
        if self._backup is None:
            return
        state = checkpoint.get("state_dict", {})
        replaced = 0
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() in self._backup_index:
                state[key] = self._backup[self._backup_index[value.data_ptr()]].clone()
                replaced += 1
        if state and not replaced:  # a strategy that copied the state: rebuild it from the raw weights
            self._swap_out(trainer, pl_module)
            checkpoint["state_dict"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                        for k, v in trainer.strategy.lightning_module_state_dict().items()}
            self._swap_in(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"ema": self.ema.state_dict(), "last_global_step": self._last_global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:  # loaded before setup: apply when the copy exists
            self._pending_state = state_dict
            return
        self._pending_state = None
        self.ema.load_state_dict(state_dict["ema"])
        self._last_global_step = int(state_dict["last_global_step"])
        self._loaded = True

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the LightningModule's ``state_dict`` keys."""
        return {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}


def refuse_a_second_ema(pl_module: nn.Module) -> None:
    """Raise if ``pl_module`` keeps an EMA of its own (``ema_decay``): one EMA per model.

    With both, the module validated with its own copy while the callback's average of the same weights
    (a deep copy of the module, its own EMA copy included) was checkpointed but never evaluated. The fix
    depends on the method: one whose teacher is its EMA (Mean Teacher, Unbiased Teacher) must keep it.
    """
    kept = kept_ema(pl_module)
    if kept is None:
        return
    name = type(pl_module).__name__
    if getattr(pl_module, "teacher", None) is kept.module:
        fix = (f"drop --trainer.callbacks EMA ({name}'s teacher is that EMA, so it keeps it; "
               "set its decay with --model.ema_decay)")
    else:
        fix = "drop --trainer.callbacks EMA or pass --model.ema_decay null (in Python: ema_decay=None)"
    raise ValueError(f"{name} already keeps an EMA of its weights (ema_decay={kept.decay}) and evaluates with it; "
                     f"the EMA callback would keep a second one that nothing evaluates: {fix}")


def ema_weights_from_checkpoint(checkpoint: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA callback's averaged weights in a checkpoint, as a LightningModule ``state_dict``.

    ``model.load_state_dict(ema_weights_from_checkpoint("last.ckpt"))`` gives a module that
    evaluates like the EMA; the checkpoint's own ``"state_dict"`` holds the raw weights.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint, "checkpoint")
    found = ema_callback_states(checkpoint)
    if len(found) != 1:
        raise KeyError(f"expected one EMA callback state in the checkpoint, found {len(found)}")
    return dict(found[0]["ema"]["module"])


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``t.copy_(s)`` for each pair: one ``_foreach_copy_`` per (target device, source device)."""
    if len(targets) != len(sources):
        raise ValueError("EMA: the averaged copy and the module have different tensor lists")
    groups: dict[tuple[torch.device, torch.device], tuple[list, list]] = {}
    for t, s in zip(targets, sources):
        ts, ss = groups.setdefault((t.device, s.device), ([], []))
        ts.append(t)
        ss.append(s.detach())
    for (dt, ds), (ts, ss) in groups.items():
        if dt == ds:
            torch._foreach_copy_(ts, ss)
        else:  # blocking: a non-blocking copy to the CPU could be read before it lands (see lerp_grouped)
            for t, s in zip(ts, ss):
                t.copy_(s)

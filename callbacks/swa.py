"""Stochastic Weight Averaging (Izmailov et al. 2018) with a step- or epoch-wise window.

The callback keeps a uniform running mean of the module's parameters over snapshots taken every
``every_n`` optimizer steps (or epochs) after the window opens, optionally switches the
learning rate to :class:`torch.optim.swa_utils.SWALR` when it does, and at the end of fit copies
the mean into the module and recomputes BatchNorm statistics for it with one pass over the
training data (the layers the module's forward runs; see
:mod:`lightning_modules.core.batch_norm_estimation`). The mean is a plain list of tensors held by the
callback (never a submodule of the LightningModule, so DDP never sees it) and travels in the
callback's ``state_dict``.

Why not Lightning's ``StochasticWeightAveraging``: see ``docs/callbacks_swa_soup.md``.

Usage::

    trainer = Trainer(callbacks=[SWA(start=0.75, interval="step", every_n=10, swa_lrs=0.01)])
    python train.py fit ... --trainer.callbacks+=SWA --trainer.callbacks.start=0.75
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LRSchedulerConfig
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import SWALR

from lightning_modules.core.batch_norm_estimation import (default_bn_inputs, forward_inputs, recompute_batch_norm,
                                                          unwrap_batches)
from lightning_modules.core.ema import EMAModel, lerp_grouped


class SWA(L.Callback):
    """Uniform average of the weights over the end of training.

    Args:
        start: when the averaging window opens: after this many optimizer steps (``interval="step"``)
            or epochs (``"epoch"``); a float in [0, 1] is a fraction of the total steps / max epochs.
        interval: ``"step"`` or ``"epoch"``.
        every_n: take a snapshot every ``n`` steps (epochs) inside the window. With ``start=s``, the
            snapshots are taken after steps (epochs) ``s + n, s + 2n, ...``; the last step of training
            is one of them when ``n`` divides ``total - s``.
        swa_lrs: if set, every optimizer switches to ``SWALR`` at the window start, replacing the
            module's schedulers; a float or one float per parameter group.
        anneal_epochs, anneal_strategy: SWALR's annealing from the current to ``swa_lrs``, counted in
            ``interval`` units (0 switches at once).
        update_bn: after copying the mean into the module at the end of fit, recompute BatchNorm
            statistics with one pass over the training data (``bn_batches`` batches, default: one
            epoch) for the layers the module's forward runs in train mode; the others (a frozen
            teacher, MutualLearning's other peers) keep theirs. Without it, the module keeps the
            running statistics of its last training step.
        bn_batches: batches of the BatchNorm pass (``None``: the train loader's length).
        sync_ema: if the module has an ``ema`` :class:`EMAModel` (labelwise methods evaluate with it),
            also load the averaged weights into it so validation/test use the SWA weights.
        save_checkpoint: if set, save a checkpoint with the averaged weights at the end of fit, at this
            path (relative paths go under the trainer's ``log_dir``/``checkpoints``): the usual
            ModelCheckpoint files are written before SWA's weights exist.

    Subclass and override :meth:`bn_inputs` for batches of another shape, :meth:`bn_forward` to run more
    than the module's forward in the BatchNorm pass.
    """

    def __init__(
        self,
        start: int | float = 0.75,
        interval: Literal["step", "epoch"] = "epoch",
        every_n: int = 1,
        swa_lrs: float | list[float] | None = None,
        anneal_epochs: int = 0,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        update_bn: bool = True,
        bn_batches: int | None = None,
        sync_ema: bool = True,
        save_checkpoint: str | None = None,
    ) -> None:
        if interval not in ("step", "epoch"):
            raise ValueError(f"SWA interval must be 'step' or 'epoch', got {interval!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)):
            raise ValueError(f"SWA start must be an int count or a float fraction, got {start!r}")
        if isinstance(start, float) and not 0.0 <= start <= 1.0:
            raise ValueError(f"SWA start as a fraction must lie in [0, 1], got {start}")
        if isinstance(start, int) and start < 0:
            raise ValueError(f"SWA start must be >= 0, got {start}")
        if every_n < 1:
            raise ValueError(f"SWA every_n must be >= 1, got {every_n}")
        lrs = [swa_lrs] if isinstance(swa_lrs, (int, float)) else swa_lrs
        if lrs is not None and (not lrs or any(lr <= 0 for lr in lrs)):
            raise ValueError(f"swa_lrs must be a positive float or a list of them, got {swa_lrs!r}")
        if anneal_epochs < 0 or anneal_strategy not in ("cos", "linear"):
            raise ValueError("anneal_epochs must be >= 0 and anneal_strategy 'cos' or 'linear'")
        self.start, self.interval, self.every_n = start, interval, every_n
        self.swa_lrs, self.anneal_epochs, self.anneal_strategy = swa_lrs, anneal_epochs, anneal_strategy
        self.update_bn, self.bn_batches, self.sync_ema = update_bn, bn_batches, sync_ema
        self.save_checkpoint = save_checkpoint
        # state
        self.n_averaged = 0
        self.last_snapshot = -1           # the step / epoch count of the latest snapshot
        self.average: list[torch.Tensor] | None = None   # plain tensors, never a submodule
        self.names: list[str] | None = None
        self.swalr_active = False
        self._swalr_state: list[dict[str, Any]] | None = None
        self._schedulers: list[SWALR] = []
        self._start_count: int | None = None

    # --- window -------------------------------------------------------------------------------
    def start_count(self, trainer: "L.Trainer") -> int:
        """The window start in steps / epochs, resolving a fractional ``start`` against the run's length."""
        if isinstance(self.start, int):
            return self.start
        if self.interval == "step":
            total = trainer.estimated_stepping_batches
        else:
            total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else math.inf
        if not math.isfinite(total):
            raise ValueError("SWA start as a fraction needs a finite run; give start as a count instead")
        return int(round(self.start * total))

    def _count(self, trainer: "L.Trainer") -> int:
        """Optimizer steps done, or epochs completed (inside on_train_epoch_end)."""
        return trainer.global_step if self.interval == "step" else trainer.current_epoch + 1

    def _should_snapshot(self, count: int) -> bool:
        s = self._start_count
        return count > s and (count - s) % self.every_n == 0 and count > self.last_snapshot

    # --- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._start_count = self.start_count(trainer)
        named = list(pl_module.named_parameters())
        names = [n for n, _ in named]
        if self.names is not None and self.average is not None and names != self.names:
            raise ValueError("SWA state was saved for a module with other parameters")
        self.names = names
        if self.average is not None:
            self.average = [a.to(p.device) for a, (_, p) in zip(self.average, named)]
        if self._swalr_state is not None:
            # Resuming inside the window: the checkpoint's scheduler states are SWALR's, which the
            # module's own schedulers cannot load; SWALR is rebuilt from them in on_train_start.
            trainer.strategy.lr_scheduler_configs.clear()

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # A window that opens at 0, or a run resumed inside the window, switches schedulers now.
        if self.swa_lrs is not None and self._completed(trainer) >= self._start_count:
            self._switch_to_swalr(trainer)

    def _completed(self, trainer: "L.Trainer") -> int:
        return trainer.global_step if self.interval == "step" else trainer.current_epoch

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.interval == "step" and self.swa_lrs is not None and not self._schedulers \
                and trainer.global_step >= self._start_count:
            self._switch_to_swalr(trainer)

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.interval == "epoch" and self.swa_lrs is not None and not self._schedulers \
                and trainer.current_epoch >= self._start_count:
            self._switch_to_swalr(trainer)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.interval == "step" and self._should_snapshot(trainer.global_step):
            self.snapshot(pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.interval == "epoch" and self._should_snapshot(trainer.current_epoch + 1):
            self.snapshot(pl_module, trainer.current_epoch + 1)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.average is None or self.n_averaged == 0:
            rank_zero_warn(f"SWA took no snapshot (window start {self._start_count} {self.interval}s); "
                           "the module keeps its last weights")
            return
        self.transfer(pl_module)
        if self.update_bn:
            self._recompute_bn(trainer, pl_module)
        ema = getattr(pl_module, "ema", None)
        if self.sync_ema and isinstance(ema, EMAModel):
            net = getattr(pl_module, "net", None)
            if isinstance(net, nn.Module):
                ema.module.load_state_dict(net.state_dict())
        if self.save_checkpoint:
            from pathlib import Path

            path = Path(self.save_checkpoint)
            if not path.is_absolute():
                path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / path
            trainer.save_checkpoint(str(path))

    # --- averaging ----------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, pl_module: nn.Module, count: int | None = None) -> None:
        """Add the module's current parameters to the running mean (one foreach lerp per dtype group)."""
        params = [p.detach() for p in pl_module.parameters()]
        if self.average is None:
            self.average = [p.clone() for p in params]
        else:
            if len(params) != len(self.average):
                raise ValueError("SWA got a module with another parameter list than the averaged one")
            # mean_{n+1} = mean_n + (w - mean_n) / (n + 1)
            lerp_grouped(self.average, params, 1.0 / (self.n_averaged + 1))
        self.n_averaged += 1
        if count is not None:
            self.last_snapshot = count

    @torch.no_grad()
    def transfer(self, pl_module: nn.Module) -> None:
        """Copy the averaged parameters into ``pl_module``."""
        params = list(pl_module.parameters())
        torch._foreach_copy_(params, [a.to(p.device, p.dtype) for a, p in zip(self.average, params)])

    def bn_inputs(self, batch: Any) -> list[torch.Tensor]:
        """The tensors of a (transferred, transformed) training batch that the BatchNorm pass forwards."""
        return default_bn_inputs(batch)

    def bn_forward(self, pl_module: "L.LightningModule", inputs: list[torch.Tensor]) -> None:
        """The BatchNorm pass's forward: the module's own (``self.net`` for labelwise methods). Layers it
        does not run keep their statistics; override to run more (e.g. every peer of MutualLearning)."""
        forward_inputs(pl_module, inputs)

    def _recompute_bn(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        dm = trainer.datamodule
        if dm is not None:
            loader, transform = dm.train_dataloader(), (lambda b: dm.on_after_batch_transfer(b, 0))
        else:
            trainer.fit_loop.setup_data()
            loader, transform = trainer.train_dataloader, (lambda b: pl_module.on_after_batch_transfer(b, 0))
        num = self.bn_batches  # None: the whole (finite, one-epoch) train loader
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731
        recompute_batch_norm(pl_module, unwrap_batches(loader), device=pl_module.device, transform=transform,
                             inputs_fn=self.bn_inputs, num_batches=num, reduce=reduce, forward=self.bn_forward)

    # --- SWALR --------------------------------------------------------------------------------
    def _switch_to_swalr(self, trainer: "L.Trainer") -> None:
        if self._schedulers:
            return
        for i, optimizer in enumerate(trainer.optimizers):
            lrs = self.swa_lrs if isinstance(self.swa_lrs, list) else [self.swa_lrs] * len(optimizer.param_groups)
            scheduler = SWALR(optimizer, swa_lr=lrs, anneal_epochs=self.anneal_epochs,
                              anneal_strategy=self.anneal_strategy)
            if self._swalr_state is not None and i < len(self._swalr_state):
                scheduler.load_state_dict(self._swalr_state[i])
            self._schedulers.append(scheduler)
        trainer.strategy.lr_scheduler_configs = [
            LRSchedulerConfig(s, interval=self.interval, frequency=1, name=f"swalr{i}")
            for i, s in enumerate(self._schedulers)
        ]
        self.swalr_active = True

    # --- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_averaged": self.n_averaged,
            "last_snapshot": self.last_snapshot,
            "names": self.names,
            "average": None if self.average is None else [a.detach().clone() for a in self.average],
            "swalr": [s.state_dict() for s in self._schedulers] or self._swalr_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_averaged = int(state["n_averaged"])
        self.last_snapshot = int(state["last_snapshot"])
        self.names = state["names"]
        self.average = state["average"]
        self._swalr_state = state.get("swalr")

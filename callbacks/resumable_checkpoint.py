"""A ``ModelCheckpoint`` whose ``last.ckpt`` is always a point a resumed fit continues exactly from.

``last.ckpt`` is written on the interval given (``every_n_train_steps``, ``train_time_interval``),
at the end of every epoch, at the end of fit, and when SIGINT (Ctrl-C) or SIGTERM (a cluster's
preemption) stops the run. Resume with ``trainer.fit(..., ckpt_path="last")`` or
``python train.py fit --config ... --ckpt_path last``. Where Lightning's own behaviour falls short:

* A step-interval save that falls on an epoch's last batch is written in ``on_train_batch_end``,
  before the epoch's end hooks; Lightning 2.6 resumes it in the next epoch without running them
  (online label smoothing never swaps its soft labels). Here that save, best-k file included, moves
  to the end of the epoch, after the module's ``on_train_epoch_end``, where ``ModelCheckpoint`` writes
  epoch-end files.
* ``save_last`` alone leaves ``last.ckpt`` behind the final step when fit ends between two
  intervals (Lightning writes it at ``on_train_end`` only when nothing was saved at all).
* Lightning raises ``SIGTERMException`` for SIGTERM, after the running step or in the middle of
  validation, which exits with status 0, and a ``KeyboardInterrupt`` for Ctrl-C wherever it lands, so a
  checkpoint written on the exception (``OnExceptionCheckpoint``, ``save_on_exception``) can hold
  half a step. ``trainer.should_stop`` ends the epoch early: validation and the epoch-end hooks would
  run at a mid-epoch position, and the resumed run would skip the rest of the epoch. Here the first
  signal is only recorded; the running step finishes, ``last.ckpt`` is written at the next batch end
  (or the epoch end), and :class:`StoppedBySignal` exits with status 128 + the signal's number
  (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process stopped by a signal. A second
  Ctrl-C stops at once, leaving the previous ``last.ckpt``. Under DDP every rank stops at the same
  step, whichever got the signal: the ranks' signal numbers are all-reduced on the CPU (a gloo group)
  in the background during the next step, so a signal is acted on one step later mid-epoch, with no
  blocking collective or GPU sync in the step; the epoch end waits for the flags of now.
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StoppedBySignal(SystemExit):
    """The fit stopped for a signal after writing ``last.ckpt``; the exit status is 128 + ``signum``."""

    def __init__(self, signum: int, last_checkpoint: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.last_checkpoint = signum, last_checkpoint


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` resumable (see the module docstring).

    Args: those of ``ModelCheckpoint``; here ``save_last`` must be ``True`` (``"link"`` can leave no
    ``last.ckpt`` after a crash), ``save_top_k`` defaults to 0 (only ``last.ckpt``; set ``monitor`` and
    ``save_top_k`` for best-k files as well) and epoch-end files are written at the end of the
    training epoch, after the module's epoch-end hook, never at the end of validation.

    Usage: ``Trainer(callbacks=[ResumableCheckpoint(every_n_train_steps=256)])``; ``train.py`` uses it
    when a config configures no checkpoint callback.
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 save_last: bool = True, save_top_k: int = 0, mode: str = "min",
                 every_n_train_steps: int | None = None, train_time_interval: timedelta | None = None,
                 every_n_epochs: int | None = None, save_on_train_epoch_end: bool = True, **kwargs: Any) -> None:
        if save_last is not True:
            raise ValueError(f"ResumableCheckpoint keeps last.ckpt: save_last must be True, got {save_last!r} "
                             "(use ModelCheckpoint for other settings)")
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, save_last=True, save_top_k=save_top_k,
                         mode=mode, every_n_train_steps=every_n_train_steps, train_time_interval=train_time_interval,
                         every_n_epochs=every_n_epochs, save_on_train_epoch_end=save_on_train_epoch_end, **kwargs)
        self._signal: int | None = None
        self._group: Any = None  # the processes' CPU group for the stop flag
        self._pending: tuple[Any, torch.Tensor] | None = None  # (all-reduce in flight, its flag)
        self._previous_handlers: dict[int, Any] = {}

    # --- when last.ckpt is written ---------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: saved (and stopped) at the end of the epoch instead
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # only after an optimizer step
            self._stop_if_signalled(trainer, wait=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
            self._save_moved_step_save(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last(trainer)
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_last(trainer)
        self._restore_handlers()
        self._stop_if_signalled(trainer)  # a signal in the final validation: no test after fit

    def _save_moved_step_save(self, trainer: Trainer) -> None:
        # The step save of the epoch's last batch, best-k file included (ModelCheckpoint's epoch-end
        # save does no top-k with every_n_train_steps); the epoch's validation has run by now.
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:  # else ModelCheckpoint defers it too
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_last(self, trainer: Trainer) -> None:
        # ModelCheckpoint's own skip rules (fast_dev_run, sanity check, not fitting, saved at this step)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # --- signals ---------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._signal, self._pending = None, None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # gloo: the flag stays on the CPU (NCCL takes only GPU tensors, and reading one waits for the GPU)
            self._group = dist.new_group(backend="gloo")
        # After Lightning registered its SIGTERM handler (it restores the original one at teardown).
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: stop now, without writing last.ckpt
            return
        self._signal = signum
        # os.write, not print: a print interrupted by the signal would re-enter the stream's buffer
        steps = "this step and at most one more" if self._group is not None else "this step"
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing {steps}, then writing last.ckpt "
                    "and stopping (Ctrl-C again stops at once, without it)\n".encode())

    def _stop_if_signalled(self, trainer: Trainer, wait: bool = True) -> None:
        signum = self._agreed_signal(trainer, wait)
        if not signum:
            return
        self._save_last(trainer)
        self._restore_handlers()
        rank_zero_info(f"Stopped by {signal.Signals(signum).name} after step {trainer.global_step} (epoch "
                       f"{trainer.current_epoch}); {self.last_model_path} holds it. Continue exactly from there "
                       "with ckpt_path='last' (train.py: the same command with --ckpt_path last).")
        raise StoppedBySignal(signum, self.last_model_path)

    def _agreed_signal(self, trainer: Trainer, wait: bool) -> int:
        """The signal to stop for, 0 for none; every process gets the same answer, whichever got the signal.
        After a step (``wait=False``) it is the maximum of the processes' flags at the previous step,
        all-reduced in the background since: no blocking collective and no GPU sync in the step, one step
        later. The epoch end and the end of fit (``wait=True``) also take the flags of now, blocking."""
        signum = self._signal or 0
        if trainer.world_size == 1:
            return signum
        if self._group is None:  # processes without torch.distributed: the strategy's (blocking) reduce
            flag = torch.tensor(signum, device=trainer.strategy.root_device)
            return int(trainer.strategy.reduce(flag, reduce_op="max"))
        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            work.wait()  # a CPU all-reduce of the previous step: done by now unless a process lags a step
            if flag.item():
                return int(flag.item())
        flag = torch.tensor(signum)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=not wait)
        if wait:
            return int(flag.item())
        self._pending = (work, flag)
        return 0

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()
        if self._group is not None and self._pending is None:  # else a process failed mid-step: leave it
            dist.destroy_process_group(self._group)
        self._group = self._pending = None
        super().teardown(trainer, pl_module, stage)

"""A training step reads no tensor back to the host (issue 17: no host synchronization in the step).

On a GPU ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(tensor)``, ``int(tensor)`` and ``float(tensor)`` make
the host wait for the device. CPU-only CI cannot count synchronizations (``torch.cuda.set_sync_debug_mode``
needs CUDA), so the guard here makes those methods raise while a real Trainer runs a step: the views
(``on_after_batch_transfer``), ``training_step``, backward, the optimizer step, the EMA update and the
learning-rate schedule. Lightning's own reading of the logged values after the step (``on_train_batch_end``
and later) is outside the guard: the base hands it host copies (``core/progress_values.py``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from lightning import Callback

from datamodules import DigitsSSL
from lightning_modules import FixMatch, Supervised
from tests.ssl_helpers import SMALL_NET, make_trainer

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")


class HostRead(AssertionError):
    """A tensor was read back to the host inside the guarded part of a step."""


@contextlib.contextmanager
def no_host_reads(log: list[str]):
    """Inside: every method in ``READS`` of any tensor raises :class:`HostRead` (and is logged)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def forbidden(name):
        def read(self, *args, **kwargs):
            log.append(name)
            raise HostRead(f"Tensor.{name} called inside the training step")
        return read

    for name in READS:
        setattr(torch.Tensor, name, forbidden(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


class GuardStep(Callback):
    """Guard from the start of each training batch to its end (callbacks' ``on_train_batch_end`` runs first)."""

    def __init__(self, log: list[str]) -> None:
        self.reads, self.guard, self.steps = log, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.guard = no_host_reads(self.reads)
        self.guard.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.guard.__exit__(None, None, None)
        self.guard, self.steps = None, self.steps + 1

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.guard is not None:
            self.guard.__exit__(None, None, None)


class GuardedDigits(DigitsSSL):
    """Real digits whose views are made under the guard too."""

    reads: list[str]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        with no_host_reads(self.reads):
            return super().on_after_batch_transfer(batch, dataloader_idx)


@pytest.mark.parametrize("method, precision, options", [
    (FixMatch, "32-true", {}),
    (FixMatch, "bf16-mixed", {"channels_last": True, "no_grad_target_views": True}),
    (Supervised, "32-true", {}),
])
def test_a_training_step_reads_no_tensor_back_to_the_host(method, precision, options, one_thread):
    log: list[str] = []
    model = method(**SMALL_NET, ema_decay=0.99, **options)
    data = GuardedDigits(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    data.reads = log
    guard = GuardStep(log)
    make_trainer(max_steps=3, precision=precision, callbacks=[guard]).fit(model, data)
    assert guard.steps == 3 and not log
    assert model.ema.num_updates == 3  # the guarded part includes the EMA update


def test_the_guard_catches_a_read(one_thread):
    """The guard is not vacuous: a step that reads its loss (``loss.item()``, as USB does) fails under it."""

    class ReadsItsLoss(FixMatch):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.print(loss.item())
            return loss

    log: list[str] = []
    data = GuardedDigits(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=1)
    data.reads = log
    with pytest.raises(HostRead, match="Tensor.item"):
        make_trainer(max_steps=1, callbacks=[GuardStep(log)]).fit(ReadsItsLoss(**SMALL_NET), data)
    assert log == ["item"]

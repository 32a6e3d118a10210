"""Checks the base runs during ``fit``: the model fits its data, and every step's loss is finite.

:func:`check_model_fits_data` compares the DataModule's ``num_classes`` and ``num_channels`` with
the model's when ``fit`` starts: ``train.py`` links them, but a model built in Python with another
class count would otherwise fail inside the loss ("Target 6 is out of bounds", or a device-side
assert on a GPU).

:class:`FiniteLossCheck` is called by the base's ``training_step`` with the step's total loss and
its logged terms (``labeled_loss``, ``unlabeled_loss``, ``kd_loss``, a detector's ``loss_classifier``
...) and stops training at the first NaN or infinite total, naming the non-finite terms and the
step. On the CPU it tests the total at once with ``torch._assert_async`` (no Python read of a tensor in
the step, so a test can forbid those: tests/lightning_modules/core/test_fast_path_sync.py). On a CUDA device ``if not torch.isfinite(loss)`` would
make the host wait for the GPU every step; instead the finiteness flag is copied to pinned host
memory without blocking, a CUDA event marks it, and later steps read the flags whose events have
completed. The error therefore comes a step or two after the bad one (as far as the GPU is
behind), still naming the step where the loss first went non-finite; ``flush`` waits for every
outstanding flag and runs before a checkpoint is written and when training ends, so no checkpoint
is saved from an unchecked step. Only when a flag is bad are the individual terms read. Other
accelerators (MPS, XLA) take the CPU path, one host sync per step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Mapping

import torch

#: flags older than this many steps are waited for, so the queue stays short if the GPU lags far behind
MAX_PENDING = 8


def check_model_fits_data(hparams: Mapping, datamodule: object | None) -> None:
    """Raise ``ValueError`` when the DataModule's class or channel count differs from the model's."""
    if datamodule is None:
        return
    for data_name, model_name in (("num_classes", "num_classes"), ("num_channels", "in_channels")):
        data_value, model_value = getattr(datamodule, data_name, None), hparams.get(model_name)
        if data_value is not None and model_value is not None and data_value != model_value:
            raise ValueError(f"the model has {model_name}={model_value} but {type(datamodule).__name__} has "
                             f"{data_name}={data_value}: build the model with {model_name}={data_value} "
                             f"(train.py links them from the data)")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class _Pending:
    step: int
    epoch: int
    flag: torch.Tensor  # bool scalar in pinned host memory, filled when ``event`` completes
    event: torch.cuda.Event
    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def non_finite_terms(terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The terms that hold a NaN or an infinity, with their value (the first non-finite element)."""
    bad = {}
    for name, value in terms.items():
        value = torch.as_tensor(value).detach().float()
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad[name] = float(value[~finite].flatten()[0])
    return bad


def non_finite_loss_error(total: torch.Tensor, terms: Mapping[str, torch.Tensor], step: int,
                          epoch: int) -> NonFiniteLossError:
    """The error for a non-finite ``total``: which terms were not finite, at which step, and what to try."""
    bad = non_finite_terms(terms)
    where = f"at step {step} (epoch {epoch})"
    if bad:
        named = ", ".join(f"{name}={value}" for name, value in bad.items())
        cause = f"the non-finite term(s): {named}"
    else:
        cause = f"every term is finite ({', '.join(terms)}), so a loss weight or the sum overflowed"
    return NonFiniteLossError(
        f"training loss is {float(torch.as_tensor(total).detach().float())} {where}; {cause}. Training stopped: "
        "look for NaN/inf in that step's inputs or targets, lower the learning rate, or clip gradients "
        "(--trainer.gradient_clip_val); resume from a checkpoint saved before that step")


class FiniteLossCheck:
    """Raises :class:`NonFiniteLossError` for the first step whose total loss is not finite."""

    def __init__(self) -> None:
        self._pending: deque[_Pending] = deque()

    def __getstate__(self) -> dict:
        return {"_pending": deque()}  # CUDA events do not copy; a copy (an EMA of the module) checks nothing

    def __call__(self, total: torch.Tensor, terms: Mapping[str, torch.Tensor], step: int, epoch: int) -> None:
        total = total.detach()
        terms = {name: value.detach() for name, value in terms.items() if isinstance(value, torch.Tensor)}
        if total.device.type == "cpu":
            try:
                torch._assert_async(torch.isfinite(total).all(), "non-finite loss")
            except RuntimeError:
                raise non_finite_loss_error(total, terms, step, epoch) from None
            return
        if not total.is_cuda:  # MPS, XLA: one host read per step
            if not bool(torch.isfinite(total).all()):
                raise non_finite_loss_error(total, terms, step, epoch)
            return
        flag = torch.isfinite(total).all().to("cpu", non_blocking=True)  # pinned destination: no host wait
        event = torch.cuda.Event()
        event.record()
        self._pending.append(_Pending(step, epoch, flag, event, total, terms))
        self.poll(wait_older_than=MAX_PENDING)

    def poll(self, wait_older_than: int | None = None) -> None:
        """Check the flags whose copies have completed (and wait for all but the newest ``wait_older_than``)."""
        while self._pending:
            oldest = self._pending[0]
            if wait_older_than is not None and len(self._pending) > wait_older_than:
                oldest.event.synchronize()
            elif not oldest.event.query():
                return
            self._pending.popleft()
            if not bool(oldest.flag):
                self._pending.clear()
                raise non_finite_loss_error(oldest.total, oldest.terms, oldest.step, oldest.epoch)

    def flush(self) -> None:
        """Wait for and check every outstanding flag."""
        self.poll(wait_older_than=0)

"""Training values for the progress bar, read on the host without making it wait for the GPU.

Lightning turns every progress-bar value into a Python number (``.item()``) at each batch end, so a
CUDA loss logged with ``prog_bar=True`` would make the host wait for the GPU every step (the
per-step synchronization USB is known for). :class:`HostValues` copies the step's values to pinned
host memory without blocking, marks the copy with a CUDA event, and returns the newest copy that
has completed, as CPU tensors, which Lightning reads for free: the bar lags the GPU by the step or
two the host runs ahead, and nothing waits. Values on the CPU are returned at once; on other
accelerators (MPS, XLA) they are read at once too, one sync per step, as the loss check does there.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping

import torch

#: copies older than this many steps are waited for, so the queue stays short if the GPU lags far behind
MAX_PENDING = 8


class HostValues:
    """``values(step_tensors) -> {name: CPU scalar}``: the newest completed copy of the values handed in."""

    def __init__(self) -> None:
        self._pending: deque[tuple[tuple[str, ...], torch.Tensor, torch.cuda.Event]] = deque()
        self._ready: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {"_pending": deque(), "_ready": {}}  # CUDA events do not copy (the EMA callback deep-copies modules)

    def __call__(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not values:
            return {}
        names = tuple(values)
        stacked = torch.stack([value.detach().float().reshape(()) for value in values.values()])
        if stacked.device.type == "cpu":
            return dict(zip(names, stacked.unbind()))
        if not stacked.is_cuda:  # MPS, XLA: read at once
            return dict(zip(names, stacked.cpu().unbind()))
        host = stacked.to("cpu", non_blocking=True)  # pinned destination: the host does not wait
        event = torch.cuda.Event()
        event.record()
        self._pending.append((names, host, event))
        while self._pending:
            if len(self._pending) > MAX_PENDING:
                self._pending[0][2].synchronize()
            elif not self._pending[0][2].query():
                break
            names, host, _ = self._pending.popleft()
            self._ready = dict(zip(names, host.unbind()))
        return self._ready

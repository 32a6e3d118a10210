"""Forwards in training mode that leave a network's buffers (BatchNorm's running statistics) as they were.

Shared by the methods that need batch statistics from a forward whose statistics must not count:
VAT's unlabeled passes, MixMatch's and ReMixMatch's label guesses, Mean Teacher's teacher.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Run forwards in training mode without leaving a trace in ``module``'s buffers.

    BatchNorm still normalizes with the statistics of the batch it sees, but inside the block every
    buffer (running mean and variance, ``num_batches_tracked``) is a scratch copy, and the original
    tensors come back on exit, never written to. Unlike setting the momentum to 0 or copying saved
    values back in place, this bumps no tensor's version, so a graph built before the block (the
    clean forward, whose BatchNorm backward keeps the running buffers) still backpropagates; and it
    works for every BatchNorm flavour (cumulative ``momentum=None`` included) and any other buffer.
    """
    originals = []
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                originals.append((submodule, name, buffer))
                submodule._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for submodule, name, buffer in originals:
            submodule._buffers[name] = buffer

"""Checkpoint files that a crash can never leave half-written.

Lightning 2.6's ``TorchCheckpointIO`` serializes the whole checkpoint into memory, then writes it
through an fsspec transaction: into a temporary file made by ``tempfile.mkstemp()`` in the system's
temporary folder, moved over the destination with ``shutil.move`` on commit, and never fsynced.
When the temporary folder is on another file system than the checkpoints (``/tmp`` on tmpfs, a
network or scratch volume), ``shutil.move`` copies into the destination itself, so a crash during
the copy leaves a truncated ``last.ckpt``; without an fsync, a power cut after the rename can leave
an empty one; and a process killed mid-write leaves a checkpoint-sized file in ``/tmp``.

:class:`AtomicCheckpointIO` writes each checkpoint through :func:`lightning_modules.core.atomic.atomic_path`,
the writer every other file of the library goes through: a temporary file next to the destination,
fsynced, renamed over the destination with ``os.replace`` (atomic within one file system). After a
crash at any point the destination holds the old checkpoint or the new one, whole. The temporary
file is removed when the write fails; a process killed mid-write leaves ``.<name>.<random>.tmp``
beside it, which no checkpoint lookup (``ckpt_path="last"``, top-k) matches. ``train.py`` uses it by
default (:func:`use_atomic_checkpoints`). It also reads checkpoints (``--ckpt_path``) under the library's
one ``weights_only`` policy (:meth:`AtomicCheckpointIO.load_checkpoint`).
"""

from __future__ import annotations

from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning import Trainer
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules.core.atomic import atomic_path
from lightning_modules.core.checkpoint_loading import WEIGHTS_ONLY, read_checkpoint, refuse_trusting_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring); remote paths
    (``s3://`` and other fsspec file systems) go through Lightning's own writer.

    Usage: ``Trainer(plugins=[AtomicCheckpointIO()])``, or ``--trainer.plugins AtomicCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # raises for storage_options, as Lightning does
            return
        with atomic_path(path) as partial:
            torch.save(checkpoint, partial)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint under labelwise's one policy (``weights_only=True``,
        :mod:`lightning_modules.core.checkpoint_loading`), with its errors; ``weights_only=False`` is refused.
        Lightning would pass ``None`` on to ``torch.load`` (whose default an environment variable can flip)
        and ``False`` for a remote ``http`` file."""
        refuse_trusting_load(weights_only, "weights_only=False")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only=WEIGHTS_ONLY)
        return read_checkpoint(path, "checkpoint", map_location=map_location)


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Put an :class:`AtomicCheckpointIO` in place of Lightning's default ``TorchCheckpointIO``; a
    checkpoint IO chosen by the user or the strategy (async, XLA, sharded) is kept."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()

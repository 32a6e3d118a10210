"""Every checkpoint and weight file labelwise reads is decoded here, under one policy: a file is data.

The policy (docs/robustness.md, "Reading checkpoints"): every file is read with
``torch.load(weights_only=True)`` (:data:`WEIGHTS_ONLY`), our own checkpoints included.

* **Our own checkpoints** (a Lightning checkpoint written by ``train.py`` or a ``Trainer`` with our modules
  and callbacks, a soup) hold only tensors and plain values, so the restriction costs them nothing
  (``tests/lightning_modules/core/test_checkpoint_loading.py`` reads each kind we write this way). What
  makes a file ours is checked after decoding: a ``state_dict``, the class path, the hyper-parameters.
* **Foreign files** (a teacher's or a detector's ``state_dict`` saved by someone else) are what
  ``weights_only=True`` exists for: unpickling anything else may run code the file names.

Whether a file is trusted cannot be told from its path (a ``.ckpt`` downloaded and given to ``Ensemble``
is a foreign file), so there is no second, trusting policy. A file that pickles other objects is refused
with an error saying what to pass instead. Lightning's own reads go through here as well:
``--ckpt_path`` through :class:`callbacks.AtomicCheckpointIO` (which ``train.py`` installs) and modules
rebuilt from a checkpoint through :func:`load_module`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

#: ``torch.load``'s ``weights_only`` for every file labelwise reads (see the module docstring).
WEIGHTS_ONLY = True

#: what a file was expected to be -> (its noun in errors, what to pass instead)
_KINDS = {
    "weights": ("weights", "a checkpoint written by train.py or torch.save(net.state_dict(), path)"),
    "checkpoint": ("a checkpoint", "a .ckpt written by train.py or Trainer.save_checkpoint"),
}
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError)


def _decode(path: Path, map_location: Any, mmap: bool) -> Any:
    """The one ``torch.load`` of the library."""
    if mmap:  # only the structure is read, not the tensors; a legacy (non-zip) file cannot be mapped
        try:
            return torch.load(path, map_location=map_location, weights_only=WEIGHTS_ONLY, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
    return torch.load(path, map_location=map_location, weights_only=WEIGHTS_ONLY)


def _reason(error: BaseException) -> str:
    """The first sentence of torch's error, without its advice to load with ``weights_only=False``."""
    text = str(error)
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip() if "WeightsUnpickler" in text else text.strip()
    return reason.splitlines()[0].split(". ")[0][:160] if reason else type(error).__name__


def read_file(path: str | Path, what: str, kind: str = "checkpoint", map_location: Any = "cpu",
              mmap: bool = False) -> Any:
    """Decode ``path`` under the policy, with errors that name ``what`` (e.g. "teacher file") and say what to
    pass instead: a missing file, a truncated or foreign one, or one that pickles objects other than
    tensors and plain values. ``kind``: ``"weights"`` or ``"checkpoint"``, what the caller expects."""
    noun, remedy = _KINDS[kind]
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: pass {remedy}")
    try:
        return _decode(Path(path), map_location, mmap)
    except _UNREADABLE as error:
        raise ValueError(f"{what} {path} cannot be read as {noun} ({_reason(error)}): it is cut short, not a "
                         f"torch.save file, or holds objects other than tensors and plain values; pass {remedy}"
                         ) from error


def read_weights_file(path: str | Path, what: str) -> Any:
    """A weight file of ours or of others (a checkpoint or a bare ``state_dict``), on the CPU: the teacher
    of distillation, a detector's ``weights_path``."""
    return read_file(path, what, kind="weights")


def read_checkpoint(path: str | Path, what: str, map_location: Any = "cpu", mmap: bool = False,
                    lightning: bool = True) -> dict[str, Any]:
    """A checkpoint: a dict, with a ``"state_dict"`` unless ``lightning`` is false (a soup ingredient may be
    a bare state dict). ``mmap`` maps the tensors without reading them (enough to check the structure)."""
    checkpoint = read_file(path, what, "checkpoint", map_location, mmap)
    if not isinstance(checkpoint, dict) or (lightning and "state_dict" not in checkpoint):
        held = f"keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        missing = ", no 'state_dict'" if lightning else ""
        raise ValueError(f"{what} {path} is a torch file but not a {'Lightning ' if lightning else ''}checkpoint (it "
                         f"holds {held}{missing}): pass {_KINDS['checkpoint'][1]}")
    return checkpoint


def load_module(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` on the CPU under the policy (``cls`` a LightningModule class; the
    base class rebuilds the subclass a LightningCLI checkpoint names). ``kwargs`` override hyper-parameters."""
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=WEIGHTS_ONLY, **kwargs)


def refuse_trusting_load(weights_only: bool | None, what: str = "--weights_only false") -> None:
    """Refuse a request to unpickle code (Lightning's ``weights_only=False``): one policy for every file."""
    if weights_only is False:
        raise ValueError(f"{what}: labelwise reads every checkpoint as data (weights_only=True; docs/robustness.md, "
                         "'Reading checkpoints'), and its own checkpoints need nothing else: drop it. A file you trust "
                         "that pickles other objects: load it yourself and torch.save its tensors and plain values")

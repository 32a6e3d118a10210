"""Reading weight files written by us or by others: ``torch.load(weights_only=True)``, so a file is data,
never code to run, with errors that say what was wrong and what to pass instead. The teacher of
distillation and a detector's ``weights_path`` are read here."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def read_weights_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name ``what`` (e.g. "teacher
    file") and say what to pass instead: a missing file, a truncated or foreign one, or one that pickles
    objects other than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: pass a checkpoint written by train.py or a "
                                "state_dict saved with torch.save(net.state_dict(), path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # weights are data, never code to run
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        text = str(err)
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip() if "WeightsUnpickler" in text else text
        reason = reason.splitlines()[0].split(". ")[0][:160]
        raise ValueError(f"{what} {path} cannot be read as weights ({reason}): it is cut short, not a torch.save "
                         "file, or pickles objects other than tensors; pass a checkpoint written by train.py or "
                         "torch.save(net.state_dict(), path)") from err

"""Files written whole or not at all: a temporary file beside the target, flushed to disk, then renamed
onto it. Every writer of the collection goes through these (split files, predictions, checkpoints,
W&B copies, benchmark tables: docs/robustness.md), so they sit in the task-neutral core that
datamodules/ and callbacks/ may both import."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is flushed to disk and renamed onto
    ``path`` (atomic on one filesystem), on failure removed: ``path`` is never half-written.

    ``with atomic_path("model.ckpt") as tmp: torch.save(state, tmp)``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a new file's usual mode, not mkstemp's owner-only 0600
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` through a temporary file and a rename: never half-written."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomically(path: str | os.PathLike, record: dict, indent: int | None = None) -> Path:
    """Write ``record`` as JSON through a temporary file and a rename: never half-written."""
    return write_text_atomically(path, json.dumps(record, indent=indent))

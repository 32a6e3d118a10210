"""Reading an offline W&B run back: its folder and the records ``wandb sync`` would upload.

An offline run is a folder ``offline-run-<time>-<id>`` with ``files/`` (media, saved files) and
``run-<id>.wandb``: W&B's protobuf ``Record`` messages in LevelDB's log format (a 7-byte W&B
header, then 32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type full/first/middle/last).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_run_dir(root: Path) -> Path:
    """The one offline run folder under ``root``."""
    runs = sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())
    assert len(runs) == 1, f"expected one offline W&B run under {root}, found {runs}"
    return runs[0]


def run_records(run_dir: Path, timeout: float = 20.0) -> list[Any]:
    """Every ``Record`` of the run's ``.wandb`` file, in order, once it holds the run's ``exit`` record.

    Call ``wandb.finish()`` first; W&B's service may still be writing the file when it returns.
    """
    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = _read_records(path)
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record {timeout} s on: was the run finished?"
        time.sleep(0.1)


def _read_records(path: Path) -> list[Any]:
    data = path.read_bytes()
    if len(data) < CHUNK_HEADER:
        return []
    assert data[:4] == b":W&B" and data[6] == 0, f"{path} is not a version-0 W&B log: the format changed"
    records, pending, position = [], b"", CHUNK_HEADER
    while position + CHUNK_HEADER <= len(data):
        left = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        if left < CHUNK_HEADER or (kind == 0 and length == 0):  # block padding
            position += left
            continue
        if position + CHUNK_HEADER + length > len(data):  # a chunk still being written
            break
        chunk = data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(records: list[Any]) -> dict[str, list[Any]]:
    """Logged values by top-level key, one entry per logged row (nested keys give dicts)."""
    logged: dict[str, list[Any]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            target = row
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = json.loads(item.value_json)
        for key, value in row.items():
            logged.setdefault(key, []).append(value)
    return logged


def config(records: list[Any]) -> dict[str, Any]:
    """The run's config as its updates leave it."""
    values: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                values[item.key or item.nested_key[0]] = json.loads(item.value_json)
    return values


def saved_files(records: list[Any]) -> set[str]:
    """Paths (relative to the run's ``files/``) registered for upload."""
    return {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}

"""What every results table of the benchmarks starts with, and how it is written."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch


def report_header(title: str, accelerator: str, seed: int) -> list[str]:
    """Title, the exact command, the device (with its thread count), torch version, date and seed."""
    if accelerator == "gpu":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
    script = Path(sys.argv[0]).as_posix()
    script = script[script.index("benchmarks/"):] if "benchmarks/" in script else script
    return [
        f"# {title}", "",
        f"Command: `{' '.join(['python', script, *sys.argv[1:]])}`", "",
        f"Device: {device}; torch {torch.__version__}; date {datetime.date.today()}; seed {seed}.",
    ]


def write_report(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``path`` atomically (a crash never leaves half a table) and print them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, path)
    print("\n".join(lines))

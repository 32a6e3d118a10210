"""What the benchmark scripts share: a quiet timed fit, the table header, and the atomic write."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lightning_modules.core.atomic import write_text_atomically


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
        f"Command: `{shlex.join(['python', script, *sys.argv[1:]])}`", "",  # quoted as typed
        f"Device: {device}; torch {torch.__version__}; date {datetime.date.today()}; seed {seed}.",
    ]


def write_report(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``path`` atomically (a crash never leaves half a table) and print them."""
    write_text_atomically(path, "\n".join(lines) + "\n")
    print("\n".join(lines))


def timed_fit(model: L.LightningModule, datamodule: L.LightningDataModule, steps: int, accelerator: str,
              root: str | Path, mixed_precision: bool = True) -> tuple[L.Trainer, float]:
    """Fit ``model`` for ``steps`` steps with no logger, checkpoints or validation; return the trainer
    (for ``test``) and the fit's wall-clock seconds. ``root`` receives the run's ``split.json``
    instead of the working directory; ``mixed_precision`` trains in bf16 on a GPU."""
    precision = "bf16-mixed" if accelerator == "gpu" and mixed_precision else "32-true"
    trainer = L.Trainer(default_root_dir=root, max_steps=steps, accelerator=accelerator, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    return trainer, time.perf_counter() - start


def accuracy_rows(rows: list[tuple[str, float, float]], baseline: str) -> list[str]:
    """Table rows ``| name | accuracy % | difference to the baseline row | train time |``."""
    reference = dict((name, acc) for name, acc, _ in rows).get(baseline)
    lines = []
    for name, acc, seconds in rows:
        delta = "" if reference is None else f"{100 * (acc - reference):+.2f}"
        lines.append(f"| {name} | {100 * acc:.2f} | {delta} | {seconds:.0f} s |")
    return lines

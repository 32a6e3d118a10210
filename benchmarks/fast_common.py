"""What speed_fixmatch.py and time_to_accuracy.py share: CIFAR-10 from the JPEG tarballs, the Trainer, a step clock.

The GPU machine has no jsonargparse CLI run here and no network (../shared/guide/GPU.md): the benchmarks build
the DataModule and the method in Python, as train.py would from a recipe, and read the tarballs that travel
in ``.data/cifar10/`` (or ``../shared/data/cifar10`` on this machine).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
from lightning import Callback  # noqa: E402

from datamodules import ImageFolderSSL  # noqa: E402


def tarball_folder() -> Path:
    """Where the CIFAR-10 tarballs are: the carried ``.data/cifar10`` first, then the shared data."""
    for folder in (REPO / ".data" / "cifar10", REPO.parent / "shared" / "data" / "cifar10"):
        if (folder / "train.tar.gz").is_file() and (folder / "test.tar.gz").is_file():
            return folder
    raise FileNotFoundError("no CIFAR-10 tarballs in .data/cifar10 or ../shared/data/cifar10: copy "
                            "../shared/data/cifar10/*.tar.gz into .data/cifar10 (python benchmarks/pack_carry.py)")


def unpack_cifar(dest: Path, train_per_class: int | None = None, test_per_class: int | None = None) -> Path:
    """An ImageFolder tree ``dest/{train,test}/<class>/*.jpg``: all images (``tar``), or the first ``n`` per class."""
    tars = tarball_folder()
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        if (dest / split).is_dir():
            continue
        (dest / f".{split}").mkdir(parents=True, exist_ok=True)
        if n is None:
            subprocess.run(["tar", "xzf", str(tars / f"{split}.tar.gz"), "-C", str(dest / f".{split}")], check=True)
        else:
            counts: dict[str, int] = {}
            with tarfile.open(tars / f"{split}.tar.gz") as tar:
                for member in tar:
                    label = Path(member.name).parent.name
                    if member.isfile() and member.name.endswith(".jpg") and counts.get(label, 0) < n:
                        counts[label] = counts.get(label, 0) + 1
                        tar.extract(member, dest / f".{split}", filter="data")
        (dest / f".{split}" / split).rename(dest / split)  # whole or not at all
    return dest


def cifar_data(root: Path, num_labeled: int, batch_size: int, uratio: int, steps_per_epoch: int,
               threads: int = 16) -> ImageFolderSSL:
    return ImageFolderSSL(root=str(root), num_labeled=num_labeled, batch_size=batch_size, uratio=uratio,
                          steps_per_epoch=steps_per_epoch, decode_threads=threads, eval_batch_size=1000)


def trainer(max_steps: int, precision: str, callbacks: list, max_time: float | None = None) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, precision=precision, callbacks=callbacks, accelerator="auto", devices=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1,
                     default_root_dir=Path(tempfile.gettempdir()) / "labelwise-benchmark-run",  # split.json, not in the checkout
                     max_time=None if max_time is None else {"seconds": max_time})


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(Callback):
    """Milliseconds per step: after ``warmup`` steps, the time of each window of ``window`` steps (the device
    synchronized at window edges only, so the host still runs ahead inside a window) divided by ``window``."""

    def __init__(self, warmup: int, window: int) -> None:
        self.warmup, self.window, self.edges, self.seen = warmup, window, [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen >= self.warmup and (self.seen - self.warmup) % self.window == 0:
            synchronize()
            self.edges.append(time.perf_counter())
        self.seen += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self.seen > self.warmup and (self.seen - self.warmup) % self.window == 0:
            synchronize()
            self.edges.append(time.perf_counter())

    def ms_per_step(self) -> float:
        spans = [(b - a) * 1e3 / self.window for a, b in zip(self.edges, self.edges[1:])]
        if not spans:
            raise RuntimeError(f"no timed window: {self.seen} steps ran, warm-up {self.warmup}, window {self.window}")
        return statistics.median(spans)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"

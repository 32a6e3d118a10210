"""Stopping a real ``train.py`` process with a signal at a known step, for the resume tests.

:class:`WaitForSignal` (added with ``--trainer.callbacks+=tests.signal_helpers.WaitForSignal``)
makes the process touch ``<folder>/waiting`` at the start of step ``step + 1`` and wait there until
the test has sent its signal and touched ``<folder>/sent``; :func:`stop_at_step` is the test's side.
The signal is a real one, handled by the process's own handlers; only its timing is fixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]


class WaitForSignal(Callback):
    def __init__(self, step: int, folder: str, timeout: float = 300.0) -> None:
        self.step, self.folder, self.timeout = step, Path(folder), timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or (self.folder / "sent").exists():
            return
        (self.folder / "waiting").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.folder / "sent").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the signal's handler runs here, between two sleeps
        time.sleep(0.1)


def train_py(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``python train.py ARGS`` in ``cwd`` with one torch thread; its output goes to the returned log."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PL_GLOBAL_SEED", None)
    log = cwd / f"train_py_{len(list(cwd.glob('train_py_*.log')))}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    return process, log


def run_train_py(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run ``python train.py ARGS`` in ``cwd``: (exit status, output)."""
    process, log = train_py(args, cwd)
    return process.wait(timeout=timeout), log.read_text()


def stop_at_step(args: list[str], cwd: Path, step: int, signum: int, times: int = 1,
                 timeout: float = 600) -> tuple[int, str]:
    """Run ``train.py ARGS`` and send it ``signum`` (``times`` times) at the start of step ``step + 1``:
    (exit status, output)."""
    folder = cwd / "signal"
    folder.mkdir(exist_ok=True)
    process, log = train_py([*args, "--trainer.callbacks+=tests.signal_helpers.WaitForSignal",
                             f"--trainer.callbacks.step={step}", f"--trainer.callbacks.folder={folder}"], cwd)
    deadline = time.monotonic() + timeout
    while not (folder / "waiting").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"train.py ended before step {step + 1}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    for _ in range(times):
        process.send_signal(signum)
        time.sleep(0.5)  # one signal at a time: signals of one kind that arrive together count once
    (folder / "sent").touch()
    return process.wait(timeout=timeout), log.read_text()

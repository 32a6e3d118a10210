"""AtomicCheckpointIO: a crash while a checkpoint is written leaves the previous one whole."""

from __future__ import annotations

import os
import signal
import tempfile
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import AtomicCheckpointIO
from datamodules import DigitsSSL
from lightning_modules import Supervised
from tests.ssl_helpers import SMALL_NET


class Unpicklable:
    """Fails when the checkpoint is serialized, after the tensors before it were pickled."""

    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


class Blocking:
    """Hangs while the checkpoint is serialized, so the writer can be killed mid-write."""

    def __reduce__(self):
        time.sleep(60)
        return (int, (0,))


def save(checkpoint: dict, path) -> None:
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


def _leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name != "last.ckpt")


@pytest.mark.parametrize("failure", ["pickling", "fsync", "rename"])
def test_a_failed_write_keeps_the_old_checkpoint_and_removes_the_partial_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.ckpt"
    save({"step": 1, "weights": torch.arange(10.0)}, path)
    new = {"step": 2, "weights": torch.arange(100_000.0)}
    if failure == "pickling":
        new["tail"] = Unpicklable()
    else:
        def fail(*args):
            raise KeyboardInterrupt(f"killed in {failure}")
        monkeypatch.setattr(os, "fsync" if failure == "fsync" else "replace", fail)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        AtomicCheckpointIO().save_checkpoint(new, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["weights"], torch.arange(10.0))
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")
def test_a_writer_killed_mid_write_leaves_the_old_checkpoint_and_a_partial_file_lookups_ignore(tmp_path):
    path = tmp_path / "last.ckpt"
    save({"step": 1}, path)
    pid = os.fork()
    if pid == 0:  # the child writes a checkpoint whose serialization hangs, and is killed
        try:
            save({"step": 2, "tail": Blocking()}, path)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while not _leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert torch.load(path, weights_only=True) == {"step": 1}
    (partial,) = _leftovers(tmp_path)
    assert partial.startswith(".last.ckpt.") and partial.endswith(".tmp")
    assert ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(trainer=None) == {str(path)}


def test_writes_never_pass_through_the_system_temporary_folder(tmp_path, monkeypatch):
    # Lightning's writer stages the file in tempfile.gettempdir() and moves it: a copy, not a rename,
    # when that folder is on another file system. Ours needs no temporary folder at all.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "ckpts" / "last.ckpt")
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True) == {"step": 3}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "ckpts" / "last.ckpt").st_mode & 0o777 == 0o666 & ~umask  # as Lightning's: not 0600


class FailsOnThirdSave(Supervised):
    """Step 1 writes a top-k checkpoint and last.ckpt; step 2's top-k checkpoint cannot be serialized."""

    saves = 0

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        self.saves += 1
        if self.saves == 3:
            checkpoint["tail"] = Unpicklable()


def test_a_fit_that_crashes_while_saving_leaves_the_last_checkpoint_whole(tmp_path):
    L.seed_everything(0, verbose=False)
    model = FailsOnThirdSave(**SMALL_NET, ema_decay=None)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)])
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.fit(model, DigitsSSL(num_labeled=50, batch_size=8, steps_per_epoch=3))
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_train_py_writes_checkpoints_atomically_by_default():
    from train import cli_main

    cli = cli_main(["--model", "Supervised", "--data", "DigitsSSL", "--model.network", "wrn10_1"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO

"""A DDP run through ``train.py`` leaves no process group behind when it ends.

Lightning does not destroy the process group after fit/test. With gloo, the interpreter's exit then
tears its worker threads down while still joinable, and a process that finished its run aborts
("terminate called without an active exception", exit status -6): CI saw it once in four runs of
``test_signal_resume.py``'s two-process fit. ``train.main`` destroys the groups after a run that every
process finished (or that they all stopped for a signal at the same step)."""

from __future__ import annotations

import os

import torch.distributed as dist

import train
from tests.signal_helpers import REPO

TINY = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.steps_per_epoch", "2",
        "--data.batch_size", "8", "--data.uratio", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.accelerator", "cpu"]


def test_a_ddp_fit_through_main_leaves_no_process_group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environment = dict(os.environ)
    try:
        train.main(TINY)
        assert not dist.is_initialized(), "the run's process group is still up after main() returned"
    finally:
        if dist.is_initialized():  # the old behaviour: leave nothing to the next test
            dist.destroy_process_group()
        # Lightning's launcher sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT... in this process; left there, every later
        # train.py subprocess of the session inherits them, takes its DDP ranks for externally launched and waits
        # for a rank 1 that nobody starts
        os.environ.clear()
        os.environ.update(environment)

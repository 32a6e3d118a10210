"""Ctrl-C and SIGTERM stop a real ``train.py`` process with a resumable ``last.ckpt``; the same command
with ``--ckpt_path last`` continues it in the same run folder and ends bitwise equal to a run that
never stopped (the in-process cases of every method family are in ``test_exact_resume.py``).

The run is the quickstart recipe (FixMatch with EMA) shrunk to 3 epochs of 3 steps, with online label
smoothing as the labeled loss so that the state an epoch end changes is part of the comparison;
once in one process, once as two DDP processes (gloo) of which only rank 0 gets the signal.
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch

from tests.signal_helpers import REPO, run_train_py, stop_at_step
from tests.test_exact_resume import NOT_COMPARED, _differences

ARGS = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.criterion", "online_label_smoothing",
        "--data.steps_per_epoch", "3", "--data.batch_size", "8", "--data.uratio", "2", "--trainer.max_epochs", "3",
        "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DDP = ["--config", str(REPO / "configs" / "strategies" / "ddp_cpu.yaml")]  # two gloo processes
RUN = Path("runs") / "quickstart" / "lightning_logs" / "version_0"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _rows(metrics: Path) -> list[dict[str, str]]:
    with open(metrics, newline="") as file:
        return [{key: value for key, value in row.items() if value} for row in csv.DictReader(file)]


def _final_checkpoint(args: list[str], cwd: Path) -> dict:
    returncode, output = run_train_py(args, cwd)
    assert returncode == 0, output[-3000:]
    assert "terminate called" not in output, output[-3000:]  # a rank aborted at exit (status -6)
    return _load(cwd / RUN / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return _final_checkpoint(ARGS, tmp_path_factory.mktemp("uninterrupted"))


def _assert_equal(uninterrupted: dict, resumed: dict) -> None:
    assert resumed["global_step"] == uninterrupted["global_step"] == 9
    compared = set(uninterrupted) - NOT_COMPARED
    assert {"state_dict", "optimizer_states", "lr_schedulers", "ema", "DigitsSSL"} <= compared
    differing = [d for key in sorted(compared) for d in _differences(uninterrupted[key], resumed[key], key)]
    assert not differing, f"not restored exactly: {differing[:10]}"


@pytest.mark.parametrize("signum, wait_at, stopped_at", [
    (signal.SIGINT, 4, 5),   # Ctrl-C in the middle of epoch 1: saved after step 5
    (signal.SIGTERM, 5, 6),  # during step 6, epoch 1's last: saved at the epoch end, after its hooks
], ids=["sigint_mid_epoch", "sigterm_on_an_epochs_last_step"])
def test_a_signal_stops_with_last_ckpt_and_the_same_command_resumes_exactly(tmp_path, uninterrupted, signum,
                                                                            wait_at, stopped_at):
    name = signal.Signals(signum).name
    returncode, output = stop_at_step(ARGS, tmp_path, step=wait_at, signum=signum)
    assert returncode == 128 + signum, output[-3000:]  # 130 / 143, as a shell reports a process a signal stopped
    assert f"{name} received: finishing this step" in output
    assert f"Stopped by {name} after step {stopped_at}" in output and "--ckpt_path last" in output
    assert "test/acc" not in output  # no test after a stopped fit
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == stopped_at
    rows_before = _rows(tmp_path / RUN / "metrics.csv")

    returncode, output = run_train_py([*ARGS, "--ckpt_path", "last"], tmp_path)
    assert returncode == 0, output[-3000:]
    assert f"Restored all states from the checkpoint at {Path(RUN, 'checkpoints', 'last.ckpt')}" in output
    assert "No checkpoint will be loaded" not in output and "test/acc" in output
    assert sorted(p.name for p in (tmp_path / RUN).parent.iterdir()) == ["version_0"]  # logged on in its folder
    rows_after = _rows(tmp_path / RUN / "metrics.csv")  # the rows before the stop are kept, then continued
    assert rows_before and rows_after[:len(rows_before)] == rows_before and len(rows_after) > len(rows_before)
    _assert_equal(uninterrupted, _load(last))


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_previous_last_ckpt(tmp_path):
    returncode, output = stop_at_step(ARGS, tmp_path, step=4, signum=signal.SIGINT, times=2)
    assert returncode == 1 and "Detected KeyboardInterrupt" in output, output[-3000:]  # Lightning's
    assert "Stopped by" not in output
    assert _load(tmp_path / RUN / "checkpoints" / "last.ckpt")["global_step"] == 3  # epoch 0's end, whole


def test_a_signal_to_rank_0_stops_both_ddp_ranks_at_one_step_and_the_resume_is_exact(tmp_path):
    # Ctrl-C reaches every process of a terminal; a scheduler's SIGTERM may reach one: rank 1 learns of it
    # one step later (the ranks' flags are all-reduced during the next step), so a signal in step 4 stops
    # both after step 5, in the middle of epoch 1
    for folder in ("uninterrupted", "stopped"):
        (tmp_path / folder).mkdir()
    uninterrupted = _final_checkpoint([*ARGS, *DDP], tmp_path / "uninterrupted")
    returncode, output = stop_at_step([*ARGS, *DDP], tmp_path / "stopped", step=3, signum=signal.SIGTERM)
    assert returncode == 143 and "Stopped by SIGTERM after step 5" in output, output[-3000:]
    returncode, output = run_train_py([*ARGS, *DDP, "--ckpt_path", "last"], tmp_path / "stopped")
    assert returncode == 0, output[-3000:]
    _assert_equal(uninterrupted, _load(tmp_path / "stopped" / RUN / "checkpoints" / "last.ckpt"))

"""What a run prints: no Lightning tips or foreign warnings, the training loss and the mask ratio in the
progress bar, and one summary line at the end of fit/validate/test (metric, weights, run folder,
checkpoint). The main job for real (``python train.py``, shrunk), the rest through ``cli_main``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_modules.core.progress_values import HostValues
from tests.signal_helpers import REPO, run_train_py
from train import cli_main

TINY = ["--data.steps_per_epoch", "3", "--data.batch_size", "8", "--data.uratio", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.log_every_n_steps", "1"]
QUICK = ["--config", str(REPO / "configs" / "quickstart.yaml"), *TINY]
RUN = Path("runs") / "quickstart" / "lightning_logs"
SUMMARY = re.compile(r"^(fit|test|validate): (\S+) (\d\.\d{4}) on the (.+) \| run folder (\S+) \| checkpoint (\S+)$")


def _summary(output: str) -> re.Match:
    lines = [line for line in output.splitlines() if line.strip()]
    match = SUMMARY.match(lines[-1])
    assert match, f"the run does not end with the summary line: {lines[-3:]}"
    return match


def test_the_main_job_prints_no_tips_shows_loss_and_mask_ratio_and_ends_with_the_summary(tmp_path):
    returncode, output = run_train_py(["fit", *QUICK], tmp_path)
    assert returncode == 0, output[-3000:]
    for noise in ("Tip:", "litlogger", "litmodels", "tensorboardX", "LeafSpec", "FutureWarning"):
        assert noise not in output, f"{noise!r} still printed"
    bar = [line for line in output.replace("\r", "\n").splitlines() if line.startswith("Epoch 0: 100%")]
    assert bar and re.search(r"loss=\d\.\d{3}", bar[-1]) and re.search(r"mask_ratio=\d\.\d{3}", bar[-1]), bar[-1:]
    stage, metric, value, weights, run, ckpt = _summary(output).groups()
    assert (stage, metric, run) == ("fit", "test/acc", str(RUN / "version_0"))
    assert weights == "EMA weights (decay 0.99, 3 updates)"
    assert ckpt == str(RUN / "version_0" / "checkpoints" / "last.ckpt") and (tmp_path / ckpt).is_file()
    table = re.search(r"test/acc\s+(\S+)", output[output.index("Test metric"):])
    assert abs(float(table.group(1)) - float(value)) <= 5e-5, "the summary's number is not the table's"

    returncode, output = run_train_py(["test", *QUICK, "--ckpt_path", "last"], tmp_path)
    assert returncode == 0, output[-3000:]
    stage, metric, _, weights, run, read = _summary(output).groups()
    assert (stage, metric, run, read) == ("test", "test/acc", str(RUN / "version_1"), ckpt)
    assert weights == "EMA weights (decay 0.99, 3 updates)"  # the checkpoint's EMA, restored


def test_summary_names_raw_weights_the_ema_callback_and_a_fit_without_test(capsys):
    tiny = [*QUICK, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli_main(["fit", *tiny, "--model.ema_decay", "null"])
    assert _summary(capsys.readouterr().out).group(4) == "raw weights"
    cli_main(["fit", *tiny, "--model.ema_decay", "null", "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=0.9"])
    assert _summary(capsys.readouterr().out).group(4) == "EMA weights (the EMA callback, decay 0.9, 3 updates)"
    cli_main(["fit", *tiny, "--test_after_fit", "false"])
    stage, metric, *_ = _summary(capsys.readouterr().out).groups()
    assert (stage, metric) == ("fit", "val/acc")  # no test: the last validation's number, named as such
    cli_main(["validate", *tiny, "--ckpt_path", "last"])
    assert _summary(capsys.readouterr().out).group(2) == "val/acc"


def test_host_values_on_the_cpu_are_the_step_values():
    values = HostValues()({"loss": torch.tensor(2.5), "mask_ratio": torch.tensor(0.25)})
    assert {k: (v.device.type, float(v)) for k, v in values.items()} == {"loss": ("cpu", 2.5), "mask_ratio": ("cpu", 0.25)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_values_never_make_the_host_wait_for_the_gpu():
    host_values, seen = HostValues(), []
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        for step in range(20):
            loss = torch.full((), float(step), device="cuda") * 1.0
            seen.append(host_values({"loss": loss}))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    last = host_values({"loss": torch.full((), 20.0, device="cuda")})
    assert all(v["loss"].device.type == "cpu" for v in seen if v) and 0 <= float(last["loss"]) <= 20
    steps = [float(v["loss"]) for v in seen if v]
    assert steps == sorted(steps) and steps[-1] >= 20 - 1 - 8  # never more than MAX_PENDING behind

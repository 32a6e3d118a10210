"""``--optimizer`` and ``--lr_scheduler`` through the real CLI on digits: the given optimizer is built on
the method's parameter groups (no weight decay on biases and norm weights), the method's per-step
cosine schedule stays unless a scheduler is given, and a scheduler alone runs on the method's SGD.
LightningCLI alone built the optimizer over one group, dropped the schedule, and ignored a scheduler
given without an optimizer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from train import cli_main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.steps_per_epoch", "2", "--data.batch_size", "8",
         "--data.uratio", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--test_after_fit", "false"]


def _fit(*args: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["fit", *QUICK, *args])
    assert not [w for w in caught if "will be overridden" in str(w.message)], "LightningCLI's untrue override warning"
    return cli


def _assert_groups(cli, optimizer_class: type, weight_decay: float) -> None:
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is optimizer_class
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trained = [p for p in cli.model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trained) and no_decay["params"]


def test_optimizer_keeps_the_parameter_groups_and_the_methods_cosine_schedule():
    cli = _fit("--trainer.max_steps", "2", "--optimizer", "AdamW", "--optimizer.lr", "0.001",
               "--optimizer.weight_decay", "0.05")
    _assert_groups(cli, torch.optim.AdamW, 0.05)
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR) and config.interval == "step"
    # 2 of K = 2 steps along lr0 * cos(7 pi k / 16 K)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001 * math.cos(7 * math.pi / 16))


def test_optimizer_with_a_scheduler_steps_the_given_scheduler_per_epoch():
    cli = _fit("--trainer.max_epochs", "2", "--optimizer", "Adam", "--optimizer.lr", "0.01",
               "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5")
    _assert_groups(cli, torch.optim.Adam, 0.0)  # Adam's own default weight decay
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.interval == "epoch"
    assert [g["lr"] for g in cli.trainer.optimizers[0].param_groups] == pytest.approx([0.01 * 0.25] * 2)


def test_a_scheduler_alone_runs_on_the_methods_sgd():
    cli = _fit("--trainer.max_epochs", "1", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1",
               "--lr_scheduler.gamma", "0.1")
    _assert_groups(cli, torch.optim.SGD, 5e-4)  # the quickstart's weight_decay
    assert cli.trainer.optimizers[0].defaults["nesterov"] and cli.trainer.optimizers[0].defaults["momentum"] == 0.9
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.03 * 0.1)

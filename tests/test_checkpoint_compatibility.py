"""A checkpoint written before the package layout of issue 16 still loads for ``test`` and scores as it did.

``tests/data/quickstart_main_2026-12-02.ckpt`` was written by ``main`` at d7ba54a, the last commit of the
flat layout, from a copy of that commit (2-core x86-64 CPU, 2026-12-02)::

    python train.py fit --config configs/quickstart.yaml --trainer.max_steps 2 --data.steps_per_epoch 2 \\
        --trainer.default_root_dir /tmp/main-run --trainer.enable_progress_bar false

and the same copy then printed the scores kept below::

    python train.py test --config configs/quickstart.yaml --ckpt_path <that run>/checkpoints/last.ckpt

LightningCLI saves the model's class path in the checkpoint (``_class_path``) and, given ``--ckpt_path``,
builds the model from it: ``lightning_modules.FixMatch`` for a recipe or ``--model FixMatch``, the module's
own path (``lightning_modules.fixmatch.FixMatch``) for a run that named the class by it. Both must resolve.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_modules
from lightning_modules.fusion.ensemble import load_member
from train import cli_main

REPO = Path(__file__).resolve().parents[1]
OLD_CHECKPOINT = REPO / "tests" / "data" / "quickstart_main_2026-12-02.ckpt"
# what main's `train.py test` printed for it (2 steps: chance accuracy; the loss pins the weights)
MAIN_TEST_ACC = 0.1111111119389534
MAIN_TEST_LOSS = 2.3207457065582275


def _test(ckpt: Path, tmp_path: Path) -> dict[str, float]:
    cli = cli_main(["test", "--config", str(REPO / "configs" / "quickstart.yaml"), "--ckpt_path", str(ckpt),
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--trainer.logger", "false"])
    assert type(cli.model) is lightning_modules.FixMatch
    # the checkpoint's weights (net.*) and its EMA copy ("ema"), which test evaluates
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    for name, value in cli.model.state_dict().items():
        assert torch.equal(value.cpu(), saved["state_dict"][name]), name
    assert cli.model.ema.num_updates == 2
    for name, value in cli.model.ema.module.state_dict().items():
        assert torch.equal(value.cpu(), saved["ema"]["module"][name]), name
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


def test_a_checkpoint_of_the_flat_layout_tests_as_it_did_on_main(tmp_path):
    saved = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["_class_path"] == "lightning_modules.FixMatch"
    assert OLD_CHECKPOINT.stat().st_size < 1_000_000
    metrics = _test(OLD_CHECKPOINT, tmp_path)
    assert metrics["test/acc"] == pytest.approx(MAIN_TEST_ACC, abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(MAIN_TEST_LOSS, rel=1e-5)


def test_a_checkpoint_naming_its_class_by_the_old_module_path_still_loads(tmp_path):
    # The same checkpoint as a run started with --model lightning_modules.fixmatch.FixMatch would have saved it.
    saved = torch.load(OLD_CHECKPOINT, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["_class_path"] = "lightning_modules.fixmatch.FixMatch"
    old_path = tmp_path / "old_class_path.ckpt"
    torch.save(saved, old_path)
    metrics = _test(old_path, tmp_path)
    assert metrics["test/acc"] == pytest.approx(MAIN_TEST_ACC, abs=1e-6)
    member = load_member(old_path)  # Ensemble's loader: the class from _class_path, then load_from_checkpoint
    assert type(member) is lightning_modules.FixMatch and member.ema.num_updates == 2

"""``labelwise self-train`` (Noisy Student rounds over KDStudent) through the real command line on digits."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_modules import Supervised
from lightning_modules.distillation.self_training import check_student_size, run_self_training
from train import RECIPES, main

TINY = ["--trainer.max_epochs", "1", "--data.steps_per_epoch", "3", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_self_train_command_runs_rounds_chains_teachers_and_skips_finished_rounds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "st"
    command = ["self-train", "--config", str(RECIPES / "self_training_digits.yaml"), "--rounds", "2",
               "--folder", str(folder), *TINY]
    main(command)
    summary = json.loads((folder / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["model"] for r in rounds] == ["Supervised", "KDStudent", "KDStudent"]
    assert (folder / "summary.csv").read_text().splitlines()[0] == "round,model,network,teacher,checkpoint,test_acc,seconds"
    for r in rounds:
        assert 0.0 <= r["test_acc"] <= 1.0 and (folder / f"round_{r['round']}.ckpt").exists()
    for previous, current in zip(rounds, rounds[1:]):
        assert current["teacher"] == previous["checkpoint"]
        student, teacher = _load(previous["checkpoint"]), _load(current["checkpoint"])
        taught_by = {k.removeprefix("teacher."): v for k, v in teacher["state_dict"].items() if k.startswith("teacher.")}
        evaluated = student["ema"]["module"]  # the weights round r - 1 was tested on
        assert taught_by.keys() == evaluated.keys()
        assert all(torch.equal(taught_by[k], evaluated[k]) for k in evaluated), "the teacher is not the last student"
        assert teacher["hyper_parameters"]["distill_unlabeled"] is True
        assert teacher["hyper_parameters"]["network_kwargs"]["stochastic_depth"] == 0.2  # the student is noised
    capsys.readouterr()

    # a rerun with one more round trains only round 3; the finished rounds stay as they were
    before = {r["round"]: (folder / f"round_{r['round']}.ckpt").stat().st_mtime_ns for r in rounds}
    main([*command[:4], "3", *command[5:]])
    out = capsys.readouterr().out
    assert out.count("done before") == 3 and "self-training round 3: KDStudent" in out
    after = json.loads((folder / "summary.json").read_text())["rounds"]
    assert after[:3] == rounds and after[3]["teacher"] == rounds[2]["checkpoint"]
    assert all((folder / f"round_{k}.ckpt").stat().st_mtime_ns == t for k, t in before.items())


def test_self_training_refuses_a_smaller_student_and_bad_rounds(tmp_path):
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        run_self_training(lambda args: ("", 0.0), [], 0, tmp_path)
    with pytest.raises(ValueError, match="one network for every round or one per round"):
        run_self_training(lambda args: ("", 0.0), [], 3, tmp_path, ["wrn10_1", "wrn16_1"])
    teacher = Supervised(num_classes=10, in_channels=1, network="wrn16_1")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(teacher)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    assert check_student_size(tmp_path / "teacher.ckpt", "wrn16_2") == "wrn16_2"
    with pytest.raises(ValueError, match="equal-or-larger student: wrn10_1"):
        check_student_size(tmp_path / "teacher.ckpt", "wrn10_1")

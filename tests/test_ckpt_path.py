"""``--ckpt_path`` through the real CLI (train.py's ``cli_main``) on digits: ``last`` finds and
continues the newest run of a config in its own folder, or is an error; short runs leave a
``last.ckpt``; a checkpoint of another model class, a file that is not a checkpoint and an untrained
model given to ``test`` are refused with our messages; the README's checkpoint paths exist."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
import yaml

from train import cli_main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.steps_per_epoch", "2",
         "--data.batch_size", "8", "--data.uratio", "1", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
RUNS = Path("runs") / "quickstart" / "lightning_logs"


def _fit(*args: str, config: str = "quickstart.yaml"):
    return cli_main(["fit", "--config", str(REPO / "configs" / config), *QUICK[2:], "--test_after_fit", "false", *args])


def _error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli_main(args)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_ckpt_path_last_continues_the_newest_run_of_the_config_in_its_folder():
    _fit("--trainer.max_epochs", "1")                        # version_0
    _fit("--trainer.max_epochs", "1", "--seed_everything", "1")  # version_1, a fresh run: the newest
    cli_main(["test", *QUICK, "--ckpt_path", "last"])       # version_2: evaluates version_1, writes no checkpoint
    newest = RUNS / "version_1" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0", "version_1", "version_2"]

    cli = _fit("--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert cli.trainer.ckpt_path == str(newest)  # restored, not a fresh start
    assert Path(cli.trainer.log_dir) == RUNS / "version_1"  # logs on in the run's folder
    assert sorted(p.name for p in RUNS.iterdir()) == ["version_0", "version_1", "version_2"]
    assert torch.load(newest, weights_only=False)["global_step"] == 4
    assert cli.trainer.global_step == 4 and cli.model.ema.num_updates == 4  # 2 steps before, 2 after


def test_ckpt_path_last_without_a_run_is_an_error_not_a_fresh_start(capsys):
    err = _error(capsys, ["fit", *QUICK, "--ckpt_path", "last"])
    assert f"--ckpt_path last: no {RUNS / '*' / 'checkpoints' / 'last.ckpt'}" in err and "drop --ckpt_path" in err
    assert not Path("runs").exists()
    err = _error(capsys, ["fit", *QUICK, "--trainer.logger", "false", "--ckpt_path", "last"])
    assert f"no {Path('runs', 'quickstart', 'checkpoints', 'last.ckpt')}" in err


def test_ckpt_path_last_with_wandb_is_the_newest_runs_checkpoint(wandb_offline):
    import wandb

    wandb_args = ["--config", str(REPO / "configs" / "loggers" / "wandb.yaml"),
                  "--trainer.logger.init_args.save_dir", "runs/wandb"]
    first = _fit("--trainer.max_epochs", "1", *wandb_args)
    checkpoint = Path(first.trainer.checkpoint_callback.last_model_path)
    assert checkpoint.parent.parent.parent == Path("runs", "wandb", "labelwise")  # <save_dir>/<project>/<run id>
    wandb.finish()
    resumed = _fit("--trainer.max_epochs", "2", "--ckpt_path", "last", *wandb_args)
    assert resumed.trainer.ckpt_path == str(checkpoint) and resumed.trainer.global_step == 4
    wandb.finish()


TWO_CSV_LOGGERS = """
trainer:
  logger:
    - {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs/two, name: a}}
    - {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs/two, name: b}}
"""


def test_ckpt_path_last_with_a_list_of_loggers_continues_the_first_loggers_run():
    # the first logger places the checkpoints; the others start a new run of theirs (as W&B does)
    Path("two.yaml").write_text(TWO_CSV_LOGGERS)
    first = _fit("--config", "two.yaml", "--trainer.max_epochs", "1")
    checkpoint = Path("runs", "two", "a", "version_0", "checkpoints", "last.ckpt")
    assert Path(first.trainer.checkpoint_callback.last_model_path) == checkpoint
    resumed = _fit("--config", "two.yaml", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.trainer.ckpt_path == str(checkpoint) and resumed.trainer.global_step == 4
    assert [Path(logger.log_dir) for logger in resumed.trainer.loggers] == \
        [Path("runs", "two", "a", "version_0"), Path("runs", "two", "b", "version_1")]
    assert sorted(p.name for p in Path("runs", "two", "a").iterdir()) == ["version_0"]
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4


def test_a_run_shorter_than_an_epoch_leaves_last_ckpt_at_its_final_step():
    cli = _fit("--data.steps_per_epoch", "100", "--trainer.max_steps", "3")
    checkpoints = Path(cli.trainer.log_dir) / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_checkpoint_of_another_model_class_is_refused_naming_both(tmp_path, capsys):
    teacher = Path(_fit("--trainer.max_steps", "1", config="supervised_digits.yaml").trainer.log_dir)
    teacher = teacher / "checkpoints" / "last.ckpt"
    student = cli_main(["fit", "--model", "KDStudent", "--model.teacher", str(teacher), "--model.network", "wrn10_1",
                        "--data", "DigitsSSL", "--data.steps_per_epoch", "1", "--data.batch_size", "8",
                        "--trainer.max_steps", "1", "--trainer.default_root_dir", "student", "--test_after_fit",
                        "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    student = Path(student.trainer.log_dir) / "checkpoints" / "last.ckpt"
    for command in ("test", "fit"):
        err = _error(capsys, [command, *QUICK, "--ckpt_path", str(student)])
        assert (f"--ckpt_path {student} holds a lightning_modules.KDStudent but the config builds a "
                "lightning_modules.FixMatch") in err and "silently build a KDStudent" in err


@pytest.mark.parametrize("content", ["garbage", "truncated", "state_dict"])
def test_a_file_that_is_not_a_checkpoint_gets_our_message(tmp_path, capsys, content):
    path = tmp_path / "model.ckpt"
    state = {"net.weight": torch.zeros(3)}
    if content == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        torch.save(state, path)
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:200])
    err = _error(capsys, ["test", *QUICK, "--ckpt_path", str(path)])
    expected = "is a torch file but not a Lightning checkpoint" if content == "state_dict" else \
        "cannot be read as a checkpoint"
    assert f"--ckpt_path {path} {expected}" in err and "weights_only" not in err
    assert "does not exist" in _error(capsys, ["test", *QUICK, "--ckpt_path", str(tmp_path / "missing.ckpt")])


def test_evaluating_untrained_weights_is_refused_unless_asked(capsys):
    for command in ("validate", "test", "predict"):
        err = _error(capsys, [command, *QUICK])
        assert f"{command} without --ckpt_path would score the freshly initialised weights of FixMatch" in err
        assert "--allow_untrained true" in err
    cli = cli_main(["test", *QUICK, "--allow_untrained", "true"])
    assert "test/acc" in cli.trainer.callback_metrics
    # an Ensemble's weights are its trained members: no --ckpt_path needed
    member = Path(_fit("--trainer.max_steps", "1").trainer.log_dir) / "checkpoints" / "last.ckpt"
    cli = cli_main(["test", "--model", "Ensemble", "--model.checkpoints", f"[{member}]", "--data", "DigitsSSL",
                    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"])
    assert "test/acc" in cli.trainer.callback_metrics


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[2:] for line in text.splitlines()
            if line.startswith("python train.py") and "--ckpt_path runs/" in line]


def test_readme_checkpoint_paths_are_files_the_recipes_write():
    commands = _readme_commands()
    assert commands, "README shows no test command with a checkpoint path"
    for args in commands:
        config = yaml.safe_load((REPO / args[args.index("--config") + 1]).read_text())
        ckpt_path = args[args.index("--ckpt_path") + 1]
        assert ckpt_path == f"{config['trainer']['default_root_dir']}/lightning_logs/version_0/checkpoints/last.ckpt"
    # the quickstart's for real: fit as the README says (shrunk), then its test command as written
    (args,) = [a for a in commands if a[a.index("--config") + 1] == "configs/quickstart.yaml"]
    tiny = QUICK[2:]
    (Path("configs")).symlink_to(REPO / "configs")
    _fit("--trainer.max_epochs", "1")
    cli = cli_main([*args, *tiny])
    assert Path(args[args.index("--ckpt_path") + 1]).is_file() and "test/acc" in cli.trainer.callback_metrics



def test_a_resumed_fit_with_changed_model_arguments_is_an_error_not_silently_the_checkpoints(capsys):
    # LightningCLI replaces the config's model arguments by the checkpoint's on --ckpt_path: --model.lr 0.01
    # trained on at 0.03 without a word.
    _fit("--trainer.max_epochs", "1")
    err = _error(capsys, ["fit", *QUICK, "--trainer.max_epochs", "2", "--model.lr", "0.01", "--model.threshold", "0.9",
                          "--ckpt_path", "last"])
    assert "lr 0.03 in the checkpoint, 0.01 here; threshold 0.95 in the checkpoint, 0.9 here" in err
    assert "Resume with the arguments the run was started with" in err and "without --ckpt_path" in err
    cli = _fit("--trainer.max_epochs", "2", "--ckpt_path", "last")  # the same arguments resume
    assert cli.trainer.global_step == 4
    # test and predict evaluate the checkpoint's model as it was trained: no comparison there
    cli_main(["test", *QUICK, "--model.threshold", "0.9", "--ckpt_path", "last"])

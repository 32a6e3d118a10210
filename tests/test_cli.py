"""train.py: --print_config for every registered class and config, and fit/validate/test/predict."""

from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import datamodules
import lightning_modules
from train import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _print_config(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("model", lightning_modules.MODELS)
def test_print_config_for_every_model(model, capsys):
    out = _print_config(["fit", "--model", model, "--data", "DigitsSSL"], capsys)
    assert f"class_path: lightning_modules.{model}" in out
    cls = getattr(lightning_modules, model)
    if issubclass(cls, lightning_modules.Segmenter):
        assert "network: unet3plus" in out
    elif issubclass(cls, lightning_modules.Detector):
        assert "network: fasterrcnn_resnet50_fpn" in out
    elif cls is lightning_modules.LadderNetwork:  # its own fully connected encoder (ssl/ladder.py)
        assert "network: mlp" in out
    elif issubclass(cls, lightning_modules.SemiSupervisedModule):
        assert "network: wrn28_2" in out


@pytest.mark.parametrize("data", datamodules.DATAMODULES)
def test_print_config_for_every_data_class(data, capsys):
    out = _print_config(["fit", "--model", "FixMatch", "--data", data], capsys)
    assert f"class_path: datamodules.{data}" in out and "num_labeled:" in out and "uratio:" in out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    out = _print_config(["fit", "--config", str(config)], capsys)
    assert "class_path: lightning_modules." in out
    # every recipe keeps a resumable last.ckpt (docs/robustness.md, Exact resume); long epochs also on steps
    assert "class_path: callbacks.ResumableCheckpoint" in out
    assert ("every_n_train_steps: 256" in out) == ("steps_per_epoch: 1024" in out or "steps_per_epoch: 782" in out)


@pytest.mark.parametrize("strategy", sorted((REPO / "configs" / "strategies").glob("*.yaml")), ids=lambda p: p.stem)
def test_strategy_fragments_combine_with_a_recipe(strategy, capsys):
    recipe = REPO / "configs" / "fixmatch_cifar10.yaml"
    out = _print_config(["fit", "--config", str(recipe), "--config", str(strategy)], capsys)
    assert "class_path: lightning_modules.FixMatch" in out and "strategy:" in out
    assert ("ema_decay: null" in out) == (strategy.stem == "fsdp")  # FSDP cannot shard the EMA copy


@pytest.mark.parametrize("logger", sorted((REPO / "configs" / "loggers").glob("*.yaml")), ids=lambda p: p.stem)
def test_logger_fragments_combine_with_a_recipe(logger, capsys):
    recipe = REPO / "configs" / "quickstart.yaml"
    out = _print_config(["fit", "--config", str(recipe), "--config", str(logger)], capsys)
    assert "class_path: lightning_modules.FixMatch" in out
    assert "class_path: lightning.pytorch.loggers." in out  # the fragment's logger replaced the default


def test_unknown_model_name_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model", "NoSuchMethod", "--data", "DigitsSSL"])
    assert "NoSuchMethod" in capsys.readouterr().err


def test_fit_then_validate_test_predict_from_the_checkpoint(tmp_path, capsys):
    quick = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(tmp_path),
             "--trainer.enable_progress_bar", "false", "--data.steps_per_epoch", "4", "--data.batch_size", "8"]
    cli = cli_main(["fit", *quick, "--trainer.max_epochs", "1"])
    assert "test/acc" in cli.trainer.callback_metrics  # test_after_fit ran on the final weights
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.in_channels == 1  # linked from the data
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "split.json").is_file() and (log_dir / "config.yaml").is_file()
    assert isinstance(cli.trainer.logger, (CSVLogger, TensorBoardLogger))  # the default: W&B only when asked
    assert not list(tmp_path.rglob("*.wandb"))
    ckpt = next(log_dir.glob("checkpoints/*.ckpt"))
    for command in ("validate", "test"):
        cli = cli_main([command, *quick, "--ckpt_path", str(ckpt)])
        assert f"{'val' if command == 'validate' else 'test'}/acc" in cli.trainer.callback_metrics
    cli = cli_main(["predict", *quick, "--ckpt_path", str(ckpt)])
    assert cli.trainer.predict_loop.predictions is not None


def _required_arguments(model: str, tmp_path: Path) -> dict:
    """Real files for the two classes that cannot be built without one (a KD teacher, ensemble members)."""
    import lightning as L
    import torch

    from lightning_modules.classification.networks import build_network

    if model == "KDStudent":  # a plain state_dict of a small network, for the default 10 classes and 3 channels
        torch.save(build_network("wrn10_1", num_classes=10, in_channels=3).state_dict(), tmp_path / "teacher.pt")
        return {"teacher": str(tmp_path / "teacher.pt"), "teacher_network": "wrn10_1"}
    if model == "Ensemble":  # an untrained member saved by a plain Trainer, so its class is given
        member = lightning_modules.Supervised(num_classes=10, in_channels=3, network="wrn10_1")
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.strategy.connect(member)
        trainer.save_checkpoint(tmp_path / "member.ckpt")
        return {"checkpoints": [str(tmp_path / "member.ckpt")], "module_class": "lightning_modules.Supervised"}
    return {}


@pytest.mark.parametrize("model", lightning_modules.MODELS)
def test_cli_defaults_are_the_python_defaults(model, tmp_path, capsys):
    # LightningCLI passes every argument explicitly, so a default set inside __init__ (kwargs.setdefault)
    # reached Python users only: `--model MeanTeacher` trained without its ramp-up (issue 14 item 12).
    import json

    import yaml

    required = _required_arguments(model, tmp_path)
    flags = [f"--model.{name}={value if isinstance(value, str) else json.dumps(value)}" for name, value in required.items()]
    printed = yaml.safe_load(_print_config(["fit", "--model", model, "--data", "DigitsSSL", *flags], capsys))
    cli = printed["model"]["init_args"]
    python = dict(getattr(lightning_modules, model)(**required).hparams)
    linked = {"num_classes", "in_channels"}  # set from the DataModule when the CLI instantiates the model
    assert set(cli) == set(python) - linked
    assert cli == {name: python[name] for name in cli}

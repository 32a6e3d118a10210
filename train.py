"""labelwise's command line: LightningCLI with models and data selected by class name.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --model FixMatch --data CIFAR10SSL --data.num_labeled 4000 --data.download true
    python train.py fit --config configs/quickstart.yaml --ckpt_path last   # continue the newest run
    python train.py test --config configs/quickstart.yaml \
        --ckpt_path runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt
    python train.py fit --model FixMatch --data DigitsSSL --print_config
    python train.py fit --config configs/unet_membrane.yaml --config configs/loggers/wandb.yaml
    labelwise fit --config quickstart   # the installed command (train:main): a recipe by name, from any folder
    labelwise soup --checkpoints a.ckpt b.ckpt --data DigitsSSL --data_kwargs '{"val_labeled_per_class": 5}' \
        --output soup.ckpt              # the greedy model soup of finished runs (also python train.py soup)
    labelwise self-train --config configs/self_training_digits.yaml --rounds 3 --folder runs/self_training
                                        # Noisy Student rounds of KDStudent (also python train.py self-train)

A relative data root in a config file is relative to the file; typed here, to the working folder
(datamodules.data_root). ``--optimizer``/``--lr_scheduler`` keep the method's parameter groups and
schedule (callbacks.optimizer_options). A run ends with one line: metric, EMA or raw weights, run
folder, checkpoint (callbacks.console).

Runs log to CSV (TensorBoard when installed) unless a logger is configured; with W&B
(configs/loggers/wandb.yaml) every run also keeps its config, split and test-metric tables
(callbacks.WandbRun, added to every run). See docs/dashboards.md.

Checkpoints: ``last.ckpt`` in the run's ``checkpoints/`` folder (callbacks.ResumableCheckpoint, unless
a config sets its own checkpoint callback), also written on Ctrl-C and SIGTERM; ``--ckpt_path last``
continues the newest run of the config in its own folder. See docs/robustness.md, "Exact resume".
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch.distributed as dist
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI

import callbacks  # registers callbacks for --trainer.callbacks by name
import datamodules  # noqa: F401  (registers DataModules for --data by name)
import lightning_modules  # noqa: F401  (registers methods for --model by name)
from callbacks.ckpt_path import keep_csv_metrics, resolve_ckpt_path
from callbacks.console import quiet_lightning_noise, summary_line
from callbacks.optimizer_options import OVERRIDE_WARNING, has_optimizer_recipe, use_optimizer_options
from callbacks.recipes import find_configs
from callbacks.resumable_checkpoint import StoppedBySignal
from datamodules.data_root import register_data_roots
from lightning_modules.distillation.self_training import run_self_training
from lightning_modules.fusion import run_soup

#: the recipes: beside this file in the checkout and in an installed package (callbacks.recipes)
RECIPES = Path(__file__).resolve().parent / "configs"


LINKED_FROM_DATA = {"data.num_classes": "num_classes", "data.num_channels": "in_channels"}  # data -> model argument


class LabelwiseCLI(LightningCLI):
    """Links the data's class and channel counts into the model, checks ``--ckpt_path`` and resolves
    ``last`` (:mod:`callbacks.ckpt_path`), keeps ``last.ckpt`` resumable
    (:class:`callbacks.ResumableCheckpoint` when no checkpoint callback is configured), writes
    checkpoints atomically (:class:`callbacks.AtomicCheckpointIO` unless another checkpoint IO is
    chosen), refuses to evaluate untrained weights, tests after ``fit`` and prints the summary line."""

    _resumed_version: str | None = None

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in LINKED_FROM_DATA.items():
            parser.link_arguments(source, f"model.init_args.{target}", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final (EMA) weights on the test set and print the accuracy.")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict without --ckpt_path: evaluate the model's freshly "
                                 "initialised weights on purpose (refused otherwise).")

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, list) or args is None:
            given = sys.argv[1:] if args is None else args
            check_class_names(parser, given)
            try:
                found = find_configs(given, RECIPES)  # --config quickstart: the shipped recipe
            except ValueError as error:
                parser.error(str(error))
            if args is None:
                self.config = parser.parse_args(found)  # as LightningCLI parses sys.argv
            else:
                super().parse_arguments(parser, found)
        else:
            super().parse_arguments(parser, args)
        self.check_ckpt_path(parser)

    def check_ckpt_path(self, parser) -> None:
        """Resolve ``--ckpt_path last`` and refuse a path that is not a checkpoint of the config's model,
        before LightningCLI reads its hyper-parameters (which would replace the config's model class)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        try:
            resumed = resolve_ckpt_path(self.config[subcommand], subcommand, Path.cwd(), tuple(LINKED_FROM_DATA.values()))
        except ValueError as error:
            parser.error(str(error))
        if resumed is not None:  # the resumed fit logs on in the run's own folder
            self._resumed_version, logger = resumed
            self.config = parser.parse_object({subcommand: {"trainer": {"logger": logger}}}, self.config)

    def instantiate_classes(self) -> None:
        """``--optimizer``/``--lr_scheduler`` keep the method's parameter groups and, unless replaced, its
        schedule (callbacks.optimizer_options), where LightningCLI would drop both."""
        config = self.config.get(str(self.subcommand), self.config)
        options = config.get("optimizer"), config.get("lr_scheduler")
        module, _, name = str(config.get("model", {}).get("class_path", "")).rpartition(".")
        kept = any(options) and module and has_optimizer_recipe(getattr(importlib.import_module(module), name, None))
        with warnings.catch_warnings():
            if kept:  # LightningCLI's warning that it replaces configure_optimizers would be untrue
                warnings.filterwarnings("ignore", message=f".*{re.escape(OVERRIDE_WARNING)}")
            super().instantiate_classes()
        init = self.config_init.get(str(self.subcommand), self.config_init)
        use_optimizer_options(self.model, init.get("optimizer"), init.get("lr_scheduler"))

    def instantiate_trainer(self, **kwargs):
        trainer_config = self.config_init.get(str(self.subcommand), self.config_init)["trainer"]
        configured = trainer_config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if trainer_config.get("enable_checkpointing") is not False and "callbacks" not in kwargs and \
                not any(isinstance(callback, Checkpoint) for callback in configured):
            kwargs["callbacks"] = [*configured, callbacks.ResumableCheckpoint()]  # in place of Lightning's default
        trainer = super().instantiate_trainer(**kwargs)
        callbacks.use_atomic_checkpoints(trainer)
        callbacks.use_prediction_writer(trainer)  # predict writes files and says where (callbacks.PredictionWriter)
        return trainer

    def before_fit(self) -> None:
        if self._resumed_version is not None and self.trainer.is_global_zero:
            keep_csv_metrics(self.trainer.logger)

    def refuse_untrained_weights(self) -> None:
        config, model = self.config[self.subcommand], self.model
        if config.get("ckpt_path") or config.get("allow_untrained") or getattr(model, "has_trained_weights", False):
            return  # a checkpoint, asked for, or a model built from trained weights (Ensemble, pretrained Detector)
        self.parser.error(
            f"{self.subcommand} without --ckpt_path would score the freshly initialised weights of "
            f"{type(model).__name__} (chance level): pass --ckpt_path <run>/checkpoints/last.ckpt, or "
            f"--ckpt_path last for this config's newest run; --allow_untrained true evaluates them on purpose")

    before_validate = before_test = before_predict = refuse_untrained_weights

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)
        self.print_summary()

    def print_summary(self) -> None:
        """End the run with one line: metric, which weights, run folder, checkpoint (callbacks.console)."""
        if self.trainer.is_global_zero:
            print(summary_line(self.trainer, self.model, self.subcommand), flush=True)

    after_validate = after_test = print_summary


def check_class_names(parser, args: list[str]) -> None:
    """Refuse ``--model Foo`` / ``--data Foo`` naming no class here, listing the names that exist
    (jsonargparse's own message says only that ``Foo`` is not a dot import path)."""
    choices = {"--model": lightning_modules.MODELS, "--data": datamodules.DATAMODULES}
    packages = {"--model": lightning_modules, "--data": datamodules}
    for flag, following in zip(args, [*args[1:], ""]):
        flag, _, inline = flag.partition("=")
        value = inline or following
        if flag in choices and value.isidentifier() and not hasattr(packages[flag], value):
            parser.error(f"unknown {flag} {value!r}: choose one of {', '.join(choices[flag])} "
                         f"(or a dotted class path, or a config file)")


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    quiet_lightning_noise()
    register_data_roots(RECIPES)
    return LabelwiseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # 1024 epochs x 1024 steps = 2^20 steps, the FixMatch-family budget. Callbacks here are added
        # to those a config lists; WandbRun does nothing unless a WandbLogger logs.
        trainer_defaults={"max_epochs": 1024, "callbacks": [callbacks.WandbRun()]},
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


SOUP_HELP = """Greedy model soup of checkpoints, selected on held-out validation images, reported on the test set.

    labelwise soup --checkpoints a.ckpt b.ckpt c.ckpt --data DigitsSSL \\
        --data_kwargs '{"num_labeled": 50, "val_labeled_per_class": 5}' --metric val/acc --output soup.ckpt

The DataModule must hold out validation images (val_labeled_per_class, num_val, a fold, or the
ingredients' split_file), the ones the ingredients were trained without; selecting on the test set
needs --select_on_test and is marked in the output. Prints each ingredient's validation score, which
ones the soup kept, the soup's validation score, then the test score of the soup and of the best
single ingredient; writes the soup checkpoint atomically. Checkpoints written by train.py rebuild
their module on their own; others need --model (a class name or path). See docs/callbacks_swa_soup.md.
"""


def soup_main(args: list[str] | None = None) -> dict:
    """``labelwise soup`` (also ``python train.py soup`` and ``python benchmarks/soup.py``): parse the
    arguments, build the DataModule, and run :func:`lightning_modules.fusion.soup_selection.run_soup`.
    Not a LightningCLI subcommand: those are Trainer methods, and a soup takes finished checkpoints."""
    parser = argparse.ArgumentParser(prog="labelwise soup", description=SOUP_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--data", default="DigitsSSL", help="a datamodules class name or a dotted path")
    parser.add_argument("--data_kwargs", default="{}", help="JSON arguments of the DataModule")
    parser.add_argument("--metric", default="val/acc")
    parser.add_argument("--mode", choices=["max", "min"], default="max")
    parser.add_argument("--output", required=True)
    parser.add_argument("--update_bn", action="store_true", help="re-estimate BatchNorm statistics of each candidate")
    parser.add_argument("--model", default=None, help="module class (name or dotted path) if the checkpoint cannot say")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--select_on_test", action="store_true",
                        help="allow a DataModule that validates on its test set (the test score is then optimistic)")
    options = parser.parse_args(args)
    quiet_lightning_noise()
    data_class = _class_named(parser, "--data", options.data, datamodules, datamodules.DATAMODULES)
    module_class = _class_named(parser, "--model", options.model, lightning_modules, lightning_modules.MODELS) \
        if options.model else None
    return run_soup(options.checkpoints, data_class(**json.loads(options.data_kwargs)), options.output,
                    metric=options.metric, higher_is_better=options.mode == "max", update_bn=options.update_bn,
                    module_class=module_class, accelerator=options.accelerator, select_on_test=options.select_on_test)


def _class_named(parser: argparse.ArgumentParser, flag: str, name: str, package: ModuleType, names: list[str]) -> type:
    """A class by its name in ``package`` or by a dotted path; an unknown name lists the known ones."""
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module) if module else package, attr)
    except (ImportError, AttributeError):
        parser.error(f"unknown {flag} {name!r}: choose one of {', '.join(names)} (or a dotted class path)")


SELF_TRAIN_HELP = """Noisy Student self-training: round 0 trains a teacher (Supervised) on the labeled images, each
further round a noised student (KDStudent, distill_unlabeled) taught by the previous round's EMA weights.

    labelwise self-train --config configs/self_training_digits.yaml --rounds 3 --folder runs/self_training_digits

Every other argument is a fit override given to each round. The folder keeps round_<r>.ckpt and summary.json/.csv;
a rerun skips the rounds already there. See docs/distillation.md, "Iterative self-training".
"""


def self_train_main(args: list[str] | None = None) -> list[dict]:
    """``labelwise self-train``: round 0 trains a teacher, each further round a noised student of the previous
    round's model (:mod:`lightning_modules.distillation.self_training`); the other arguments are ``fit``'s."""
    parser = argparse.ArgumentParser(prog="labelwise self-train", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=SELF_TRAIN_HELP)
    parser.add_argument("--rounds", type=int, default=3, help="student rounds after the teacher's round 0")
    parser.add_argument("--folder", required=True, help="holds round_<r>/, round_<r>.ckpt and summary.json/.csv")
    parser.add_argument("--student_networks", nargs="+", help="one network for every round or one per round")
    options, recipe = parser.parse_known_args(args)

    def fit_round(round_args: list[str]) -> tuple[str, float]:
        trainer = cli_main(["fit", *round_args]).trainer
        if trainer.interrupted or trainer.checkpoint_callback is None:
            raise RuntimeError("the round was interrupted or wrote no checkpoint: rerun the command to continue")
        return trainer.checkpoint_callback.last_model_path, float(trainer.callback_metrics["test/acc"])

    return run_self_training(fit_round, recipe, options.rounds, options.folder, options.student_networks)


def main(args: list[str] | None = None) -> None:
    """The ``labelwise`` command that ``pip install`` puts on the PATH: ``labelwise fit --config quickstart``,
    ``labelwise soup ...`` (:func:`soup_main`) and ``labelwise self-train ...`` (:func:`self_train_main`)."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["soup"]:
        soup_main(argv[1:])
        return
    if argv[:1] == ["self-train"]:
        self_train_main(argv[1:])
        return
    try:
        cli_main(args)
    except StoppedBySignal:  # every process stops at the same step: they can all leave together
        _leave_process_group()
        raise
    _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process groups of a DDP run before the interpreter exits. Lightning leaves them up; at
    exit gloo's worker threads can then be torn down still joinable, and the process aborts after a finished
    run ("terminate called without an active exception", status -6). Only after a run every process ended:
    after a failure the other processes may be in a collective, and destroying the group could hang."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

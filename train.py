"""labelwise's command line: LightningCLI with models and data selected by class name.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --model FixMatch --data CIFAR10SSL --data.num_labeled 4000 --data.download true
    python train.py test --config configs/fixmatch_cifar10.yaml --ckpt_path path/to/last.ckpt
    python train.py fit --model FixMatch --data DigitsSSL --print_config
    python train.py fit --config configs/unet_membrane.yaml --config configs/loggers/wandb.yaml

Runs log to CSV (TensorBoard when installed) unless a logger is configured; with W&B
(configs/loggers/wandb.yaml) every run also keeps its config, split and test-metric tables
(callbacks.WandbRun, added to every run). See docs/dashboards.md.
"""

from __future__ import annotations

import sys

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import callbacks  # registers callbacks for --trainer.callbacks by name
import datamodules  # noqa: F401  (registers DataModules for --data by name)
import lightning_modules  # noqa: F401  (registers methods for --model by name)


class LabelwiseCLI(LightningCLI):
    """Links the data's class and channel counts into the model, writes checkpoints atomically
    (:class:`callbacks.AtomicCheckpointIO` unless another checkpoint IO is chosen), and tests after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final (EMA) weights on the test set and print the accuracy.")

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, list) or args is None:
            check_class_names(parser, sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        callbacks.use_atomic_checkpoints(trainer)
        callbacks.use_prediction_writer(trainer)  # predict writes files and says where (callbacks.PredictionWriter)
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)


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


if __name__ == "__main__":
    cli_main()

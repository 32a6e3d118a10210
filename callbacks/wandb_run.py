"""What a W&B run keeps besides the logged curves and images: its config, its split, its test metrics.

:class:`WandbRun` does nothing unless one of the trainer's loggers is a ``WandbLogger``. With one, on
rank 0:

- at set-up, the LightningCLI config (the one its ``SaveConfigCallback`` writes to ``config.yaml``)
  goes into the run's config under the key ``cli``, and the config and the DataModule's split file
  (``split_path``, the ``split.json`` it wrote for this run, else the ``split_file`` it read) go
  into the run's files as ``config.yaml`` and ``split.json``. They are copies, not links: the log
  directory of a ``WandbLogger`` is its ``save_dir``, which later runs share and overwrite;
- at the end of ``test``, the table ``test/metrics`` (metric, value) and, when the module logs
  per-class values named ``test/<metric>_class<k>`` (segmentation ``iou_class<k>``) or, with the
  DataModule's ``class_names``, detection's ``test/ap_<name>`` and ``test/segm_ap_<name>``
  (``lightning_modules.core.class_keys``), the table ``test/per_class`` with one row per class (named from
  ``class_names`` when the DataModule has them).

``train.py`` adds it to every run; with a plain ``Trainer``, pass ``callbacks=[WandbRun()]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from lightning_modules.core.atomic import write_text_atomically
from lightning_modules.core.class_keys import class_keys

PER_CLASS = re.compile(r"^(?P<metric>.+?)_?class(?P<label>\d+)$")
# Detection's per-class AP under the category's key; overall detection metrics start with map/mar instead.
NAMED_PER_CLASS = re.compile(r"^(?P<metric>(?:segm_)?ap)_(?P<key>\w+)$")


def wandb_logger(trainer: Trainer) -> WandbLogger | None:
    """The trainer's first ``WandbLogger``, or ``None``."""
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


def metric_tables(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None,
                       prefix: str = "test/") -> dict[str, tuple[list[str], list[list[Any]]]]:
    """``{table key: (columns, rows)}`` from logged metrics: every ``prefix`` metric, per-class ones apart.

    ``test/metrics`` has a row ``[name, value]`` per metric that is not per-class; ``test/per_class``
    (only when there are per-class metrics) has a row per class label: ``[label, (name,) values...]``,
    ``None`` where a metric has no value for that class (e.g. no such objects in the test set).
    """
    overall: list[list[Any]] = []
    per_class: dict[int, dict[str, float]] = {}
    label_of_key = {k: label for label, k in enumerate(class_keys(class_names))} if class_names is not None else {}
    for key in sorted(k for k in metrics if k.startswith(prefix)):
        name, value = key[len(prefix):], float(metrics[key])
        match, named = PER_CLASS.match(name), NAMED_PER_CLASS.match(name)
        if named and named["key"] in label_of_key:
            per_class.setdefault(label_of_key[named["key"]], {})[named["metric"]] = value
        elif match:
            per_class.setdefault(int(match["label"]), {})[match["metric"]] = value
        else:
            overall.append([name, value])
    tables = {f"{prefix}metrics": (["metric", "value"], overall)}
    if per_class:
        names = sorted({metric for values in per_class.values() for metric in values})
        named = class_names is not None
        columns = ["class", *(["name"] if named else []), *names]
        rows = [[label, *([_class_name(class_names, label)] if named else []),
                 *(per_class[label].get(metric) for metric in names)] for label in sorted(per_class)]
        tables[f"{prefix}per_class"] = (columns, rows)
    return tables


def _class_name(class_names: Sequence[str], label: int) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


class WandbRun(Callback):
    """Saves the CLI config and the split file with a W&B run, and logs the test metrics as tables.

    Example::

        trainer = Trainer(logger=WandbLogger(project="labelwise", offline=True), callbacks=[WandbRun()])
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        run = logger.experiment
        config = _cli_config(trainer)
        if config is not None:
            logger.log_hyperparams({"cli": yaml.safe_load(config)})
            _save_to_run(run, "config.yaml", config)
        split = _split_file(trainer.datamodule)
        if split is not None:
            _save_to_run(run, "split.json", split.read_text())

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        class_names = getattr(trainer.datamodule, "class_names", None)
        for key, (columns, rows) in metric_tables(trainer.callback_metrics, class_names).items():
            logger.log_table(key, columns=columns, data=rows, step=trainer.global_step)


def _cli_config(trainer: Trainer) -> str | None:
    """The LightningCLI's resolved config as YAML, as its ``SaveConfigCallback`` writes it; ``None`` outside the CLI."""
    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
    return None if saver is None else saver.parser.dump(saver.config, skip_none=False)


def _split_file(datamodule: Any) -> Path | None:
    for name in ("split_path", "split_file"):  # the split this run wrote, else the one it was given
        path = getattr(datamodule, name, None)
        if path:
            return Path(path)
    return None


def _save_to_run(run: Any, name: str, text: str) -> None:
    """Write ``text`` into the run's files folder and register it for upload (now, or at ``wandb sync``)."""
    path = write_text_atomically(Path(run.dir) / name, text)
    run.save(str(path), base_path=run.dir, policy="now")

"""What ``--ckpt_path`` means in ``train.py``, checked before Lightning reads the file.

* ``last`` is the ``last.ckpt`` of this config's newest run: in the checkpoint folder of the highest
  ``version_N`` under the logger's folder (``<default_root_dir>/lightning_logs/version_N/checkpoints``
  with the default logger), in a checkpoint callback's ``dirpath``, or in
  ``<default_root_dir>/checkpoints`` without a logger. Lightning looks only in the new run's own
  folder, so it never found one, warned "No checkpoint will be loaded" and trained from step 0;
  here no ``last.ckpt`` is an error. A resumed ``fit`` logs into the version folder it resumes
  (:func:`logger_in_version`, the first logger's of a list; :func:`keep_csv_metrics` keeps the CSV
  rows written before).
* A path must be a Lightning checkpoint of the class the config builds. LightningCLI builds the
  checkpoint's class from its hyper-parameters in place of the config's model, without a word, and
  a file that is not a checkpoint failed with torch's advice to load it with ``weights_only=False``; it is
  read here as every checkpoint is (:mod:`lightning_modules.core.checkpoint_loading`).
* A resumed ``fit`` must ask for the checkpoint's model arguments: LightningCLI replaces the config's by the
  checkpoint's, so ``--model.lr 0.01`` on a resume trained on at the old rate without a word. A difference is
  an error naming each argument (arguments the CLI links from the data are left out); ``test`` and ``predict``
  evaluate the checkpoint's model as it was trained and are not compared.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_modules.core.checkpoint_loading import read_checkpoint, refuse_trusting_load

LAST = "last"
VERSION = re.compile(r"^version_(\d+)$")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _first_logger(logger: Any) -> Any:
    return (logger[0] if logger else False) if isinstance(logger, list) else logger


def _versioned_logger(logger: Any) -> bool:
    """Whether the logger is one whose ``version`` places its folder (the default, CSV, TensorBoard)."""
    if logger is None or logger is True:
        return True
    return logger is not False and issubclass(_import(logger.class_path), (CSVLogger, TensorBoardLogger))


def last_checkpoint_candidates(trainer: Any, cwd: Path) -> tuple[list[tuple[Path, str | None]], str]:
    """``(path of last.ckpt, version folder name or None)`` for each place this config's runs keep
    one, newest run first, and a description of where they were looked for."""
    root = Path(trainer.default_root_dir or cwd)
    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
    fixed = [Path(cb.init_args.dirpath) / "last.ckpt" for cb in callbacks
             if getattr(cb, "class_path", None) and issubclass(_import(cb.class_path), ModelCheckpoint)
             and getattr(cb.init_args, "dirpath", None) and getattr(cb.init_args, "save_last", None)]
    if fixed:
        return [(path, None) for path in fixed if path.is_file()], " or ".join(map(str, fixed))
    logger = _first_logger(trainer.logger)
    if logger is False:
        path = root / "checkpoints" / "last.ckpt"
        return ([(path, None)] if path.is_file() else []), str(path)
    if logger is None or logger is True:
        folder = root / "lightning_logs"
    else:
        args = logger.init_args
        save_dir = getattr(args, "save_dir", None) or root
        name = getattr(args, "name", None) if _versioned_logger(logger) else getattr(args, "project", None)
        folder = Path(save_dir) / (name or "")
        version = getattr(args, "version", None) if _versioned_logger(logger) else None
        if version is not None:
            version = version if isinstance(version, str) else f"version_{version}"
            path = folder / version / "checkpoints" / "last.ckpt"
            return ([(path, version)] if path.is_file() else []), str(path)
    runs = [(path, path.parent.parent.name) for path in folder.glob("*/checkpoints/last.ckpt")]
    if runs and all(VERSION.match(version) for _, version in runs):
        runs.sort(key=lambda run: int(VERSION.match(run[1])[1]), reverse=True)
    else:  # run ids that are not numbered (W&B): the newest file
        runs.sort(key=lambda run: run[0].stat().st_mtime, reverse=True)
    return runs, str(folder / "*" / "checkpoints" / "last.ckpt")


def logger_in_version(trainer: Any, version: str, cwd: Path) -> dict | list | None:
    """The ``trainer.logger`` config that logs into the run folder ``version`` (the default logger made
    explicit: TensorBoard when installed, else CSV, as Lightning chooses), or ``None`` for loggers
    whose runs are not numbered folders (W&B: the resumed run is a new run of theirs). Of a list of
    loggers only the first continues its run: it places the checkpoints and ``log_dir``; the others
    start a new run of theirs, as their numbers need not match the first one's."""
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    logger = loggers[0]
    if not _versioned_logger(logger):
        return None
    if logger is None or logger is True:
        tensorboard = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
        class_path = "lightning.pytorch.loggers." + ("TensorBoardLogger" if tensorboard else "CSVLogger")
        continued = {"class_path": class_path, "init_args": {"save_dir": str(trainer.default_root_dir or cwd)}}
    else:
        continued = logger.as_dict()  # all of it, TensorBoard's extra keyword arguments too
    continued["init_args"]["version"] = version
    if not isinstance(trainer.logger, list):
        return continued
    return [continued, *(other.as_dict() for other in loggers[1:])]


def keep_csv_metrics(logger: Any) -> None:
    """Continue a version folder's ``metrics.csv`` instead of losing it: Lightning's CSV writer deletes
    the file when it starts in a folder that is not empty. Call on rank 0 before the logger logs."""
    if not isinstance(logger, CSVLogger):
        return
    metrics = Path(logger.log_dir) / "metrics.csv"
    if not metrics.is_file():
        return
    kept = metrics.with_name(".metrics.csv.resumed")
    os.replace(metrics, kept)
    try:
        writer = logger.experiment  # the writer starts here, without a metrics.csv to delete
    finally:
        os.replace(kept, metrics)
    with open(metrics, newline="") as file:
        header = file.readline().strip()
    writer.metrics_keys = sorted(header.split(",")) if header else []  # appends under the same columns


def resolve_ckpt_path(config: Any, subcommand: str, cwd: Path, linked: tuple[str, ...] = ()) -> tuple[str, dict] | None:
    """Check a subcommand's ``ckpt_path`` and put the file in place of ``last``; raises ``ValueError``
    naming the problem. For a ``fit`` from ``last`` returns ``(version, logger config)`` that continues
    the run's own folder, else ``None``. ``linked``: model arguments the CLI sets from the data at
    instantiation (the parsed config holds their defaults), left out of the resume's comparison."""
    ckpt_path = config.get("ckpt_path")
    if not isinstance(ckpt_path, str):
        return None
    refuse_trusting_load(config.get("weights_only"))
    resumed = None
    if ckpt_path == LAST:
        runs, where = last_checkpoint_candidates(config.trainer, cwd)
        if not runs:
            hint = "drop --ckpt_path to start one" if subcommand == "fit" else "train one, or pass a checkpoint path"
            raise ValueError(f"--ckpt_path last: no {where}; this config has no run to continue or evaluate: {hint}")
        (path, version) = runs[0]
        config.ckpt_path = ckpt_path = str(path)
        logger = logger_in_version(config.trainer, version, cwd) if subcommand == "fit" and version else None
        resumed = (version, logger) if logger is not None else None
    if ckpt_path in ("best", "hpc") or "://" in ckpt_path or ckpt_path.startswith("registry:"):
        return None  # Lightning's own names and remote files
    model_args = _plain(config.model.get("init_args")) if subcommand == "fit" else None  # a resume continues it
    model_args = {k: v for k, v in model_args.items() if k not in linked} if model_args else None
    problem = checkpoint_problem(ckpt_path, config.model.class_path, model_args)
    if problem:
        raise ValueError(problem)
    return resumed


def checkpoint_problem(path: str, model_class_path: str | None, model_args: dict | None = None) -> str | None:
    """Why ``path`` cannot be used as ``--ckpt_path`` with a model of ``model_class_path`` (and, for a resumed
    ``fit``, the config's ``model_args``), or ``None``."""
    file = Path(path)
    if not file.exists():
        return f"--ckpt_path {path} does not exist: pass a checkpoint file, or 'last' for the newest run of this config"
    if file.is_dir():
        return None  # a sharded checkpoint (DeepSpeed, FSDP): Lightning's strategy reads it
    try:  # mmap: the structure only, not the tensors; decoded under the one policy (core.checkpoint_loading)
        checkpoint = read_checkpoint(path, "--ckpt_path", mmap=True)
    except ValueError as error:
        return str(error)
    hparams = _plain(checkpoint.get("hyper_parameters") or {})
    saved = hparams.get("_class_path")
    if saved and model_class_path and not _same_class(saved, model_class_path):
        return (f"--ckpt_path {path} holds a {saved} but the config builds a {model_class_path}: LightningCLI "
                f"would silently build a {saved.rpartition('.')[2]} instead. Pass a checkpoint of a "
                f"{model_class_path.rpartition('.')[2]} run, or the config (or --model) of the run that wrote it")
    changed = [f"{name} {hparams[name]!r} in the checkpoint, {model_args[name]!r} here"
               for name in sorted(hparams.keys() & (model_args or {}).keys()) if hparams[name] != model_args[name]]
    if changed:  # LightningCLI replaces the config's model arguments by the checkpoint's, without a word
        return (f"--ckpt_path {path}: a resumed fit continues the checkpoint's model, whose arguments differ from "
                f"this config's ({'; '.join(changed)}); LightningCLI would train on with the checkpoint's values "
                f"and ignore these. Resume with the arguments the run was started with (its run folder's "
                f"config.yaml), or start a new fit without --ckpt_path to train with the new ones")
    return None


def _plain(value: Any) -> Any:
    """``value`` as plain dicts and lists (a parsed config's namespaces and tuples), for comparing arguments."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _same_class(a: str, b: str) -> bool:
    try:
        return _import(a) is _import(b)
    except (ImportError, AttributeError, ValueError):
        return a == b

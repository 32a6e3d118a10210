"""What ``train.py`` prints besides Lightning's own output: no vendor tips, and one summary line per run.

:func:`quiet_lightning_noise` drops, precisely, three messages Lightning 2.6 prints before every run
that say nothing about the run: its tips advertising ``litlogger`` and ``litmodels``; its advice to
install TensorBoard (CSV is our documented default, TensorBoard the ``tensorboard`` extra); and the
``FutureWarning`` torch 2.14 raises for Lightning's own ``LeafSpec()`` in
``lightning/pytorch/utilities/_pytree.py`` (not our code to fix). Other warnings stay.

:func:`summary_line` is the last line of a ``fit``, ``validate`` or ``test``: the headline metric,
which weights it was measured on (the EMA copy or the raw weights), the run folder and the checkpoint::

    fit: test/acc 0.8935 on the EMA weights (decay 0.99, 1000 updates) | run folder runs/quickstart/
    lightning_logs/version_0 | checkpoint runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.ema_callback import EMA

#: the headline metric of each task, in the order they are looked for (accuracy, multi-label F1, mIoU, mAP)
HEADLINE_METRICS = ("acc", "macro_f1", "miou", "map")
_TIP = "💡 Tip:"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)


def quiet_lightning_noise() -> None:
    """Silence Lightning's tips, its TensorBoard advice and its ``LeafSpec`` FutureWarning (see above)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def headline_metric(metrics: dict[str, Any], stage: str) -> tuple[str, float] | None:
    """``(name, value)`` of the stage's headline metric (``test/acc``, ``val/miou``, ...), or ``None``."""
    for name in HEADLINE_METRICS:
        if f"{stage}/{name}" in metrics:
            return f"{stage}/{name}", float(metrics[f"{stage}/{name}"])
    others = sorted(key for key in metrics if key.startswith(f"{stage}/") and not key.endswith("loss"))
    return (others[0], float(metrics[others[0]])) if others else None


def evaluation_weights(trainer: Any, model: Any) -> str:
    """The weights validation and test ran on, in words: an active EMA callback's, else the module's own."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and callback.evaluate_with_ema and callback.ema is not None \
                and callback.ema.num_updates > 0:
            return f"EMA weights (the EMA callback, decay {callback.decay}, {callback.ema.num_updates} updates)"
    return getattr(model, "evaluation_weights", "raw weights")


def checkpoint_of(trainer: Any, stage: str) -> str:
    """The checkpoint a ``test``/``validate`` read, or the one a ``fit`` wrote."""
    if stage != "fit":
        return str(trainer.ckpt_path) if trainer.ckpt_path else "none (the weights in memory)"
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    for callback in callbacks:
        if callback.last_model_path or callback.best_model_path:
            return callback.last_model_path or callback.best_model_path
    return "none written (checkpointing is off)" if not callbacks else "none written yet"


def run_folder_of(trainer: Any) -> str:
    """The first logger's run folder, as ``trainer.log_dir`` finds it but without its broadcast: the
    summary is printed by rank 0 alone, and a collective there would wait for ranks that have left."""
    logger = trainer.loggers[0] if trainer.loggers else None
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return str(folder or trainer.default_root_dir)


def summary_line(trainer: Any, model: Any, stage: str) -> str:
    """One line: headline metric and the weights it was measured on, run folder, checkpoint."""
    metrics = trainer.callback_metrics
    evaluated = "val" if stage == "validate" else "test"
    found = headline_metric(metrics, evaluated) or (headline_metric(metrics, "val") if stage == "fit" else None)
    if found is None:
        result = "no test or validation metric (both were off)"
    else:
        result = f"{found[0]} {found[1]:.4f} on the {evaluation_weights(trainer, model)}"
    stopped = " (stopped early)" if stage == "fit" and trainer.interrupted else ""
    run_folder = run_folder_of(trainer)
    return f"{stage}{stopped}: {result} | run folder {run_folder} | checkpoint {checkpoint_of(trainer, stage)}"

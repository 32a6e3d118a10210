"""Callbacks any labelwise method can use, selectable by class name (``--trainer.callbacks+=EMA``).

The greedy soup is a tool, not a callback: :mod:`lightning_modules.fusion.soup` (``labelwise soup``).
"""

from callbacks.adversarial import FGM, PGD
from callbacks.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from lightning_modules.core.batch_norm_estimation import recompute_batch_norm
from lightning_modules.core.ema import EMAModel, lerp_grouped
from callbacks.ema_callback import EMA, ema_weights_from_checkpoint
from callbacks.prediction_writer import PredictionWriter, use_prediction_writer
from callbacks.resumable_checkpoint import ResumableCheckpoint, StoppedBySignal
from callbacks.swa import SWA
from callbacks.wandb_run import WandbRun

__all__ = [
    "EMA", "SWA", "FGM", "PGD", "WandbRun", "PredictionWriter", "AtomicCheckpointIO", "use_atomic_checkpoints",
    "use_prediction_writer", "ResumableCheckpoint", "StoppedBySignal",
    "EMAModel", "lerp_grouped", "ema_weights_from_checkpoint", "recompute_batch_norm",
]

"""State helpers shared by the adaptive-threshold successors of FixMatch (FlexMatch, FreeMatch, SoftMatch).

These methods keep running statistics of the model's unlabeled predictions: a per-sample memory
(FlexMatch) or exponential moving averages (FreeMatch, SoftMatch). Where that state lives, and how
it stays the same on every process, is decided here once:

* **Proposed in the loss, committed after the optimizer step** (:mod:`lightning_modules.core.step_state`).
  The loss reads the committed buffers and computes what it needs from them and the batch with pure
  functions (:func:`ema_step` below); it proposes its observation, and the method's update, called
  once per optimizer step, is the only code that writes. FGM's and PGD's extra passes propose nothing.
* **Registered buffers.** The state is registered on the LightningModule with ``register_buffer``,
  so it moves with the module's device and is saved in, and restored from, the checkpoint's
  ``state_dict`` without any extra hook.
* **Identical updates on every rank.** Under DDP with ``broadcast_buffers=True`` Lightning's
  wrapper overwrites every buffer from rank 0 on each forward. That is harmless only if all ranks
  already hold the same values, so every update is computed from the batch gathered across ranks
  (:func:`gather_rows`, a no-op in one process) and applied identically everywhere: in the loss
  where the loss needs every rank's batch (FreeMatch, SoftMatch), else in the update (FlexMatch).
  A per-rank update (USB's FlexMatch) would silently discard every rank's statistics but rank 0's.
* **No gradient.** Updates run under ``torch.no_grad`` on detached probabilities.
"""

from __future__ import annotations

import torch
from lightning import LightningModule


def gather_rows(module: LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (rows = samples) from every rank, concatenated along dimension 0.

    Returns ``tensor`` itself without a Trainer or in a single process. All ranks must pass the
    same shape (the training loaders drop the last incomplete batch, so they do).
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size == 1:
        return tensor
    return module.all_gather(tensor).flatten(0, 1)


@torch.no_grad()
def ema_step(state: torch.Tensor, value: torch.Tensor, momentum: float) -> torch.Tensor:
    """``momentum * state + (1 - momentum) * value``, as a new tensor."""
    return state.mul(momentum).add(value.to(state.dtype), alpha=1.0 - momentum)


def class_histogram(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fraction of ``labels`` in each class (all zeros for an empty tensor)."""
    counts = torch.bincount(labels.reshape(-1), minlength=num_classes).to(dtype)
    return counts / counts.sum().clamp_min(1)


def self_adaptive_thresholds(tau: torch.Tensor, class_model: torch.Tensor) -> torch.Tensor:
    """FreeMatch's per-class thresholds ``tau_t(c) = p~_t(c) / max_c' p~_t(c') * tau_t`` over the last dimension of
    ``class_model`` (``(C,)``, or ``(H, C)`` with one ``tau`` per row, ``(H,)``)."""
    return class_model / class_model.max(dim=-1, keepdim=True).values * tau[..., None]


def flexible_thresholds(memory: torch.Tensor, num_classes: int, threshold: float, warmup: bool) -> torch.Tensor:
    """FlexMatch's per-class thresholds ``T_c = M(beta_c) * tau`` (``M(x) = x / (2 - x)``), shape ``(C,)``, from a
    per-sample ``memory`` holding a class (``>= 0``), ``-1`` (unused) or ``-2`` (outside the unlabeled set):
    ``beta_c = sigma_c / max(max_c' sigma_c', N_unused)`` with warm-up, else ``/ max_c' sigma_c'``."""
    used = memory[memory >= 0]
    sigma = torch.bincount(used, minlength=num_classes)[:num_classes].float()
    norm = sigma.max()
    if warmup:
        norm = torch.maximum(norm, (memory == -1).sum().float())
    beta = sigma / norm.clamp_min(1)
    return beta / (2.0 - beta) * threshold


@torch.no_grad()
def write_last_(memory: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``memory[index] = values`` where an index seen twice keeps its *last* value, deterministically.

    Plain advanced-index assignment with repeated indices leaves the winner unspecified (and it
    may differ between GPUs), which would let the ranks' memories drift apart.
    """
    if index.numel() == 0:
        return
    index, order = torch.sort(index, stable=True)
    values = values[order]
    last = torch.ones_like(index, dtype=torch.bool)
    last[:-1] = index[1:] != index[:-1]
    memory[index[last]] = values[last].to(memory.dtype)

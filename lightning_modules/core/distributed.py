"""Keeping module state equal on every DDP rank where DDP itself does not.

DDP keeps the *parameters* equal (same start, all-reduced gradients), but each rank updates the
BatchNorm running statistics from its own batch; DDP only overwrites them with rank 0's at the
next forward. The EMA copy, which copies those buffers after every step, and every rank's
evaluation would then hold different statistics. :func:`average_batchnorm_statistics` replaces
them by their mean over the ranks after each optimizer step: one all-reduce of the (small)
statistics, after which all ranks agree, and the statistics reflect every rank's batch instead
of rank 0's only. With equal batches per rank the running mean equals that of one process on
the global batch; the running variance lacks the between-rank spread of the means
(``SyncBatchNorm`` computes both over the global batch, and is left alone here).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_statistics(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Running means and variances of the non-synchronized BatchNorm layers in ``modules``."""
    stats = []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _BatchNorm) and not isinstance(layer, nn.SyncBatchNorm) and layer.track_running_stats:
                stats += [b for b in (layer.running_mean, layer.running_var) if b is not None]
    return stats


@torch.no_grad()
def average_batchnorm_statistics(modules: Iterable[nn.Module]) -> None:
    """Replace the BatchNorm running statistics of ``modules`` by their mean over all ranks.

    A no-op without an initialized process group of two or more ranks. Every rank must call it at
    the same point (it is a collective).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    stats = batchnorm_statistics(modules)
    if not stats:
        return
    # all_reduce without Lightning's reduce, which adds a barrier (a host sync per step on NCCL)
    flat = torch.cat([s.reshape(-1).float() for s in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for s, mean in zip(stats, flat.split([s.numel() for s in stats])):
        s.copy_(mean.view_as(s))


def check_full_parameters(strategy, owner: str) -> None:
    """Refuse strategies that shard parameters (FSDP, DeepSpeed ZeRO stage 3, ModelParallel) for a
    module with an EMA copy: the copy holds whole tensors and is updated from the module's
    parameters, which such strategies keep as per-rank shards outside forward and backward."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or (
        isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3)
    if sharded:
        raise ValueError(
            f"{owner} keeps an EMA copy of its network (ema_decay), which cannot follow the parameter shards of "
            f"{type(strategy).__name__}: use strategy 'ddp' (or DeepSpeed ZeRO stage 1/2), or set model.ema_decay "
            f"to null for a method that does not need its EMA (see docs/cluster.md)")

"""BatchNorm re-estimation after weights were averaged (SWA, model soups).

Averaged weights need running statistics of their own: the pass below resets them and re-estimates
them as an exact mean over training batches, like :func:`torch.optim.swa_utils.update_bn`, but for
labelwise's dict batches.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn


def default_bn_inputs(batch: Any) -> list[torch.Tensor]:
    """Images of a labelwise training batch that BatchNorm should see: the labeled images and every
    unlabeled image view; an evaluation-style ``{"image": ...}`` batch or a bare tensor also works."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [batch[0]]
    if "labeled" in batch:
        inputs = [batch["labeled"]["image"]]
        for name, value in (batch.get("unlabeled") or {}).items():
            if name not in ("index", "target") and isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs.append(value)
        return inputs
    return [batch["image"]]


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(
    module: nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    transform: Any = None,
    inputs_fn: Any = default_bn_inputs,
    num_batches: int | None = None,
    reduce: Any = None,
) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the exact mean over batches.

    Like :func:`torch.optim.swa_utils.update_bn` (``momentum=None``, a cumulative average), but for
    labelwise's dict batches: each batch is moved to ``device``, passed through ``transform``
    (the DataModule's ``on_after_batch_transfer``, which makes images float and augments them),
    and the tensors ``inputs_fn(batch)`` returns go through ``module`` in one concatenated forward.
    ``reduce(tensor)``, when given, averages the statistics over processes (DDP). Returns the number
    of batches used; 0 means the module has no BatchNorm and nothing was done.
    """
    norms = _batch_norms(module)
    if not norms:
        return 0
    momenta = {bn: bn.momentum for bn in norms}
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = module.training
    module.train()
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            if device is not None:
                batch = move_data_to_device(batch, device)
            if transform is not None:
                batch = transform(batch)
            inputs = inputs_fn(batch)
            if all(x.shape[1:] == inputs[0].shape[1:] for x in inputs):
                module(torch.cat(inputs))
            else:
                for x in inputs:
                    module(x)
            seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        module.train(was_training)
    if seen == 0:
        raise RuntimeError("recompute_batch_norm got no batches; BatchNorm statistics would be left reset")
    if reduce is not None:
        for bn in norms:
            bn.running_mean.copy_(reduce(bn.running_mean))
            bn.running_var.copy_(reduce(bn.running_var))
    return seen


def unwrap_batches(loader: Iterable[Any]) -> Iterable[Any]:
    """Iterating a CombinedLoader yields ``(batch, batch_idx, dataloader_idx)``; keep the batch."""
    from lightning.pytorch.utilities import CombinedLoader

    if isinstance(loader, CombinedLoader):
        for batch, _, _ in loader:
            yield batch
    else:
        yield from loader

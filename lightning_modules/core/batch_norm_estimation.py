"""BatchNorm re-estimation after weights were averaged (the ``SWA`` callback, model soups).

Averaged weights need running statistics of their own: the pass below resets them and re-estimates
them as an exact mean over training batches, like :func:`torch.optim.swa_utils.update_bn`, but for
labelwise's dict batches. In core because a callback (``SWA``) and a tool (the soup,
:mod:`lightning_modules.fusion`) both use it, and neither may import the other.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_modules.core.batch import training_images


def default_bn_inputs(batch: Any) -> list[torch.Tensor]:
    """Images of a labelwise training batch that BatchNorm should see: the labeled images and every
    unlabeled view (:func:`lightning_modules.core.batch.training_images`); an evaluation-style
    ``{"image": ...}`` batch or a bare tensor also works."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [batch[0]]
    if "labeled" in batch:
        return training_images(batch)
    return [batch["image"]]


def _batch_norms(module: nn.Module) -> dict[nn.modules.batchnorm._BatchNorm, str]:
    return {m: name for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def forward_inputs(module: nn.Module, inputs: list[torch.Tensor]) -> None:
    """One concatenated forward when the inputs share a shape (BatchNorm sees the step's whole batch)."""
    if all(x.shape[1:] == inputs[0].shape[1:] for x in inputs):
        module(torch.cat(inputs))
    else:
        for x in inputs:
            module(x)


@torch.no_grad()
def recompute_batch_norm(
    module: nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    transform: Any = None,
    inputs_fn: Any = default_bn_inputs,
    num_batches: int | None = None,
    reduce: Any = None,
    forward: Callable[[nn.Module, list[torch.Tensor]], Any] = forward_inputs,
) -> int:
    """Re-estimate the running statistics of the BatchNorm layers the forward updates, as the exact
    mean over batches; every other layer keeps its statistics.

    Like :func:`torch.optim.swa_utils.update_bn` (``momentum=None``, a cumulative average), but for
    labelwise's dict batches: each batch is moved to ``device``, passed through ``transform``
    (the DataModule's ``on_after_batch_transfer``, which makes images float and augments them),
    and ``forward(module, inputs_fn(batch))`` runs ``module`` in train mode (by default one
    concatenated forward). A layer is reset when the forward first reaches it in train mode, so a
    submodule the forward never runs (MutualLearning's other peers) or runs in eval mode
    (KDStudent's frozen teacher) keeps its statistics; ``update_bn`` resets every layer of the
    module it is given, which is right only when the forward runs them all. Trainable (train-mode)
    layers left out are named in a warning. ``reduce(tensor)``, when given, averages the statistics
    over processes (DDP). If anything fails, every statistic is put back as it was. Returns the
    number of batches used; 0 means the module has no BatchNorm and nothing was done.
    """
    norms = _batch_norms(module)
    if not norms:
        return 0
    saved: dict[nn.modules.batchnorm._BatchNorm, tuple[Any, list[torch.Tensor]]] = {}

    def reset_when_first_reached(bn: nn.modules.batchnorm._BatchNorm, args: Any) -> None:
        if bn.training and bn not in saved:
            saved[bn] = (bn.momentum, [t.clone() for t in _statistics(bn)])
            bn.reset_running_stats()
            bn.momentum = None

    hooks = [bn.register_forward_pre_hook(reset_when_first_reached) for bn in norms]
    was_training = module.training
    module.train()
    left_out = [name for bn, name in norms.items() if bn.training]
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            if device is not None:
                batch = move_data_to_device(batch, device)
            if transform is not None:
                batch = transform(batch)
            forward(module, inputs_fn(batch))
            seen += 1
        if seen == 0:
            raise RuntimeError("recompute_batch_norm got no batches: give it a non-empty training loader")
        if reduce is not None:
            _reduce(norms, saved, reduce)
    except BaseException:
        for bn, (_, statistics) in saved.items():
            for t, old in zip(_statistics(bn), statistics):
                t.copy_(old)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for bn, (momentum, _) in saved.items():
            bn.momentum = momentum
        module.train(was_training)
    left_out = [name for name in left_out if name not in {norms[bn] for bn in saved}]
    if left_out:
        rank_zero_warn(f"BatchNorm re-estimation: {len(left_out)} train-mode layers are not run by the forward "
                       f"and keep their statistics from training ({', '.join(left_out[:4])}"
                       f"{', ...' if len(left_out) > 4 else ''}); if their weights were averaged, run them in "
                       "the pass too (a `forward` argument, or override SWA.bn_forward)")
    return seen


def _statistics(bn: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
    return [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def _reduce(norms: dict[nn.modules.batchnorm._BatchNorm, str], reached: dict, reduce: Any) -> None:
    """Average the re-estimated statistics over processes. Every process must have reached the same
    layers, or the collectives would not pair up: a flag per layer is averaged first to check."""
    device = next(iter(norms)).running_mean.device
    flags = reduce(torch.tensor([float(bn in reached) for bn in norms], device=device))
    partial = [name for (bn, name), flag in zip(norms.items(), flags.tolist()) if 0.0 < flag < 1.0]
    if partial:
        raise RuntimeError(f"BatchNorm re-estimation: the forward reached {', '.join(partial[:4])} on some "
                           "processes only; make every process run the same layers")
    for bn in norms:  # module order, the same on every process (the order reached may not be)
        if bn in reached:
            bn.running_mean.copy_(reduce(bn.running_mean))
            bn.running_var.copy_(reduce(bn.running_var))


def unwrap_batches(loader: Iterable[Any]) -> Iterable[Any]:
    """Iterating a CombinedLoader yields ``(batch, batch_idx, dataloader_idx)``; keep the batch."""
    from lightning.pytorch.utilities import CombinedLoader

    if isinstance(loader, CombinedLoader):
        for batch, _, _ in loader:
            yield batch
    else:
        yield from loader

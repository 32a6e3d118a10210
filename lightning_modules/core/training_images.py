"""Every training image once, unaugmented, for a method that looks at the whole training set between steps.

Label propagation (``lightning_modules/ssl/label_propagation.py``) embeds all labeled and unlabeled
training images at the start of an epoch. No method reads a DataModule (docs/design.md, "Model-data
contract"), so this core helper asks the DataModule for them through its public ``training_images()``
(``{"labeled": Dataset, "unlabeled": Dataset}`` of whole images with ``index`` and ``target``; the
classification DataModules have it) and serves them as evaluation batches on the module's device, made
floats by the DataModule's own ``on_after_batch_transfer`` as validation batches are.

Under DDP each rank takes every ``world_size``-th item, the shards padded to one length by repeating
items (``self.all_gather`` needs equal shapes); a consumer that writes by ``index`` sees a repeat as the
same row twice. The passes draw nothing from the run's random generators: a DataLoader draws a seed when
it starts, so the pass runs inside ``torch.random.fork_rng`` and a resumed run stays exact.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from lightning import LightningModule
from torch.utils.data import Subset


def training_image_batches(module: LightningModule) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(part, batch)`` over this rank's share of the ``labeled`` then the ``unlabeled`` training images."""
    trainer = module.trainer
    datamodule = trainer.datamodule
    parts = getattr(datamodule, "training_images", None)
    if parts is None:
        raise ValueError(f"{type(module).__name__} embeds every training image each epoch and needs a DataModule with "
                         f"training_images() (every classification DataModule of labelwise has it); got "
                         f"{type(datamodule).__name__ if datamodule is not None else 'no DataModule'}")
    world, rank = trainer.world_size, trainer.global_rank
    for part, dataset in parts().items():
        n = len(dataset)
        if n == 0:
            continue
        positions = [(rank + world * i) % n for i in range(math.ceil(n / world))]
        for batch in datamodule.loader(Subset(dataset, positions)):
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            yield part, datamodule.on_after_batch_transfer(batch, 0)


def rng_devices(module: LightningModule) -> list[int]:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must keep for ``module``."""
    return [module.device.index or 0] if module.device.type == "cuda" else []


def without_random_draws(module: LightningModule) -> Any:
    """A context in which the run's CPU (and the module's CUDA) random generators are left as they were."""
    return torch.random.fork_rng(devices=rng_devices(module))

"""LightningCLI's ``--optimizer`` and ``--lr_scheduler`` for modules with their own optimizer recipe.

LightningCLI replaces a module's ``configure_optimizers`` with the optimizer it is given, built over
``model.parameters()`` as one group, and the given scheduler or none: ``--optimizer Adam`` dropped the
method's weight-decay groups and its per-step cosine schedule without a word, and ``--lr_scheduler``
without ``--optimizer`` was ignored. For a module that offers ``parameter_groups()``, ``build_optimizer()``
and ``lr_schedule(optimizer)`` (every method here), :func:`use_optimizer_options` instead builds

* the given optimizer class over the module's parameter groups: its ``weight_decay`` argument applies
  to weights, never to biases and norm weights (``--optimizer AdamW --optimizer.weight_decay 0.05``);
  the module's own ``lr``, ``momentum``, ``nesterov`` and ``weight_decay`` are then not used;
* the given scheduler on it, stepped as LightningCLI steps it (every epoch; ``ReduceLROnPlateau``
  with its monitor), or else the method's own schedule (warm-up and the 7/16-cosine, every step);
* with ``--lr_scheduler`` alone, the method's own optimizer under the given scheduler.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from lightning.pytorch.cli import LightningCLI, instantiate_class
from lightning.pytorch.utilities.rank_zero import rank_zero_info

#: LightningCLI's warning when it replaces ``configure_optimizers``; untrue once the module's recipe is kept
OVERRIDE_WARNING = "configure_optimizers` will be overridden by"
RECIPE = ("parameter_groups", "build_optimizer", "lr_schedule")


def has_optimizer_recipe(model: Any) -> bool:
    return all(callable(getattr(model, name, None)) for name in RECIPE)


def _name(init: Any) -> str:
    return str(init["class_path"]).rpartition(".")[2]


def use_optimizer_options(model: Any, optimizer_init: Any, scheduler_init: Any) -> bool:
    """Give ``model`` a ``configure_optimizers`` built from the CLI's optimizer and scheduler options (either
    may be ``None``) on its parameter groups and schedule. Returns whether it did (``False`` for a module
    without the recipe, which keeps LightningCLI's behaviour)."""
    if not (optimizer_init or scheduler_init) or not has_optimizer_recipe(model):
        return False

    def configure_optimizers(module: Any) -> Any:
        if optimizer_init:
            optimizer = instantiate_class(module.parameter_groups(), optimizer_init)
        else:
            optimizer = module.build_optimizer()
        if not scheduler_init:
            return {"optimizer": optimizer, "lr_scheduler": module.lr_schedule(optimizer)}
        return LightningCLI.configure_optimizers(module, optimizer, instantiate_class(optimizer, scheduler_init))

    model.configure_optimizers = MethodType(configure_optimizers, model)
    optimizer = (f"--optimizer {_name(optimizer_init)} over {type(model).__name__}'s parameter groups (its weight "
                 "decay on weights, none on biases and norm weights)" if optimizer_init else
                 f"{type(model).__name__}'s own optimizer")
    schedule = (f"--lr_scheduler {_name(scheduler_init)}" if scheduler_init else
                f"{type(model).__name__}'s own schedule (warm-up, then the cosine, every step)")
    rank_zero_info(f"Optimizer: {optimizer}; learning-rate schedule: {schedule}.")
    return True

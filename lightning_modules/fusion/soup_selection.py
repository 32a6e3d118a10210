"""The greedy soup chosen by ``Trainer.validate`` on held-out validation images, and its report.

:func:`soup_from_checkpoints` scores every candidate of :func:`~lightning_modules.fusion.soup.greedy_soup`
with a LightningModule rebuilt from the first checkpoint; :func:`run_soup` is what ``labelwise soup`` prints
and writes: each ingredient's validation score, the soup's, the soup checkpoint, and the test scores of the
soup and of its best ingredient.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from lightning_modules.core.batch_norm_estimation import recompute_batch_norm, unwrap_batches
from lightning_modules.core.checkpoint_loading import load_module
from lightning_modules.fusion.soup import eval_state_dict, greedy_soup, load_checkpoint, load_ingredients, load_into, \
    save_soup


def _load_module(checkpoint: str, module_class: type | None):
    cls = module_class or L.LightningModule
    # Checkpoints from train.py's LightningCLI carry an ``_instantiator`` in their hparams, so the
    # base class can rebuild the right subclass; other checkpoints need ``module_class``.
    try:
        return load_module(cls, checkpoint)
    except Exception as err:  # noqa: BLE001
        if module_class is None:
            raise ValueError(f"could not rebuild the module of {checkpoint} from its checkpoint alone; "
                             f"pass module_class (--model): {err}") from err
        raise


def soup_from_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    datamodule,
    metric: str = "val/acc",
    update_bn: bool = False,
    module_class: type | None = None,
    higher_is_better: bool = True,
    bn_batches: int | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    select_on_test: bool = False,
):
    """Greedy soup scored by ``Trainer.validate`` on ``datamodule``'s held-out validation images.

    A DataModule that validates on its test set (``validates_on_test_set``) is refused unless
    ``select_on_test`` (the soup's test score is then optimistic); ingredients that trained on
    validation images are refused (:func:`~lightning_modules.fusion.soup.check_held_out`). With
    ``update_bn`` every candidate's BatchNorm statistics are re-estimated on the training data before it
    is scored (and kept in the soup). Returns ``(module, chosen, scores)`` with the soup loaded into ``module``.
    """
    if not checkpoints:
        raise ValueError("soup_from_checkpoints needs at least one checkpoint")
    for p in checkpoints:
        if not Path(p).is_file():
            raise FileNotFoundError(f"soup ingredient {str(p)!r} does not exist")
    datamodule.setup("validate")
    if getattr(datamodule, "validates_on_test_set", False) and not select_on_test:
        raise ValueError(f"{type(datamodule).__name__} validates on its test set, so a soup selected on it would be "
                         f"selected on test data: hold out validation images (val_labeled_per_class for "
                         f"classification, num_val for segmentation and detection, the ingredients' own split_file), "
                         f"or pass select_on_test=True (--select_on_test) to do it knowingly")
    states = load_ingredients(checkpoints, datamodule)
    module = _load_module(str(checkpoints[0]), module_class)
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    kwargs.update(trainer_kwargs or {})
    trainer = L.Trainer(**kwargs)

    def bn_pass(m) -> None:
        datamodule.setup("fit")
        recompute_batch_norm(m, unwrap_batches(datamodule.train_dataloader()), device=m.device,
                             transform=lambda b: datamodule.on_after_batch_transfer(b, 0), num_batches=bn_batches)
        ema = getattr(m, "ema", None)
        if ema is not None and hasattr(ema, "module"):
            ema.module.load_state_dict(m.net.state_dict())

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        load_into(module, state)
        if update_bn:
            bn_pass(module)
            state.update({k: v.detach().clone() for k, v in module.state_dict().items() if k in state})
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        if metric not in results[0]:
            raise KeyError(f"metric {metric!r} not logged by validation; got {sorted(results[0])}")
        return float(results[0][metric])

    soup, chosen, scores = greedy_soup(checkpoints, evaluate, higher_is_better=higher_is_better, states=states)
    load_into(module, soup)
    return module, chosen, scores




def run_soup(checkpoints: Sequence[str | os.PathLike], datamodule: Any, output: str, metric: str = "val/acc",
             higher_is_better: bool = True, update_bn: bool = False, module_class: type | None = None,
             accelerator: str = "cpu", select_on_test: bool = False) -> dict[str, Any]:
    """Soup ``checkpoints`` (:func:`soup_from_checkpoints`), print the selection as a table, write the soup
    to ``output`` (atomically) and print its test score beside its best ingredient's. Returns the chosen
    checkpoints, the validation scores and the test scores."""
    module, chosen, scores = soup_from_checkpoints(
        checkpoints, datamodule, metric=metric, update_bn=update_bn, module_class=module_class,
        higher_is_better=higher_is_better, trainer_kwargs={"accelerator": accelerator}, select_on_test=select_on_test)
    selected_on = "the TEST set (optimistic: --select_on_test)" if datamodule.validates_on_test_set else \
        f"{len(datamodule.held_out_ids())} held-out validation images"
    print(f"\nselected on {selected_on}\n| ingredient | {metric} | in soup |\n|---|---|---|")
    for p in checkpoints:
        print(f"| {p} | {scores[str(p)]:.4f} | {'yes' if str(p) in chosen else 'no'} |")
    print(f"| **soup** ({len(chosen)} of {len(checkpoints)}) | {scores['soup']:.4f} | |")
    save_soup(module, checkpoints, chosen, scores, output)
    print(f"soup written to {output}")
    test_metric = metric.replace("val/", "test/", 1)
    tests = {"soup": score_on_test(module, datamodule, test_metric, accelerator)}
    load_into(module, eval_state_dict(load_checkpoint(chosen[0])))
    tests["best ingredient"] = score_on_test(module, datamodule, test_metric, accelerator)
    print(f"on the test set: {test_metric} soup {tests['soup']:.4f}, best ingredient alone ({chosen[0]}) "
          f"{tests['best ingredient']:.4f}")
    return {"chosen": chosen, "scores": scores, "test": tests}


def score_on_test(module: L.LightningModule, datamodule: Any, metric: str, accelerator: str) -> float:
    """``metric`` of ``module`` on ``datamodule``'s test set."""
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    return float(trainer.test(module, datamodule=datamodule, verbose=False)[0][metric])

"""Greedy model soup (Wortsman et al. 2022): average fine-tuned checkpoints while validation improves.

Ingredients are ranked best-first by their own validation score; the soup starts as the best one
and each next ingredient joins only if the uniform average of the soup's members plus it scores
at least as well as the current soup. The soup is therefore never worse on validation than its
best ingredient.

Ties: a candidate that scores exactly as well as the soup joins it (``>=``), as in the paper's
Algorithm 1; the authors' code (mlfoundations/model-soups ``main.py`` at d5398f1, line 181:
``if held_out_val_accuracy > best_val_acc_so_far``) adds only on a strict gain. Without ties the two
choose the same soup.

The souped weights are the ones the run evaluated with (:func:`eval_state_dict`): the ``EMA``
callback's average (``callbacks.EMA``) when the checkpoint has one, and a labelwise module's own EMA
copy (``checkpoint["ema"]``) for its ``net.`` entries. The soup checkpoint carries the soup in each
of those places.

Validation must be held out: selecting ingredients on the test set (what a DataModule validates on
unless it holds out a fold or ``val_labeled_per_class`` / ``num_val`` images) makes the soup's
test score optimistic, so :func:`~lightning_modules.fusion.soup_selection.soup_from_checkpoints` refuses
it unless ``select_on_test`` is set, and refuses ingredients that trained on any of the validation
images (as their checkpoint, or a ``split.json`` beside it, records what they held out).

Each ingredient file is read once (:func:`load_ingredients`): only the weights it evaluated with are
kept, on the CPU, the rest of the checkpoint (optimizer states) is dropped as soon as it is read.
Checkpoints are read as data, with ``weights_only=True`` (``lightning_modules/core/checkpoint_loading.py``).

This module is the soup of weights; :mod:`~lightning_modules.fusion.soup_selection` chooses one by
``Trainer.validate`` and reports it, and ``labelwise soup`` (``train.py``; ``benchmarks/soup.py``) is its
command line. A tool, not a callback: it runs after training, over finished checkpoints.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lightning_modules.core.atomic import atomic_path
from lightning_modules.core.checkpoint_loading import read_checkpoint
from lightning_modules.core.ema import ema_callback_states

EMA_PREFIX = "net."


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A soup ingredient: a checkpoint, or a bare state dict, read as data (``core.checkpoint_loading``)."""
    return read_checkpoint(path, "soup ingredient", lightning=False)


def eval_state_dict(checkpoint: dict[str, Any], name: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The weights a module evaluates with, in the order of its ``state_dict``.

    The ``EMA`` callback swaps its average of the whole module in for evaluation once it has been
    updated, so that average replaces ``state_dict``; then a labelwise module evaluates ``net``
    through its own EMA copy (``eval_net``), so that copy replaces the ``net.`` entries.
    """
    state = dict(checkpoint["state_dict"]) if "state_dict" in checkpoint else dict(checkpoint)
    found = ema_callback_states(checkpoint)
    if len(found) > 1:
        raise ValueError(f"{name} holds {len(found)} EMA callback states, so which average it evaluated with is "
                         "ambiguous: soup checkpoints of runs with one EMA callback")
    if found and found[0]["ema"]["num_updates"] > 0:
        averaged = found[0]["ema"]["module"]
        if set(averaged) != set(state):
            raise ValueError(f"{name}: the EMA callback's average has other keys than its state_dict "
                             f"({sorted(set(averaged) ^ set(state))[:3]}): it was not saved by this module")
        state = {k: averaged[k] for k in state}
    ema = checkpoint.get("ema")
    if isinstance(ema, dict) and "module" in ema:
        for k, v in ema["module"].items():
            state[EMA_PREFIX + k] = v
    return state


def recorded_held_out(checkpoint: dict, datamodule: Any) -> list | None:
    """The held-out images a checkpoint of a ``datamodule``-like DataModule recorded
    (``datamodules.held_out.RecordsHeldOut``), or None if it holds no record."""
    state = checkpoint.get(type(datamodule).__qualname__)
    return list(state["held_out"]) if isinstance(state, dict) and "held_out" in state else None


def check_held_out(path: str, checkpoint: dict, datamodule: Any) -> None:
    """Raise if the model of ``checkpoint`` (read from ``path``) trained on some of ``datamodule``'s
    validation images (``held_out_ids()``, after ``setup``), so a choice among models on those images
    would be biased. What it held out is read from its checkpoint, else from a ``split.json`` beside
    it or one folder up; a model with neither gets a warning."""
    held_out = set(datamodule.held_out_ids()) if hasattr(datamodule, "held_out_ids") else set()
    if not held_out:
        return
    recorded, source = recorded_held_out(checkpoint, datamodule), "its checkpoint"
    if recorded is None:
        found = [p for p in (Path(path).parent / "split.json", Path(path).parent.parent / "split.json") if p.is_file()]
        if not found:
            warnings.warn(f"soup ingredient {path} records no held-out images and has no split.json beside "
                          f"it: cannot check that it held out the {len(held_out)} validation images")
            return
        recorded, source = json.loads(found[0].read_text()).get("val") or [], f"its split {found[0]}"
    trained_on = held_out - set(recorded)
    if trained_on:
        raise ValueError(f"soup ingredient {path} trained on {len(trained_on)} of the {len(held_out)} validation "
                         f"images ({source} does not hold them out): train every ingredient with the held-out "
                         f"split the soup uses (the same seed and val_labeled_per_class / num_val, or "
                         f"--data.split_file), or pass that run's split.json as the soup DataModule's split_file")


def load_ingredients(checkpoints: Sequence[str | os.PathLike], datamodule: Any = None
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """Each checkpoint's :func:`eval_state_dict` by path, every file read once (a path listed twice
    too); with ``datamodule``, each is first checked to have held out its validation images
    (:func:`check_held_out`)."""
    paths = [str(p) for p in checkpoints]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"soup ingredients not found: {missing}")
    states = {}
    for path in dict.fromkeys(paths):
        checkpoint = load_checkpoint(path)
        if datamodule is not None:
            check_held_out(path, checkpoint, datamodule)
        states[path] = eval_state_dict(checkpoint, path)
    return states


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean of floating-point entries; other entries (counters) come from the first."""
    if not states:
        raise ValueError("nothing to average")
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys:
            raise ValueError("soup ingredients have different state-dict keys: not the same architecture")
    out = {}
    for k in keys:
        first = states[0][k]
        if torch.is_tensor(first) and first.is_floating_point():
            out[k] = torch.stack([s[k].to(first.dtype) for s in states]).mean(0) if len(states) > 1 else first.clone()
        else:
            out[k] = first
    return out


def greedy_soup(
    checkpoints: Sequence[str | os.PathLike],
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    higher_is_better: bool = True,
    states: Mapping[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, float]]:
    """Greedy soup of ``checkpoints`` under the validation score ``evaluate(state_dict)``.

    ``states``: the ingredients as :func:`load_ingredients` gives them, if already read.
    Returns the soup's state dict, the chosen checkpoints (best first) and the scores: each
    ingredient's under its path and the soup's under ``"soup"``.
    """
    if not checkpoints:
        raise ValueError("greedy_soup needs at least one checkpoint")
    paths = [str(p) for p in checkpoints]
    states = load_ingredients(paths) if states is None else states
    scores = {p: float(evaluate(states[p])) for p in paths}
    sign = 1.0 if higher_is_better else -1.0
    ranked = sorted(paths, key=lambda p: -sign * scores[p])   # stable: ties keep the given order
    chosen = [ranked[0]]
    soup, best = states[ranked[0]], scores[ranked[0]]
    for p in ranked[1:]:
        candidate = average_state_dicts([states[c] for c in chosen + [p]])
        score = float(evaluate(candidate))
        if sign * score >= sign * best:
            chosen.append(p)
            soup, best = candidate, score
    scores["soup"] = best
    return soup, chosen, scores


def load_into(module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (an :func:`eval_state_dict`) into ``module``, and into its EMA copy if it has one."""
    module.load_state_dict(state)
    ema = getattr(module, "ema", None)
    if ema is not None and hasattr(ema, "module"):
        ema.module.load_state_dict({k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)})


def save_soup(module, checkpoints: Sequence[str], chosen: list[str], scores: dict[str, float], output: str) -> None:
    """Write the soup as a checkpoint (the best ingredient's, weights replaced) atomically."""
    base = load_checkpoint(chosen[0])
    base["state_dict"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    ema = getattr(module, "ema", None)
    if "ema" in base and ema is not None:
        base["ema"] = ema.state_dict()
    for callback_state in ema_callback_states(base):   # the EMA callback's average is the soup too
        callback_state["ema"]["module"] = {k: v.clone() for k, v in base["state_dict"].items()}
    for key in ("optimizer_states", "lr_schedulers"):
        base.pop(key, None)   # a soup is for evaluation / fine-tuning anew, not for resuming
    base["soup"] = {"ingredients": list(map(str, checkpoints)), "chosen": chosen, "scores": scores}
    with atomic_path(output) as tmp:
        torch.save(base, tmp)

"""Running state proposed during a step's loss and committed once, after the optimizer step.

Methods keep running state across steps: FlexMatch's per-sample memory, FreeMatch's and SoftMatch's
moving averages, ReMixMatch's class marginal, Temporal Ensembling's ensemble, online label
smoothing's per-class sums. ``compute_losses`` stays pure: it reads the *committed* state, computes
from it and the batch whatever the loss needs (FreeMatch's thresholds from the averages this step
would reach), writes nothing, and *proposes* the step's observation with
``step_state.propose(update, *observation)``. The base calls :meth:`StepState.commit` once per
optimizer step, right after the step, which calls ``update(*observation)``, the only code that writes.

* **Extra passes propose nothing.** A loss evaluated again within the same step (FGM's and PGD's
  passes at perturbed weights) runs inside :meth:`StepState.frozen`: the base's ``training_loss``,
  the protocol those callbacks call, enters it. So the state moves from the clean pass only, and
  once, however many passes a step makes.
* **Gradient accumulation merges.** The proposals of all micro-batches of one optimizer step are
  committed together, in one call per ``update``: each observation is a tuple of tensors with rows
  along dimension 0, and the micro-batches' rows are concatenated in order. The state then moves
  once per optimizer step, as it would for one batch made of all micro-batches (one moving-average
  step on their union, one memory write in which the later row wins), and every micro-batch's loss
  reads the state committed before the step.
* **Distributed.** ``update`` runs on every rank at the same point, so it may all-gather or
  all-reduce; a method whose loss needs every rank's batch gathers it in the loss and proposes the
  gathered rows instead. Either way every rank commits the same update and holds the same state.
* **Checkpoints.** Proposals are not saved: the commit precedes every ``on_train_batch_end``
  (where checkpoints are written), so a checkpoint taken at a step's end holds the step's update,
  and one taken between micro-batches lacks their pending proposals as it lacks their gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

#: writes one piece of state from the (concatenated) observation rows of an optimizer step
Update = Callable[..., None]


class StepState:
    """The pending proposals of the current optimizer step, and whether proposals are taken now."""

    def __init__(self) -> None:
        self._pending: dict[Update, list[tuple[torch.Tensor, ...]]] = {}
        self._frozen = 0

    def propose(self, update: Update, *observation: torch.Tensor) -> None:
        """Queue ``update(*observation)`` for the commit; ignored inside :meth:`frozen`.

        ``update`` identifies the piece of state (a bound method is equal to itself on every access);
        each tensor of ``observation`` has one row per sample (or per batch) along dimension 0.
        """
        if not self._frozen:
            self._pending.setdefault(update, []).append(tuple(t.detach() for t in observation))

    def observe(self, module: nn.Module, *inputs: torch.Tensor) -> None:
        """Propose the running state of a plain ``nn.Module`` (a criterion), if it keeps any and is training.

        Such a module has a pure ``observe(*inputs) -> rows`` and an in-place ``update_(*rows)``; it
        knows nothing of steps or Lightning, and the module that calls it proposes on its behalf.
        """
        if module.training and hasattr(module, "observe") and hasattr(module, "update_"):
            self.propose(module.update_, *module.observe(*inputs))

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Inside the block, losses propose nothing (extra passes of a step: FGM, PGD)."""
        self._frozen += 1
        try:
            yield
        finally:
            self._frozen -= 1

    @property
    def pending(self) -> int:
        """How many pieces of state have proposals waiting for the commit."""
        return len(self._pending)

    @torch.no_grad()
    def commit(self) -> None:
        """Apply every pending proposal once, micro-batches' rows concatenated, and clear them."""
        pending, self._pending = self._pending, {}
        for update, observations in pending.items():
            update(*(torch.cat(rows) for rows in zip(*observations)))

    def discard(self) -> None:
        """Drop pending proposals (a loss computed outside training, before ``fit``)."""
        self._pending.clear()

    # Copies (the EMA callback deep-copies the module, DDP spawn pickles it) start empty.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

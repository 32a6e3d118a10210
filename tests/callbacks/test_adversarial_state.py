"""FGM and PGD leave every method's running state as the clean passes alone would have moved it.

The extra passes of the adversarial callbacks evaluate the loss again, at perturbed weights. The
running state (FlexMatch's memory, FreeMatch's and SoftMatch's moving averages, ReMixMatch's class
marginal, Temporal Ensembling's ensemble, online label smoothing's sums, CRD's memories) must move once per
optimizer step, from the clean pass (docs/design.md, "Running state").

Each case trains N steps on real digits through the real callback (run A) and records, at every
step's start, the batch and the module's weights. Run B has no callback: at every step's start it
loads run A's weights (everything but the running state) and checks that it sees the same batch, so
its one clean pass per step is exactly run A's clean pass, and its state moves from nothing else.
Run A's state must change at most once per step (main moved it 2 times per step with FGM, 4 with
PGD at K = 3), and its final state must equal run B's; B's state must have moved (else the test says
nothing).
"""

from __future__ import annotations

import copy
import functools
import operator
import tempfile
from pathlib import Path

import pytest
import torch
from lightning import Callback

from callbacks import FGM, PGD
from datamodules import DigitsSSL
from lightning_modules import (AdaMatch, CoMatch, Dash, FlexMatch, FreeMatch, KDStudent, LabelPropagation, MultiMatch,
                               ReMixMatch, SequenceMatch, SimMatch, SimMatchV2, SoftMatch, Supervised, TemporalEnsembling)
from lightning_modules.classification.networks import build_network
from tests.ssl_helpers import SMALL_NET, make_trainer

STEPS = 3
NET = dict(SMALL_NET, ema_decay=None)


@functools.cache
def _teacher() -> str:
    """A fixed random wrn10_1 teacher file for CRD (the global RNG left as it was)."""
    path = Path(tempfile.mkdtemp()) / "teacher.pt"
    with torch.random.fork_rng():
        torch.manual_seed(123)
        torch.save(build_network("wrn10_1", num_classes=10, in_channels=1).state_dict(), path)
    return str(path)

#: method -> (a fresh model, the names of its running state); thresholds low and momenta short so
#: that three steps move the state visibly on a freshly initialized network
METHODS = {
    "FlexMatch": (lambda: FlexMatch(threshold=0.2, **NET), ("memory",)),
    "SequenceMatch": (lambda: SequenceMatch(threshold=0.2, **NET), ("memory",)),
    "FreeMatch": (lambda: FreeMatch(ema_momentum=0.5, **NET), ("global_threshold", "class_model", "label_hist")),
    "SoftMatch": (lambda: SoftMatch(ema_momentum=0.5, **NET), ("conf_mean", "conf_var", "prob_mean")),
    "MultiMatch": (lambda: MultiMatch(ema_momentum=0.5, **NET), ("apm", "weak_labels", "head_threshold",
                                                                   "head_class_model")),
    "ReMixMatch": (lambda: ReMixMatch(**NET), ("da_history", "da_count")),
    "AdaMatch": (lambda: AdaMatch(ema_momentum=0.5, **NET), ("da_model_marginal", "da_target_marginal")),
    "Dash": (lambda: Dash(supervised_warmup_steps=STEPS, rho_window=STEPS, **NET), ("rho_loss_sum", "rho_loss_count")),
    "TemporalEnsembling": (lambda: TemporalEnsembling(**NET), ("ensemble", "update_counts")),
    # propagated once, at the epoch's start, and only read by the loss
    "LabelPropagation": (lambda: LabelPropagation(warmup_epochs=0, **NET),
                         ("pseudo_labels", "pseudo_weights", "class_weights")),
    "SimMatch": (lambda: SimMatch(bank_warmup_epochs=0, **NET), ("bank.features", "bank.labels", "dist_align.means")),
    "CoMatch": (lambda: CoMatch(queue_size=40, bank_warmup_epochs=0, **NET),
                ("queue.features", "queue.probs", "queue.ptr", "dist_align.means")),
    "SimMatchV2": (lambda: SimMatchV2(queue_size=40, topn=8, **NET),
                   ("bank.features", "bank.seen", "queue.features", "queue.probs", "da_marginal")),
    "OnlineLabelSmoothing": (lambda: Supervised(criterion="online_label_smoothing", **NET),
                             ("criterion.accumulated", "criterion.counts", "criterion.soft_labels")),
    "CRD": (lambda: KDStudent(teacher=_teacher(), teacher_network="wrn10_1", crd_weight=0.8, crd_kwargs={"nce_k": 64},
                              distill_unlabeled=True, image_size=8, **NET),
            ("crd.memory_student", "crd.memory_teacher", "crd.normalizer")),
}
ATTACKS = {
    "FGM": lambda: FGM(param_names=["stem"], epsilon=0.1),
    "PGD3": lambda: PGD(param_names=["stem"], epsilon=0.1, alpha=0.05, steps=3),
}


def running_state(model, names) -> dict[str, torch.Tensor]:
    return {name: operator.attrgetter(name)(model).detach().clone() for name in names}


def data() -> DigitsSSL:
    # one epoch, longer than the run: the run's end is the first epoch end
    return DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=2 * STEPS)


class FinalState(Callback):
    """The running state at the end of the run's only epoch, before the module's own epoch-end hook
    (where online label smoothing turns its sums into soft labels and resets them)."""

    def __init__(self, state_names) -> None:
        self.names, self.state = state_names, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.state = running_state(pl_module, self.names)


class RecordSteps(FinalState):
    """Each step's batch and the module's state_dict at the step's start, and how many times the
    running state changed during the step (seen after each loss evaluation and at the step's end)."""

    def __init__(self, state_names) -> None:
        super().__init__(state_names)
        self.batches, self.states, self.moves, self._seen = [], [], [], []

    def on_fit_start(self, trainer, pl_module) -> None:
        compute_losses = pl_module.compute_losses  # the clean pass and every extra pass call it

        def observed(batch):
            losses = compute_losses(batch)
            self._seen.append(running_state(pl_module, self.names))
            return losses

        pl_module.compute_losses = observed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(copy.deepcopy(batch))
        self.states.append(copy.deepcopy(pl_module.state_dict()))
        self._seen = [running_state(pl_module, self.names)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seen = self._seen + [running_state(pl_module, self.names)]
        self.moves.append(sum(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen, seen[1:])))


class ReplayWeights(FinalState):
    """Loads a recorded run's weights (not its running state) at every step's start, and checks the batch."""

    def __init__(self, record: RecordSteps, state_names) -> None:
        super().__init__(state_names)
        self.record = record
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = running_state(pl_module, self.names)  # sized from the data at fit start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        for name, (a, b) in _leaves(batch, self.record.batches[step]):
            assert torch.equal(a, b), f"step {step}: the replay sees another batch ({name})"
        weights = {k: v for k, v in self.record.states[step].items() if k not in self.names}
        pl_module.load_state_dict(weights, strict=False)


def _leaves(a, b, prefix=""):
    if isinstance(a, dict):
        for key in a:
            yield from _leaves(a[key], b[key], f"{prefix}{key}.")
    else:
        yield prefix, (a, b)


def _fit(model, callbacks, root) -> None:
    make_trainer(max_steps=STEPS, callbacks=callbacks, default_root_dir=root).fit(model, data())


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("method", list(METHODS))
def test_state_after_adversarial_steps_equals_the_clean_passes_replayed(method, attack, tmp_path):
    make, names = METHODS[method]
    torch.manual_seed(0)
    attacked, record = make(), RecordSteps(names)
    _fit(attacked, [ATTACKS[attack](), record], tmp_path / "attacked")

    torch.manual_seed(0)
    clean, replay = make(), ReplayWeights(record, names)
    _fit(clean, [replay], tmp_path / "replay")
    expected = replay.state

    assert any(not torch.equal(v, replay.initial[k]) for k, v in expected.items()), \
        "the clean passes moved no state: the comparison would prove nothing"
    assert max(record.moves) <= 1, f"{method} + {attack}: the state moved {record.moves} times in the {STEPS} steps"
    actual = record.state
    for name in names:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{method} + {attack}: {name} moved with the extra passes. {m}")

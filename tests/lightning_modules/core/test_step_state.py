"""Running state is proposed during the loss and committed once per optimizer step (core/step_state.py).

The mechanism alone on plain tensors; then every stateful method on real digits with
``accumulate_grad_batches=2``: the state moves at optimizer steps only, and FreeMatch's one commit
of two micro-batches equals the paper's moving-average step on their union, computed here by hand.
(FGM's and PGD's extra passes: tests/callbacks/test_adversarial_state.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning import Callback

from lightning_modules import FreeMatch
from lightning_modules.core.step_state import StepState
from tests.callbacks.test_adversarial_state import METHODS, NET, data, running_state
from tests.ssl_helpers import make_trainer


# --- the mechanism ---------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def update(self, *rows: torch.Tensor) -> None:
        self.calls.append(rows)


def test_frozen_proposals_are_dropped_and_a_commit_concatenates_micro_batches_in_order():
    state, first, second = StepState(), Recorder(), Recorder()
    state.propose(first.update, torch.tensor([1, 2]), torch.tensor([[1.0], [2.0]]))
    with state.frozen():  # an extra pass of the same step (FGM, PGD)
        state.propose(first.update, torch.tensor([9]), torch.tensor([[9.0]]))
        state.propose(second.update, torch.tensor([9]))
    state.propose(first.update, torch.tensor([3]), torch.tensor([[3.0]]))  # the next micro-batch
    assert state.pending == 1 and first.calls == [] and second.calls == []  # nothing written before the commit
    state.commit()
    assert len(first.calls) == 1 and second.calls == []
    index, values = first.calls[0]
    assert index.tolist() == [1, 2, 3] and values.flatten().tolist() == [1.0, 2.0, 3.0]
    state.commit()  # nothing pending: no second update
    assert len(first.calls) == 1 and state.pending == 0


def test_proposals_are_detached_and_copies_start_empty():
    state, recorder = StepState(), Recorder()
    probs = torch.rand(3, 2, requires_grad=True)
    state.propose(recorder.update, probs * 2)
    assert copy.deepcopy(state).pending == 0 and state.pending == 1
    state.commit()
    assert not recorder.calls[0][0].requires_grad
    state.propose(recorder.update, probs)
    state.discard()
    state.commit()
    assert len(recorder.calls) == 1


# --- gradient accumulation on real digits -----------------------------------------------------
class StateAtEachMicroBatch(Callback):
    def __init__(self, names) -> None:
        self.names, self.states, self.batches, self.weights = names, [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append(running_state(pl_module, self.names))
        self.batches.append(copy.deepcopy(batch))
        self.weights.append(copy.deepcopy(pl_module.net.state_dict()))


def _accumulated_run(make, names, root, steps=2):
    torch.manual_seed(0)
    model, probe = make(), StateAtEachMicroBatch(names)
    trainer = make_trainer(max_steps=steps, accumulate_grad_batches=2, callbacks=[probe], default_root_dir=root)
    trainer.fit(model, data())
    return model, probe


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", list(METHODS))
def test_running_state_moves_once_per_optimizer_step_with_gradient_accumulation(method, tmp_path):
    make, names = METHODS[method]
    model, probe = _accumulated_run(make, names, tmp_path)
    states = probe.states + [running_state(model, names)]  # micro-batches 0-3, then after step 2
    # micro-batches 0 and 1 make optimizer step 1, 2 and 3 step 2: within a step the state stays put
    assert _equal(states[0], states[1]), f"{method}: the state moved between micro-batches of one optimizer step"
    assert _equal(states[2], states[3]), f"{method}: the state moved between micro-batches of one optimizer step"
    # online label smoothing's sums are turned into soft labels and reset at the run's end; label propagation's
    # labels move at epoch starts only (both runs here are within epoch 0, propagated before its first batch)
    if method not in ("OnlineLabelSmoothing", "LabelPropagation"):
        assert not _equal(states[0], states[2]) and not _equal(states[2], states[4]), \
            f"{method}: the state did not move at an optimizer step"


def test_freematch_commits_one_moving_average_step_over_both_micro_batches_matches_reference(tmp_path):
    """Wang et al. 2023 (FreeMatch), Eq. 5-8: ``tau_t``, ``p~_t`` and ``h~_t`` are moving averages with
    momentum ``lambda`` of the batch's mean max-probability, mean probability and label histogram; with
    gradient accumulation the batch of an optimizer step is the union of its micro-batches. Recomputed
    here from the recorded batches and weights: the weak view's logits from one forward over labeled,
    weak and strong images (``concat_forward``, train mode), as the step made them."""
    m, num_classes = 0.5, 10
    model, probe = _accumulated_run(lambda: FreeMatch(ema_momentum=m, **NET),
                                    ("global_threshold", "class_model", "label_hist"), tmp_path, steps=1)
    net = copy.deepcopy(model.net)
    net.load_state_dict(probe.weights[0])  # the weights of both micro-batches (no step between them)
    net.train()
    probs = []
    with torch.no_grad():
        for batch in probe.batches:
            views = [batch["labeled"]["image"], batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]]
            weak = net(torch.cat(views)).split([len(v) for v in views])[1]
            probs.append(torch.softmax(weak.float(), dim=1))
    q = torch.cat(probs)
    assert len(q) == 2 * len(probs[0])
    start = torch.full((num_classes,), 1.0 / num_classes)
    hist = torch.bincount(q.argmax(1), minlength=num_classes).float() / len(q)
    torch.testing.assert_close(model.global_threshold, m / num_classes + (1 - m) * q.max(1).values.mean())
    torch.testing.assert_close(model.class_model, m * start + (1 - m) * q.mean(0))
    torch.testing.assert_close(model.label_hist, m * start + (1 - m) * hist)

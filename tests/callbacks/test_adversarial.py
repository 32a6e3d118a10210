"""FGM and PGD on a real Trainer over sklearn digits: perturbation size, isolation, exact restore,
gradients against a hand computation, accumulation, bf16 autocast and CLI selection."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning import Callback, Trainer

from callbacks import FGM, PGD
from datamodules import DigitsSSL
from lightning_modules import Supervised
from train import cli_main

STEM = "net.stem.weight"


def _model() -> Supervised:
    torch.manual_seed(0)
    return Supervised(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1},
                      ema_decay=None)


def _data(steps: int = 2) -> DigitsSSL:
    return DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=steps)


def _trainer(callbacks, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0)
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class Probe(Callback):
    """Snapshots at every batch start, every call of training_loss, and before each optimizer step."""

    def __init__(self) -> None:
        self.batches, self.states, self.calls, self.grads, self.buffers = [], [], [], [], []
        self.restored: list[bool] = []
        self._start: dict[str, torch.Tensor] = {}
        self._pending = False

    def on_fit_start(self, trainer, pl_module) -> None:
        original = pl_module.training_loss  # training_step never calls it: every call is an extra pass

        def spy(batch):
            self.calls.append({
                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                "autocast": torch.is_autocast_enabled("cpu"),
            })
            return original(batch)

        pl_module.training_loss = spy

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(copy.deepcopy(batch))
        self.states.append(copy.deepcopy(pl_module.state_dict()))
        if not self._pending:  # first micro-batch of an optimizer step
            self._start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self._pending = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # No optimizer step since the first batch of this step: parameters must equal that snapshot bitwise.
        self.restored.append(all(torch.equal(p, self._start[n]) for n, p in pl_module.named_parameters()))
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})
        self.buffers.append({n: b.detach().clone() for n, b in pl_module.named_buffers()})
        self._pending = False


def _hand_grads(model, batch, names, epsilon, alpha=None, steps=1, scale=1.0):
    """grad L(theta) + grad L(theta + r_K) by hand, r built like FGM (steps=1, alpha=epsilon) or PGD."""
    alpha = epsilon if alpha is None else alpha
    params = dict(model.named_parameters())
    chosen = [n for n in params if any(s in n for s in names)]
    originals = {n: params[n].detach().clone() for n in chosen}
    normal = dict(zip(params, torch.autograd.grad(model.training_loss(batch), list(params.values()))))
    direction = {n: normal[n] for n in chosen}
    for k in range(steps):
        with torch.no_grad():
            for n in chosen:
                params[n].add_(alpha * direction[n] / direction[n].norm())
                delta = params[n] - originals[n]
                if delta.norm() > epsilon:
                    params[n].copy_(originals[n] + delta * (epsilon / delta.norm()))
        adv = dict(zip(params, torch.autograd.grad(model.training_loss(batch), list(params.values()))))
        direction = {n: adv[n] for n in chosen}
    with torch.no_grad():
        for n in chosen:
            params[n].copy_(originals[n])
    return {n: scale * (normal[n] + adv[n]) for n in params}


def _assert_grads_close(actual, expected):
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_fgm_perturbs_only_the_chosen_parameters_by_epsilon_and_restores_bitwise():
    model, probe, fgm = _model(), Probe(), FGM(param_names=["stem"], epsilon=0.5)
    _trainer([fgm, probe], max_steps=2).fit(model, _data())
    assert probe.restored == [True, True]
    assert len(probe.calls) == 2  # one extra pass per step
    for call, state in zip(probe.calls, probe.states):
        for n, p in call["params"].items():
            if n == STEM:
                assert torch.linalg.vector_norm(p - state[n]).item() == pytest.approx(0.5, rel=1e-5)
            else:
                assert torch.equal(p, state[n]), n
    assert [list(d) for d in fgm.last_perturbation_norms] == [[STEM]]
    assert fgm.last_perturbation_norms[0][STEM] == pytest.approx(0.5, rel=1e-5)


def test_fgm_gradient_equals_hand_computation_and_bn_stats_see_both_forwards():
    model, probe = _model(), Probe()
    _trainer([FGM(param_names=["stem"], epsilon=0.5), probe]).fit(model, _data())
    ref = _model()
    ref.load_state_dict(probe.states[0])
    ref.train()
    expected = _hand_grads(ref, probe.batches[0], ["stem"], epsilon=0.5)
    _assert_grads_close(probe.grads[0], expected)
    # BatchNorm running statistics were updated by the normal and the adversarial forward
    # (the hand computation did the same two forwards).
    for n, b in ref.named_buffers():
        torch.testing.assert_close(probe.buffers[0][n], b, msg=lambda m: f"{n}: {m}")


def test_pgd_stays_in_the_epsilon_ball_and_matches_hand_computation():
    model, probe = _model(), Probe()
    pgd = PGD(param_names=["stem", r"groups\.0\.0\.conv1"], epsilon=0.05, alpha=0.03, steps=3)
    _trainer([pgd, probe]).fit(model, _data())
    assert probe.restored == [True]
    assert len(pgd.last_perturbation_norms) == 3 and len(probe.calls) == 3
    chosen = {STEM, "net.groups.0.0.conv1.weight"}
    for norms in pgd.last_perturbation_norms:
        assert set(norms) == chosen
        assert all(v <= 0.05 * (1 + 1e-5) for v in norms.values())
    for call in probe.calls:  # measured from the parameters the extra passes actually saw
        for n, p in call["params"].items():
            dist = torch.linalg.vector_norm(p - probe.states[0][n]).item()
            assert dist <= 0.05 * (1 + 1e-5) if n in chosen else dist == 0.0, n
    assert pgd.last_perturbation_norms[0][STEM] == pytest.approx(0.03, rel=1e-5)
    assert pgd.last_perturbation_norms[-1][STEM] == pytest.approx(0.05, rel=1e-5)  # the projection was active
    ref = _model()
    ref.load_state_dict(probe.states[0])
    ref.train()
    expected = _hand_grads(ref, probe.batches[0], ["stem", "groups.0.0.conv1"], epsilon=0.05, alpha=0.03, steps=3)
    _assert_grads_close(probe.grads[0], expected)


def test_gradient_accumulation_scales_the_extra_loss_and_uses_each_batch_gradient():
    model, probe, fgm = _model(), Probe(), FGM(param_names=["stem"], epsilon=0.5)
    _trainer([fgm, probe], accumulate_grad_batches=2).fit(model, _data(steps=2))
    assert probe.restored == [True] and len(probe.batches) == 2 and len(probe.calls) == 2
    for call, state in zip(probe.calls, probe.states):  # epsilon on each micro-batch's own direction
        assert torch.linalg.vector_norm(call["params"][STEM] - state[STEM]).item() == pytest.approx(0.5, rel=1e-5)
    ref = _model()
    ref.load_state_dict(probe.states[0])
    ref.train()
    parts = [_hand_grads(ref, b, ["stem"], epsilon=0.5, scale=0.5) for b in probe.batches]
    _assert_grads_close(probe.grads[0], {n: parts[0][n] + parts[1][n] for n in parts[0]})


@pytest.mark.parametrize("callback", [FGM(["stem"], epsilon=0.5), PGD(["stem"], epsilon=0.5, alpha=0.2, steps=2)],
                         ids=["FGM", "PGD"])
def test_bf16_mixed_runs_the_extra_pass_under_autocast_and_restores(callback):
    model, probe = _model(), Probe()
    _trainer([callback, probe], precision="bf16-mixed", max_steps=2).fit(model, _data())
    assert probe.restored == [True, True]
    assert probe.calls and all(c["autocast"] for c in probe.calls)
    assert all(torch.isfinite(g).all() for step in probe.grads for g in step.values())
    assert all(v <= 0.5 * (1 + 1e-5) for d in callback.last_perturbation_norms for v in d.values())


def test_errors_no_match_missing_protocol_and_manual_optimization():
    with pytest.raises(ValueError, match=r"matches no trainable parameter.*net\.stem\.weight"):
        _trainer([FGM(["no_such_param"])]).fit(_model(), _data())

    class NoProtocol(Supervised):
        training_loss = None

    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"training_loss\(batch\)"):
        _trainer([FGM(["stem"])]).fit(NoProtocol(num_classes=10, in_channels=1, network="wrn10_1"), _data())

    class Manual(Supervised):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        _trainer([PGD(["stem"])]).fit(Manual(num_classes=10, in_channels=1, network="wrn10_1"), _data())
    with pytest.raises(ValueError):
        PGD(["stem"], steps=0)


def test_cli_selects_fgm_by_name():
    cli = cli_main([
        "fit", "--model", "Supervised", "--data", "DigitsSSL", "--model.network", "wrn10_1",
        "--model.ema_decay", "null", "--data.steps_per_epoch", "2", "--data.batch_size", "16",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=FGM", "--trainer.callbacks.param_names=[stem]", "--trainer.callbacks.epsilon=0.25",
        "--test_after_fit", "false",
    ])
    (fgm,) = [c for c in cli.trainer.callbacks if isinstance(c, FGM)]
    assert fgm.param_names == ["stem"] and fgm.epsilon == 0.25
    assert cli.trainer.global_step == 2
    assert fgm.last_perturbation_norms[0][STEM] == pytest.approx(0.25, rel=1e-5)

"""The greedy soup souping what a run evaluated with when it trained with ``callbacks.EMA``, and the
greedy rule against the model-soups authors' code."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from callbacks import EMA, ema_weights_from_checkpoint
from lightning_modules.fusion import greedy_soup, save_soup, soup_from_checkpoints
from lightning_modules.fusion.soup import eval_state_dict, load_checkpoint
from datamodules import DigitsSSL
from lightning_modules import Supervised
from tests.ssl_helpers import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> DigitsSSL:
    return DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run fit through train.py's CLI with the EMA callback, and three fine-tunes of it (other
    seeds and learning rates), each with an EMA callback of its own."""
    from train import cli_main

    root = tmp_path_factory.mktemp("ema_runs")
    threads = torch.get_num_threads()  # restored after the module, for the tests that run after it
    torch.set_num_threads(1)
    cli_main(["fit", "--model", "Supervised", "--model.network", "wrn10_1",
              "--model.network_kwargs", '{"bn_momentum": 0.1}', "--model.ema_decay", "null", "--model.lr", "0.05",
              "--data", "DigitsSSL", "--data.num_labeled", "50", "--data.batch_size", "16",
              "--data.steps_per_epoch", "30", "--trainer.max_epochs", "2", "--seed_everything", "0",
              "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.limit_val_batches", "0", "--test_after_fit", "false",
              "--trainer.callbacks+=EMA", "--trainer.callbacks.decay=0.9",
              "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root}",
              "--trainer.callbacks.filename=base"])
    base = str(root / "base.ckpt")
    fine_tunes = []
    for seed, lr in [(1, 0.01), (2, 0.02), (3, 0.03)]:
        L.seed_everything(seed, verbose=False)
        module = Supervised.load_from_checkpoint(base, lr=lr)
        trainer = make_trainer(max_steps=10, accelerator="cpu", default_root_dir=root, callbacks=[EMA(decay=0.7)])
        trainer.fit(module, DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=10))
        trainer.save_checkpoint(root / f"fine{seed}.ckpt")
        fine_tunes.append(str(root / f"fine{seed}.ckpt"))
    yield {"base": base, "fine_tunes": fine_tunes}
    torch.set_num_threads(threads)


def _validate(module, **kwargs) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=kwargs.pop("callbacks", None))
    return trainer.validate(module, datamodule=_data(), verbose=False, **kwargs)[0]


def test_soup_ingredient_is_the_ema_callbacks_average_and_scores_what_the_run_evaluated(runs):
    base = runs["base"]
    checkpoint = load_checkpoint(base)
    averaged, raw = ema_weights_from_checkpoint(checkpoint), checkpoint["state_dict"]
    state = eval_state_dict(checkpoint)
    assert list(state) == list(raw)
    for k, v in averaged.items():
        assert torch.equal(state[k], v), k
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw if raw[k].is_floating_point())

    # What the run itself evaluated with: its EMA callback, restored from the checkpoint, swapped in.
    module = L.LightningModule.load_from_checkpoint(base)
    ran = _validate(module, callbacks=[EMA(decay=0.9)], ckpt_path=base)["val/loss"]
    assert ran != pytest.approx(_validate(L.LightningModule.load_from_checkpoint(base))["val/loss"], rel=1e-4)
    _, chosen, scores = soup_from_checkpoints([base], _data(), metric="val/loss", higher_is_better=False,
                                          select_on_test=True)
    assert chosen == [base] and scores[base] == pytest.approx(ran, rel=1e-6)


def test_soup_checkpoint_carries_the_soup_in_the_ema_callbacks_state(runs, tmp_path):
    paths = runs["fine_tunes"]
    module, chosen, scores = soup_from_checkpoints(paths, _data(), metric="val/loss", higher_is_better=False,
                                                   module_class=Supervised, select_on_test=True)
    out = tmp_path / "soup.ckpt"
    save_soup(module, paths, chosen, scores, str(out))
    written = load_checkpoint(out)
    soup = module.state_dict()
    for weights in (written["state_dict"], ema_weights_from_checkpoint(written), eval_state_dict(written)):
        assert weights.keys() == soup.keys()
        for k, v in soup.items():
            assert torch.equal(weights[k], v), k
    # validated with or without the EMA callback, the soup checkpoint gives the soup's score
    assert _validate(Supervised.load_from_checkpoint(out))["val/loss"] == pytest.approx(scores["soup"], rel=1e-6)
    reloaded = Supervised.load_from_checkpoint(out)
    assert _validate(reloaded, callbacks=[EMA()], ckpt_path=str(out))["val/loss"] == pytest.approx(scores["soup"], rel=1e-6)


def _reference_greedy_soup(ingredients: dict[str, dict[str, torch.Tensor]], evaluate) -> tuple[dict, list[str]]:
    """The greedy soup of the authors' code, mlfoundations/model-soups main.py (d5398f1) lines 146-185:
    sort by validation score, decreasing (sorted ascending, then reversed); start from the best;
    try each next one as a running average, soup * n/(n+1) + new * 1/(n+1); keep it only if the
    score is strictly higher. Integer buffers (BatchNorm counts, which CLIP has none of) are kept
    from the best ingredient, as our soup does."""
    scored = sorted(((name, evaluate(state)) for name, state in ingredients.items()), key=lambda x: x[1])
    scored.reverse()
    names = [name for name, _ in scored]
    soup, best, members = dict(ingredients[names[0]]), scored[0][1], [names[0]]
    for name in names[1:]:
        n, new = len(members), ingredients[name]
        candidate = {k: soup[k] * (n / (n + 1.0)) + new[k] * (1.0 / (n + 1)) if soup[k].is_floating_point() else soup[k]
                     for k in new}
        score = evaluate(candidate)
        if score > best:
            members.append(name)
            best, soup = score, candidate
    return soup, members


def _scattered_ingredients(base: str, root) -> list[str]:
    """Ingredients scattered around one trained solution, as fine-tunes of one model are: copies of the
    base run's checkpoint whose EMA average gets Gaussian noise of several sizes on the network's
    weights (the last far too large). Averaging such ingredients cancels part of their noise, so
    the greedy soup keeps several and refuses the last (checked over six noise seeds)."""
    checkpoint = load_checkpoint(base)
    averaged = checkpoint["callbacks"]["EMA"]["ema"]["module"]
    generator = torch.Generator().manual_seed(0)
    paths = []
    for k, sigma in enumerate([0.4, 0.3, 0.5, 0.35, 3.0]):
        noisy = copy.deepcopy(checkpoint)
        noisy["callbacks"]["EMA"]["ema"]["module"] = {
            name: v + sigma * v.std() * torch.randn(v.shape, generator=generator)
            if name.startswith("net.") and v.is_floating_point() and "running" not in name and v.numel() > 1
            else v.clone() for name, v in averaged.items()}
        paths.append(str(root / f"scattered{k}.ckpt"))
        torch.save(noisy, paths[-1])
    return paths


def test_greedy_soup_matches_reference_model_soups_code(runs, tmp_path):
    data = _data()
    data.setup("validate")
    batches = [data.on_after_batch_transfer(b, 0) for b in data.val_dataloader()]
    network = copy.deepcopy(Supervised.load_from_checkpoint(runs["base"]).net).eval()

    @torch.no_grad()
    def negative_loss(state: dict[str, torch.Tensor]) -> float:   # continuous: no ties
        network.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
        losses = [F.cross_entropy(network(b["image"]), b["target"], reduction="sum") for b in batches]
        return -float(sum(losses)) / sum(len(b["target"]) for b in batches)

    paths = _scattered_ingredients(runs["base"], tmp_path)
    ingredients = {p: eval_state_dict(load_checkpoint(p)) for p in paths}
    want, want_members = _reference_greedy_soup(ingredients, negative_loss)
    got, members, scores = greedy_soup(paths, negative_loss)
    assert members == want_members
    assert 2 <= len(members) and paths[-1] not in members   # not a trivial comparison either way
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert scores["soup"] == pytest.approx(negative_loss(want), rel=1e-5)
    assert scores["soup"] > max(scores[p] for p in paths)


def test_ambiguous_or_foreign_ema_callback_states_are_refused(runs):
    checkpoint = load_checkpoint(runs["base"])
    state = checkpoint["callbacks"]["EMA"]
    two = {**checkpoint, "callbacks": {"EMA{'decay': 0.9}": state, "EMA{'decay': 0.99}": copy.deepcopy(state)}}
    with pytest.raises(ValueError, match="2 EMA callback states"):
        eval_state_dict(two, "two.ckpt")
    foreign = copy.deepcopy(checkpoint)
    foreign["callbacks"]["EMA"]["ema"]["module"].pop("net.fc.bias")
    with pytest.raises(ValueError, match="other keys than its state_dict.*net.fc.bias"):
        eval_state_dict(foreign, "foreign.ckpt")
    never_updated = copy.deepcopy(checkpoint)
    never_updated["callbacks"]["EMA"]["ema"]["num_updates"] = 0   # the callback evaluated the raw weights
    raw = eval_state_dict(never_updated)
    assert all(torch.equal(raw[k], v) for k, v in checkpoint["state_dict"].items())

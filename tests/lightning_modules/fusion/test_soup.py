"""Greedy soup over real digits runs written by train.py's CLI, selected on held-out validation digits."""

import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.fusion.soup import average_state_dicts, greedy_soup
from lightning_modules.fusion.soup_selection import soup_from_checkpoints
from datamodules import DigitsSSL

REPO = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(out, seed: int, lr: float, held_out: list[str], epochs: int = 2) -> str:
    """A short Supervised run fit through the CLI; its split.json lands beside its checkpoint."""
    from train import cli_main

    cli_main(["fit", "--model", "Supervised", "--model.network", "wrn10_1",
              "--model.network_kwargs", '{"bn_momentum": 0.1}', "--model.ema_decay", "null",
              "--model.lr", str(lr), "--data", "DigitsSSL", "--data.num_labeled", "50", *held_out,
              "--data.batch_size", "16", "--data.steps_per_epoch", "10", "--trainer.max_epochs", str(epochs),
              "--seed_everything", str(seed), "--trainer.default_root_dir", str(out),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
              "--test_after_fit", "false",
              "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={out}",
              "--trainer.callbacks.filename=final"])
    return str(out / "final.ckpt")


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """Three short Supervised runs with other seeds and learning rates, 5 digits per class held out."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()  # restored after the module, for the tests that run after it
    torch.set_num_threads(1)
    yield [_fit(root / f"run{seed}", seed, lr, ["--data.val_labeled_per_class", "5"])
           for seed, lr in [(0, 0.05), (1, 0.03), (2, 0.1)]]
    torch.set_num_threads(threads)


def _data(**kwargs):
    return DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=3, val_labeled_per_class=5, **kwargs)


def test_soup_is_never_worse_than_its_best_ingredient(ingredients):
    module, chosen, scores = soup_from_checkpoints(ingredients, _data(), metric="val/acc")
    best = max(scores[p] for p in ingredients)
    assert scores["soup"] >= best
    assert chosen[0] == max(ingredients, key=lambda p: scores[p])
    assert type(module).__name__ == "Supervised"       # rebuilt by LightningModule.load_from_checkpoint
    # the returned module holds the soup
    import lightning as L
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert trainer.validate(module, datamodule=_data(), verbose=False)[0]["val/acc"] == pytest.approx(scores["soup"])


def test_soup_scores_are_on_the_held_out_digits_not_the_test_set(ingredients):
    """Each ingredient's score is its accuracy on the 50 held-out training digits, counted here by hand."""
    import lightning as L

    data = _data()
    _, _, scores = soup_from_checkpoints(ingredients, data, metric="val/acc")
    images, targets = data._train
    held_out = data.split.val
    assert len(held_out) == 50 and not set(held_out.tolist()) & set(data.split.labeled.tolist())
    for path in ingredients:
        module = L.LightningModule.load_from_checkpoint(path).eval()
        with torch.no_grad():
            predicted = module.eval_net(data.to_float(images[held_out])).argmax(dim=1)
        assert scores[path] == pytest.approx(float((predicted == targets[held_out]).float().mean()))


def test_soup_refuses_to_select_on_the_test_set_unless_asked(ingredients):
    test_set = DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=3)
    with pytest.raises(ValueError, match="DigitsSSL validates on its test set.*val_labeled_per_class.*select_on_test"):
        soup_from_checkpoints(ingredients, test_set)
    _, _, scores = soup_from_checkpoints(ingredients[:1], test_set, select_on_test=True)
    assert set(scores) == {ingredients[0], "soup"}


def test_soup_refuses_an_ingredient_that_trained_on_the_validation_digits(ingredients, tmp_path):
    leaky = _fit(tmp_path / "leaky", 3, 0.05, [], epochs=1)  # no held-out digits: trained on all of them
    assert torch.load(ingredients[0], weights_only=False)["DigitsSSL"]["held_out"] == _held_out_digits()
    with pytest.raises(ValueError, match=r"soup ingredient .*leaky/final.ckpt trained on \d+ of the 50 validation "
                                         r"images \(its checkpoint does not hold them out\)"):
        soup_from_checkpoints([*ingredients, leaky], _data())
    # a checkpoint without the record (written before it existed): the split.json beside it tells
    old = torch.load(leaky, weights_only=False)
    del old["DigitsSSL"]["held_out"]
    torch.save(old, tmp_path / "leaky" / "old.ckpt")
    with pytest.raises(ValueError, match=r"old.ckpt trained on \d+ of the 50 .*its split .*leaky/split.json does not"):
        soup_from_checkpoints([*ingredients, str(tmp_path / "leaky" / "old.ckpt")], _data())


def _held_out_digits() -> list[int]:
    data = _data()
    data.setup("validate")
    return data.split.val.tolist()


def test_update_bn_soup_is_never_worse_than_its_best_ingredient(ingredients):
    _, chosen, scores = soup_from_checkpoints(ingredients, _data(), update_bn=True, bn_batches=2)
    assert scores["soup"] >= max(scores[p] for p in ingredients)


def test_each_ingredient_file_is_read_once(ingredients, monkeypatch):
    """The held-out check and the greedy pass share one read of each file (they used to read each
    twice; a path listed three times was read three times). Lightning's rebuild of the module from
    the first checkpoint (its class and hyper-parameters) is its own read, not counted here."""
    import lightning_modules.fusion.soup as soup

    reads, read = [], soup.load_checkpoint
    monkeypatch.setattr(soup, "load_checkpoint", lambda path: reads.append(str(path)) or read(path))
    _, chosen, scores = soup_from_checkpoints(ingredients, _data(), metric="val/acc")
    assert sorted(reads) == sorted(ingredients) and set(scores) == {*ingredients, "soup"}
    reads.clear()
    _, chosen, _ = greedy_soup([ingredients[0]] * 3, lambda s: 0.5)
    assert reads == [ingredients[0]] and chosen == [ingredients[0]] * 3


def test_identical_checkpoints_soup_to_the_same_weights(ingredients):
    state = torch.load(ingredients[0], map_location="cpu", weights_only=False)["state_dict"]
    soup, chosen, scores = greedy_soup([ingredients[0]] * 3, lambda s: 0.5)
    assert len(chosen) == 3 and scores["soup"] == 0.5
    for k, v in state.items():
        torch.testing.assert_close(soup[k], v, rtol=1e-6, atol=1e-7)


def test_greedy_rule_on_a_known_score():
    """Score = -|w - 1|: ingredients 1.0, 0.0 and 2.0; the soup keeps 1.0, refuses 0.0 alone but..."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, w in enumerate([0.0, 1.2, 3.0]):
            paths.append(f"{d}/{i}.ckpt")
            torch.save({"state_dict": {"w": torch.tensor([w])}}, paths[-1])
        soup, chosen, scores = greedy_soup(paths, lambda s: -abs(float(s["w"]) - 1.0))
        # 1.2 is best (-0.2); with 0.0 the mean 0.6 scores -0.4 (rejected); with 3.0: 2.1 (rejected)
        assert chosen == [paths[1]] and float(soup["w"]) == pytest.approx(1.2)
        soup, chosen, _ = greedy_soup(paths, lambda s: float(s["w"]), higher_is_better=False)
        assert chosen == [paths[0]]


def test_bad_checkpoint_lists_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], lambda s: 0.0)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        greedy_soup([str(tmp_path / "missing.ckpt")], lambda s: 0.0)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        soup_from_checkpoints([str(tmp_path / "missing.ckpt")], _data())
    with pytest.raises(ValueError, match="different state-dict keys"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def test_command_line_writes_the_soup(ingredients, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import soup as soup_script
    finally:
        sys.path.pop(0)
    out = tmp_path / "soup.ckpt"
    result = soup_script.main(["--checkpoints", *ingredients, "--data", "DigitsSSL", "--data_kwargs",
                               '{"num_labeled": 50, "batch_size": 16, "steps_per_epoch": 3, "val_labeled_per_class": 5}',
                               "--metric", "val/acc", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "soup" in printed and all(p in printed for p in ingredients)
    assert "selected on 50 held-out validation images" in printed
    assert f"on the test set: test/acc soup {result['test']['soup']:.4f}, best ingredient alone" in printed
    checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    assert checkpoint["soup"]["chosen"] == result["chosen"]
    assert "optimizer_states" not in checkpoint
    assert not list(tmp_path.glob("*.tmp*"))
    import lightning as L
    module = L.LightningModule.load_from_checkpoint(out)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    acc = trainer.validate(module, datamodule=_data(), verbose=False)[0]["val/acc"]
    assert acc == pytest.approx(result["scores"]["soup"])
    test_acc = trainer.test(module, datamodule=_data(), verbose=False)[0]["test/acc"]
    assert test_acc == pytest.approx(result["test"]["soup"])


def test_labelwise_soup_is_the_same_command(ingredients, capsys):
    """``labelwise soup`` / ``python train.py soup`` (train.main) runs the command benchmarks/soup.py runs;
    anything else still goes to LightningCLI."""
    import train

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import soup as soup_script
    finally:
        sys.path.pop(0)
    assert soup_script.main is train.soup_main
    with pytest.raises(SystemExit) as stopped:
        train.main(["soup", "--help"])
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("usage: labelwise soup [-h] --checkpoints")
    with pytest.raises(SystemExit) as stopped:
        train.main(["soup", "--checkpoints", ingredients[0], "--data", "DigitSSL", "--output", "x.ckpt"])
    assert stopped.value.code == 2 and "unknown --data 'DigitSSL': choose one of DigitsSSL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["fit", "--model", "Supervised", "--data", "DigitsSSL", "--print_config"])
    assert "class_path: lightning_modules.Supervised" in capsys.readouterr().out

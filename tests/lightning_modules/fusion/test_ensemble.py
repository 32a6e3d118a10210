"""Ensemble: identical members equal one member, mean and vote by hand, the CLI, clear errors."""

from pathlib import Path

import pytest
import torch
from lightning import Trainer, seed_everything

from datamodules import DigitsSSL
from lightning_modules import Ensemble, Supervised
from lightning_modules.fusion.ensemble import load_member
from train import cli_main

SUPERVISED = "lightning_modules.Supervised"


def _data() -> DigitsSSL:
    return DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=6)


def _trainer(root: Path, **kwargs) -> Trainer:
    # one evaluation batch (256 test images) keeps the file fast on shared CPUs
    options = dict(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, accelerator="cpu", limit_val_batches=1, limit_test_batches=1,
                   limit_predict_batches=1)
    return Trainer(**{**options, **kwargs})


def _cli_args(root: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--data", "DigitsSSL", "--data.steps_per_epoch", "4", "--data.batch_size", "16",
            "--data.eval_batch_size", "512"]


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory) -> list[str]:
    """Three tiny Supervised models, different seeds: the first saved by ``train.py fit`` (its checkpoint
    records ``_class_path``), the others by a plain Trainer (they do not)."""
    root = tmp_path_factory.mktemp("members")
    cli = cli_main(["fit", "--model", "Supervised", "--model.network", "wrn10_1", "--model.ema_decay", "0.5",
                    "--model.network_kwargs", "{bn_momentum: 0.1}", *_cli_args(root / "cli"),
                    "--trainer.max_epochs", "1", "--test_after_fit", "false"])
    paths = [str(next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt")))]
    for seed in (1, 2):
        seed_everything(seed)
        model = Supervised(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1},
                           ema_decay=0.5)
        trainer = _trainer(root / str(seed), max_steps=4)
        trainer.fit(model, _data())
        trainer.save_checkpoint(root / f"m{seed}.ckpt")
        paths.append(str(root / f"m{seed}.ckpt"))
    return paths


@pytest.fixture(scope="module")
def test_batch() -> dict[str, torch.Tensor]:
    """The first test batch, as the trainers above see it."""
    data = _data()
    data.setup("test")
    return data.on_after_batch_transfer(next(iter(data.test_dataloader())), 0)


@pytest.fixture(scope="module")
def member_probs(plain_checkpoints, test_batch) -> dict[str, torch.Tensor]:
    """Each member's softmax probabilities on ``test_batch``, computed by hand from its EMA weights."""
    probs = {}
    for path in plain_checkpoints:
        net = load_member(path, SUPERVISED).eval_net.eval()
        with torch.no_grad():
            probs[path] = torch.softmax(net(test_batch["image"]), dim=1)
    return probs


def _predict(model, root) -> dict[str, torch.Tensor]:
    out = _trainer(root).predict(model, datamodule=_data())
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def test_ensemble_of_identical_checkpoints_equals_the_checkpoint(plain_checkpoints, member_probs, tmp_path):
    a = plain_checkpoints[0]
    ensemble = Ensemble([a, a], num_classes=10, in_channels=1, module_class=SUPERVISED)
    assert not any(p.requires_grad for p in ensemble.parameters())
    single = Supervised.load_from_checkpoint(a, map_location="cpu")
    ens_pred, single_pred = _predict(ensemble, tmp_path), _predict(single, tmp_path)
    assert torch.equal(ens_pred["index"], single_pred["index"])
    torch.testing.assert_close(ens_pred["probs"], single_pred["probs"])
    assert torch.equal(ens_pred["prediction"], single_pred["prediction"])
    torch.testing.assert_close(ens_pred["probs"], member_probs[a])
    ens_acc = _trainer(tmp_path).test(ensemble, datamodule=_data(), verbose=False)[0]["test/acc"]
    single_acc = _trainer(tmp_path).test(single, datamodule=_data(), verbose=False)[0]["test/acc"]
    assert ens_acc == pytest.approx(single_acc)


def test_mean_mode_is_the_average_of_the_members_probabilities(plain_checkpoints, member_probs, test_batch, tmp_path):
    ensemble = Ensemble(plain_checkpoints, num_classes=10, in_channels=1, module_class=SUPERVISED)
    by_hand = torch.stack([member_probs[p] for p in plain_checkpoints]).mean(dim=0)
    pred = _predict(ensemble, tmp_path)
    torch.testing.assert_close(pred["probs"], by_hand)
    assert torch.equal(pred["prediction"], by_hand.argmax(dim=1))
    targets = test_batch["target"]
    acc = _trainer(tmp_path).validate(ensemble, datamodule=_data(), verbose=False)[0]["val/acc"]
    assert acc == pytest.approx((by_hand.argmax(dim=1) == targets).float().mean().item())


def test_vote_mode_is_the_majority_with_ties_broken_by_mean_probability(plain_checkpoints, member_probs, tmp_path):
    ensemble = Ensemble(plain_checkpoints, mode="vote", num_classes=10, in_channels=1, module_class=SUPERVISED)
    probs = [member_probs[p] for p in plain_checkpoints]
    mean = torch.stack(probs).mean(dim=0)
    expected = []
    for i in range(len(mean)):
        votes = [int(p[i].argmax()) for p in probs]
        counts = {c: votes.count(c) for c in votes}
        top = max(counts.values())
        expected.append(max((c for c in counts if counts[c] == top), key=lambda c: float(mean[i, c])))
    pred = _predict(ensemble, tmp_path)
    assert pred["prediction"].tolist() == expected
    torch.testing.assert_close(pred["probs"], mean)


def test_vote_breaks_ties_by_mean_probability():
    # 4 members, 3 classes: classes 0 and 2 get two votes each; class 2 has the higher mean probability
    probs = torch.tensor([[[0.5, 0.1, 0.4]], [[0.6, 0.3, 0.1]], [[0.0, 0.1, 0.9]], [[0.3, 0.2, 0.5]]])
    mean, prediction = Ensemble.combine(probs, "vote")
    assert prediction.tolist() == [2]
    assert Ensemble.combine(probs, "mean")[1].tolist() == [2]
    probs[3, 0] = torch.tensor([0.0, 0.9, 0.1])  # now 0 has two votes, 1 and 2 one each: the majority wins
    assert Ensemble.combine(probs, "vote")[1].tolist() == [0]


def test_cli_test_and_predict_with_an_ensemble(plain_checkpoints, tmp_path):
    cli_ckpt = plain_checkpoints[0]  # its class comes from the _class_path that train.py recorded
    single = Supervised.load_from_checkpoint(cli_ckpt, map_location="cpu")
    single_acc = _trainer(tmp_path, limit_test_batches=None).test(single, datamodule=_data(), verbose=False)
    single_acc = single_acc[0]["test/acc"]  # on all 450 test images, as the CLI run below
    cli = cli_main(["test", "--model", "Ensemble", "--model.checkpoints", f"[{cli_ckpt},{cli_ckpt}]",
                    *_cli_args(tmp_path)])
    assert isinstance(cli.model, Ensemble) and cli.model.hparams.in_channels == 1  # linked from the data
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(single_acc)
    cli = cli_main(["predict", "--model", "Ensemble", "--model.checkpoints", "[" + ",".join(plain_checkpoints) + "]",
                    "--model.module_class", "lightning_modules.Supervised", "--model.mode", "vote",
                    *_cli_args(tmp_path)])
    out = cli.trainer.predict_loop.predictions
    assert sum(len(o["prediction"]) for o in out) == 450 and set(out[0]) == {"index", "probs", "prediction"}


def test_clear_errors(plain_checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.ckpt"):
        Ensemble([plain_checkpoints[0], str(tmp_path / "no_such.ckpt")], num_classes=10, in_channels=1,
                 module_class=SUPERVISED)
    with pytest.raises(ValueError, match="does not record its LightningModule class.*module_class"):
        Ensemble(plain_checkpoints[1:2], num_classes=10, in_channels=1)  # saved by a plain Trainer
    with pytest.raises(ValueError, match="num_classes=10, but the ensemble expects num_classes=100"):
        Ensemble(plain_checkpoints[:1], num_classes=100, in_channels=1, module_class=SUPERVISED)
    with pytest.raises(ValueError, match="mode must be"):
        Ensemble(plain_checkpoints[:1], mode="median", num_classes=10, in_channels=1, module_class=SUPERVISED)
    ensemble = Ensemble(plain_checkpoints[:1], num_classes=10, in_channels=1, module_class=SUPERVISED)
    with pytest.raises(RuntimeError, match="does not train.*validate, test or predict"):
        _trainer(tmp_path, max_steps=1).fit(ensemble, datamodule=_data())

"""MutualLearning: every peer learns, from the labels and from the others' detached predictions."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import MutualLearning
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer
from train import cli_main


def test_losses_match_deep_mutual_learning_for_three_peers():
    torch.manual_seed(0)
    model = MutualLearning(peer_networks=["wrn10_1", "wrn16_1"], temperature=2.0, dml_weight=0.5, **SMALL_NET)
    batch = digits_batch(model)
    model.eval()  # fixed BatchNorm, so the peers' logits can be recomputed
    losses = model.compute_losses(batch)
    images, targets = batch["labeled"]["image"], batch["labeled"]["target"]
    logits = [peer(images) for peer in model.all_peers]
    for k, z_k in enumerate(logits):
        others = [z for j, z in enumerate(logits) if j != k]
        kl = [4 * F.kl_div(F.log_softmax(z_k / 2, 1), F.softmax(z_j / 2, 1), reduction="batchmean") for z_j in others]
        torch.testing.assert_close(losses[f"peer{k}_dml"], sum(kl) / 2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses[f"peer{k}_ce"], F.cross_entropy(z_k, targets), rtol=1e-4, atol=1e-6)
    expected = losses["labeled_loss"] + 0.5 * losses["dml_loss"]
    torch.testing.assert_close(model.total_loss(losses), expected)


def test_every_peer_is_updated_and_tested():
    torch.manual_seed(0)
    model = MutualLearning(**SMALL_NET)
    before = [[p.detach().clone() for p in peer.parameters()] for peer in model.all_peers]
    trainer = make_trainer(max_steps=3)
    dm = DigitsSSL(num_labeled=100, batch_size=16, steps_per_epoch=3)
    trainer.fit(model, dm)
    for old, peer in zip(before, model.all_peers):
        assert all(not torch.equal(a, b) for a, b in zip(old, peer.parameters()))
    trainer.test(model, dm, verbose=False)
    for key in ("test/acc", "test/peer0_acc", "test/peer1_acc", "test/ensemble_acc"):
        assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0


def test_mutual_learning_runs_from_the_cli(tmp_path):
    cli = cli_main(["fit", "--model", "MutualLearning", "--model.network", "wrn10_1",
                    "--model.peer_networks", "[wrn10_1]", "--model.distill_unlabeled", "true",
                    "--data", "DigitsSSL", "--data.num_labeled", "100", "--data.batch_size", "16",
                    "--data.steps_per_epoch", "2", "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--trainer.log_every_n_steps", "1"])
    assert "test/peer1_acc" in cli.trainer.callback_metrics  # test_after_fit ran
    logged = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "train/dml_loss" in logged and "train/peer1_ce" in logged

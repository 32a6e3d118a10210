"""D2L (Ma et al., 2018): the LID estimate, the turning point and alpha against the authors' code, the bootstrapped
target, and its state through a real fit and a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits

from datamodules import DigitsSSL
from lightning_modules import Supervised
from lightning_modules.classification.criteria import build_criterion
from lightning_modules.classification.d2l import lid_mle
from tests.ssl_helpers import make_trainer


def test_lid_matches_reference_mle_batch():
    """xingjunm/dimensionality-driven-learning util.py:74-92 (mle_batch), written out in numpy on real digits."""
    data = load_digits().data[:128].astype(np.float32)
    k = 20
    a = np.sort(cdist(data, data), axis=1)[:, 1:k + 1]
    expected = np.array([-k / np.sum(np.log(v / v[-1] + 1e-8)) for v in a])
    torch.testing.assert_close(lid_mle(torch.from_numpy(data), k), torch.from_numpy(expected).float(), rtol=1e-4, atol=1e-4)


def reference_schedule(lids, epochs, init_epoch, epoch_win):
    """callback_util.py:63-85 in plain Python: the turning epoch and alpha after each recorded epoch."""
    turning, alphas = -1, []
    for n in range(1, len(lids) + 1):
        seen = lids[:n]
        if len(seen) > init_epoch + epoch_win and turning < 0:
            window = seen[-epoch_win - 1:-1]
            if seen[-1] - np.mean(window) > 2 * np.std(window):
                turning = len(seen) - 2
        alphas.append(math.exp(-(n / epochs) * seen[-1] / min(seen)) if turning > -1 else 1.0)
    return turning, alphas


def test_d2l_turning_point_and_alpha_match_reference():
    lids = [14.0, 12.0, 10.5, 9.6, 9.0, 8.7, 8.5, 8.45, 8.4, 8.42, 8.38, 9.4, 10.3, 11.0]  # falls, then turns up
    criterion = build_criterion("d2l", 10, epochs=20, init_epochs=4, window=4)
    turning, alphas = reference_schedule(lids, 20, 4, 4)
    assert turning == 10
    for lid, alpha in zip(lids, alphas):
        criterion.update_(torch.tensor([lid, lid]))  # two batches of this LID
        criterion.epoch_end()
        assert float(criterion.alpha) == pytest.approx(alpha, rel=1e-6)
    assert int(criterion.turning_epoch) == turning


def test_d2l_loss_is_ce_then_the_bootstrapped_target():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 10), torch.randint(0, 10, (16,))
    criterion = build_criterion("d2l", 10, epochs=10)
    torch.testing.assert_close(criterion(logits, targets), F.cross_entropy(logits, targets))
    criterion.alpha.fill_(0.3)
    target = 0.3 * F.one_hot(targets, 10) + 0.7 * F.one_hot(logits.argmax(dim=1), 10)  # loss.py:139-144
    torch.testing.assert_close(criterion(logits, targets), -(target * logits.log_softmax(dim=1)).sum(dim=1).mean())


def test_d2l_records_each_epoch_through_a_fit_and_its_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Supervised(network="wrn10_1", num_classes=10, in_channels=1, criterion="d2l",
                       criterion_kwargs={"epochs": 3, "init_epochs": 0, "window": 2}, network_kwargs={"bn_momentum": 0.1})
    trainer = make_trainer(max_epochs=3, default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=None, batch_size=32, steps_per_epoch=3))
    criterion = model.task.criterion
    assert int(criterion.recorded) == 3 and bool((criterion.lids > 0).all())
    trainer.save_checkpoint(tmp_path / "d2l.ckpt")
    restored = Supervised.load_from_checkpoint(tmp_path / "d2l.ckpt", weights_only=False)
    for name, value in criterion.state_dict().items():
        assert torch.equal(restored.task.criterion.state_dict()[name], value), name


def test_d2l_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="epochs >= 1"):
        build_criterion("d2l", 10, epochs=0)

"""Mean Teacher and VAT at least match the supervised baseline on digits (issue 14 item 13).

The quickstart's recipe (50 labels, ``wrn10_1``, 1,000 steps, EMA 0.99) for the supervised run and
for each method, with the method's own defaults and the ramp-up shortened to 40 % of the run. At
500 steps Mean Teacher still trails (86.2 % against 88.9 %, seed 0): its teacher lags the student by
about 1 / (1 - 0.99) = 100 steps and the weight is fully on only from step 200. Before issue 14, Mean Teacher's eval-mode teacher
collapsed training (30 % test accuracy at 1,000 steps, docs/results.md) and VAT's direction came
from a BatchNorm mismatch rather than from the random start.
"""

import functools

import lightning as L
import pytest

from datamodules import DigitsSSL
from lightning_modules import MeanTeacher, Supervised, VAT

STEPS = 1000
MARGIN = 0.01  # about 4 of the 450 test images: seed noise, not a method's gain or loss


def _test_accuracy(method, seed: int, **kwargs) -> float:
    L.seed_everything(seed, verbose=False)
    dm = DigitsSSL(num_labeled=50, batch_size=32, uratio=7, steps_per_epoch=STEPS, seed=seed)
    model = method(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1},
                   ema_decay=0.99, lr=0.03, **kwargs)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    return trainer.test(model, dm, verbose=False)[0]["test/acc"]


@functools.cache
def _supervised_accuracy(seed: int) -> float:
    return _test_accuracy(Supervised, seed)


# The recipes' weights spelled out, so that the test keeps checking them should the defaults change.
@pytest.mark.parametrize("method, weight", [(MeanTeacher, 50.0), (VAT, 0.3)], ids=["MeanTeacher", "VAT"])
def test_consistency_method_matches_supervised_on_digits(method, weight, one_thread):
    supervised = _supervised_accuracy(0)
    accuracy = _test_accuracy(method, seed=0, unlabeled_loss_weight=weight, rampup_steps=int(0.4 * STEPS))
    print(f"Supervised {supervised:.4f}, {method.__name__} {accuracy:.4f}")
    assert accuracy >= supervised - MARGIN, (supervised, accuracy)

"""The EMA callback with a real Trainer on scikit-learn's digits, on the CPU."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, RandomSampler

from callbacks import EMA, EMAModel, ema_weights_from_checkpoint
from datamodules import DigitsSSL
from lightning_modules import Supervised
from tests.ssl_helpers import WeightTrajectory


def _model(**kwargs) -> Supervised:
    L.seed_everything(0, verbose=False)
    kwargs.setdefault("ema_decay", None)  # one EMA per model: the callback's
    return Supervised(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1},
                      **kwargs)


def _data(steps_per_epoch: int = 4) -> DigitsSSL:
    return DigitsSSL(num_labeled=50, batch_size=16, steps_per_epoch=steps_per_epoch)


def _trainer(callbacks, max_steps: int, val: bool = False, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=kwargs.pop("enable_checkpointing", False), deterministic=True,
                     num_sanity_val_steps=0, limit_val_batches=1 if val else 0, **kwargs)


def _tensors(module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*module.parameters(), *module.buffers())]


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_ema_equals_an_emamodel_updated_by_hand_along_the_same_trajectory(buffers):
    model, record = _model(), WeightTrajectory()
    ema = EMA(decay=0.9, warmup_power=0.75, buffers=buffers)
    _trainer([record, ema], max_steps=5).fit(model, datamodule=_data())
    assert ema.ema.num_updates == 5 and len(record.states) == 6

    replay = _model()
    replay.load_state_dict(record.states[0])
    by_hand = EMAModel(replay, decay=0.9, warmup_power=0.75, buffers=buffers)
    for state in record.states[1:]:
        replay.load_state_dict(state)
        by_hand.update(replay)
    _assert_bitwise(_tensors(ema.ema.module), _tensors(by_hand.module))
    # and not simply the last weights
    assert not torch.equal(ema.ema.module.net.fc.weight, model.net.fc.weight)


def test_one_update_per_optimizer_step_with_gradient_accumulation():
    ema = EMA(decay=0.9)
    trainer = _trainer([ema], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(_model(), datamodule=_data(steps_per_epoch=6))
    assert trainer.global_step == 3 and ema.ema.num_updates == 3

    every_other = EMA(decay=0.9, update_every_n_steps=2, start_step=1)
    _trainer([every_other], max_steps=5).fit(_model(), datamodule=_data(steps_per_epoch=5))
    assert every_other.ema.num_updates == 2  # after steps 2 and 4


class _Probe(L.Callback):
    """Sees the weights the validation loop runs with, and the raw weights around it."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.raw_before, self.during = ema, None, None

    def on_validation_start(self, trainer, pl_module) -> None:  # runs before EMA's (list order)
        self.raw_before = _tensors(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.during = _tensors(pl_module)


def _val_loss_by_hand(module, datamodule) -> torch.Tensor:
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.val_dataloader())), 0)
    module.eval()
    with torch.no_grad():
        return F.cross_entropy(module(batch["image"]), batch["target"])


def test_validation_runs_with_ema_weights_and_restores_raw_weights_bitwise():
    model, data = _model(), _data(steps_per_epoch=3)
    ema = EMA(decay=0.5)
    probe = _Probe(ema)
    trainer = _trainer([probe, ema], max_steps=3, val=True)
    trainer.fit(model, datamodule=data)
    assert probe.during is not None and ema.ema.num_updates == 3
    _assert_bitwise(probe.during, _tensors(ema.ema.module))  # EMA weights inside validation
    _assert_bitwise(_tensors(model), probe.raw_before)  # raw weights back, bitwise
    assert not ema.swapped

    logged = trainer.callback_metrics["val/loss"]
    torch.testing.assert_close(logged, _val_loss_by_hand(ema.ema.module, data))
    assert not torch.allclose(logged, _val_loss_by_hand(model, data))  # the raw weights give another loss

    # test after fit also uses the average, and restores the raw weights
    raw = _tensors(model)
    trainer.test(model, datamodule=data, verbose=False)
    _assert_bitwise(probe.during, _tensors(ema.ema.module))
    _assert_bitwise(_tensors(model), raw)


def test_no_swap_before_the_first_update():
    model, data = _model(), _data(steps_per_epoch=2)
    ema = EMA(decay=0.5, start_step=100)
    probe = _Probe(ema)
    trainer = _trainer([probe, ema], max_steps=2, val=True)
    trainer.fit(model, datamodule=data)
    assert ema.ema.num_updates == 0
    _assert_bitwise(probe.during, probe.raw_before)
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], _val_loss_by_hand(model, data))


class _SaveDuringValidation(L.Callback):
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint("during_val.ckpt")


def test_checkpoint_saved_while_swapped_holds_raw_weights_and_the_ema_state():
    model = _model()
    ema = EMA(decay=0.5)
    trainer = _trainer([ema, _SaveDuringValidation()], max_steps=2, val=True)
    trainer.fit(model, datamodule=_data(steps_per_epoch=2))
    ckpt = torch.load("during_val.ckpt", map_location="cpu", weights_only=False)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt["state_dict"].keys() == raw.keys()
    for k in raw:
        assert torch.equal(ckpt["state_dict"][k], raw[k]), k
    exported = ema_weights_from_checkpoint("during_val.ckpt")
    for k, v in ema.ema.module.state_dict().items():
        assert torch.equal(exported[k], v), k
    assert ckpt["callbacks"]["EMA"]["ema"]["num_updates"] == 2
    restored = _model()
    restored.load_state_dict(exported)
    _assert_bitwise(_tensors(restored), _tensors(ema.ema.module))

    # a strategy that hands over copies of the (swapped-in) weights: rebuilt from the raw weights
    raw_tensors = _tensors(model)
    ema.on_validation_start(trainer, model)
    copied = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    ema.on_save_checkpoint(trainer, model, copied)
    for k in raw:
        assert torch.equal(copied["state_dict"][k], raw[k]), k
    assert ema.swapped
    _assert_bitwise(_tensors(model), _tensors(ema.ema.module))
    ema.on_validation_end(trainer, model)
    _assert_bitwise(_tensors(model), raw_tensors)


class _EpochSeeded(RandomSampler):
    """The sampler and the augmentations draw from torch's global RNG, which a checkpoint does not
    keep, and on a resume Lightning creates the loader's iterator before ``set_epoch`` and skips
    ``on_train_epoch_start``. Seeding when the sampler starts yielding (the first fetch of the
    epoch, on both paths) makes epoch k's order and augmentations the same with and without a resume."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        torch.manual_seed(1000 + self.epoch)
        yield from super().__iter__()


class _EpochSeededDigits(DigitsSSL):
    def _stream(self, dataset, batch_size, stream):
        loader = super()._stream(dataset, batch_size, stream)
        sampler = _EpochSeeded(dataset, num_samples=len(loader.sampler))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)


def _seeded_data() -> DigitsSSL:
    return _EpochSeededDigits(num_labeled=50, batch_size=16, steps_per_epoch=4)


def test_stop_and_resume_is_bitwise_identical_to_an_uninterrupted_fit():
    # cosine_fraction=0 keeps the learning rate constant, so the schedule does not depend on max_steps.
    # The checkpoint is ModelCheckpoint's at step 4 (the last batch of epoch 0), as a run that is
    # killed would leave it. (Trainer.save_checkpoint after a fit stopped by max_steps records the
    # epoch as unfinished, and Lightning then resumes it at batch 4: another data order.)
    kwargs = dict(decay=0.8, warmup_power=0.75)
    full_model, full_ema = _model(cosine_fraction=0.0), EMA(**kwargs)
    _trainer([full_ema], max_steps=8).fit(full_model, datamodule=_seeded_data())

    saver = ModelCheckpoint(dirpath="ckpts", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    first_model, first_ema = _model(cosine_fraction=0.0), EMA(**kwargs)
    _trainer([first_ema, saver], max_steps=4, enable_checkpointing=True).fit(
        first_model, datamodule=_seeded_data())
    ckpt = torch.load("ckpts/step=4.ckpt", map_location="cpu", weights_only=False)
    for k, v in first_model.state_dict().items():  # the checkpoint's state_dict holds the raw weights
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["callbacks"]["EMA"]["ema"]["num_updates"] == 4

    resumed_model, resumed_ema = _model(cosine_fraction=0.0), EMA(**kwargs)
    resumed = _trainer([resumed_ema], max_steps=8)
    resumed.fit(resumed_model, datamodule=_seeded_data(), ckpt_path="ckpts/step=4.ckpt")
    assert resumed.global_step == 8 and resumed_ema.ema.num_updates == full_ema.ema.num_updates == 8
    _assert_bitwise(_tensors(resumed_model), _tensors(full_model))
    _assert_bitwise(_tensors(resumed_ema.ema.module), _tensors(full_ema.ema.module))


def test_cli_selects_the_callback_by_name():
    from train import cli_main

    cli = cli_main(["fit", "--model", "Supervised", "--data", "DigitsSSL", "--model.network", "wrn10_1",
                    "--model.ema_decay", "null",  # one EMA per model: the callback's alone
                    "--trainer.max_steps", "2", "--trainer.callbacks+=EMA", "--trainer.callbacks.decay", "0.9",
                    "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
                    "--data.steps_per_epoch", "2"])
    found = [c for c in cli.trainer.callbacks if isinstance(c, EMA)]
    assert len(found) == 1 and found[0].decay == 0.9 and found[0].ema.num_updates == 2


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="update_every_n_steps"):
        EMA(update_every_n_steps=0)
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=2.0)
    with pytest.raises(ValueError, match="buffers"):
        EMA(buffers="mean")


def test_two_ema_owners_are_refused_through_the_cli_naming_the_fix(tmp_path):
    """A recipe whose model keeps its own EMA (the quickstart's FixMatch, ema_decay 0.99) plus the EMA
    callback: refused before a step is taken (main trained both, evaluated the model's own copy and
    checkpointed the callback's, unused). Mean Teacher's teacher is its EMA, so only the callback can go."""
    from train import RECIPES, cli_main

    quiet = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2", "--data.steps_per_epoch", "2"]
    with pytest.raises(ValueError, match=r"^FixMatch already keeps an EMA of its weights \(ema_decay=0\.99\) .*: drop "
                                         r"--trainer.callbacks EMA or pass --model.ema_decay null"):
        cli_main(["fit", "--config", str(RECIPES / "quickstart.yaml"), "--trainer.callbacks+=EMA", *quiet])
    assert not list(tmp_path.rglob("*.ckpt"))
    with pytest.raises(ValueError, match=r"^MeanTeacher already keeps an EMA .*\(ema_decay=0\.999\).*: drop "
                                         r"--trainer.callbacks EMA \(MeanTeacher's teacher is that EMA"):
        cli_main(["fit", "--model", "MeanTeacher", "--data", "DigitsSSL", "--model.network", "wrn10_1",
                  "--trainer.callbacks+=EMA", *quiet])
    # validate/test/predict too: with both, the callback's average would never be what is evaluated
    with pytest.raises(ValueError, match="already keeps an EMA"):
        _trainer([EMA()], max_steps=1, val=True).validate(_model(ema_decay=0.9), datamodule=_data())


def test_one_owner_either_way_trains_as_before():
    """The base's EMA alone and the callback's alone are untouched by the refusal: each equals an EMAModel
    updated by hand along the run's weights (the callback's case is the trajectory test above)."""
    model, record = _model(ema_decay=0.9), WeightTrajectory()
    _trainer([record], max_steps=3).fit(model, datamodule=_data())
    by_hand = EMAModel(model.net, decay=0.9)
    replay = _model()
    for i, state in enumerate(record.states):
        replay.load_state_dict(state)
        by_hand.restart(replay.net) if i == 0 else by_hand.update(replay.net)
    assert model.ema.num_updates == 3
    _assert_bitwise(_tensors(model.ema.module), _tensors(by_hand.module))


def test_the_state_key_is_the_one_core_reads():
    """Lightning keys the callback's checkpoint state by its class name; core's ema_callback_states (which the
    soup reads) looks for that key, so old checkpoints of the callback keep being found."""
    from lightning_modules.core.ema import EMA_CALLBACK_KEY

    assert EMA().state_key == EMA_CALLBACK_KEY == "EMA"

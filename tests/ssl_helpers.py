"""Helpers the method and callback tests share: a quiet Trainer, one real digits batch, and a
callback that records the weights after every optimizer step."""

from __future__ import annotations

import copy

import lightning as L
import torch

from datamodules import DigitsSSL

# A network small enough for CPU tests, with BatchNorm statistics that move within a few steps.
SMALL_NET = dict(num_classes=10, in_channels=1, network="wrn10_1", network_kwargs={"bn_momentum": 0.1})


def make_trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**defaults, **kwargs})


def digits_batch(model, num_labeled=50, batch_size=8, uratio=2, return_datamodule=False):
    """One augmented training batch of real digits with the views ``model`` asks for."""
    dm = DigitsSSL(num_labeled=num_labeled, batch_size=batch_size, uratio=uratio, steps_per_epoch=1,
                   unlabeled_views=list(model.unlabeled_views))
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    batch = dm.on_after_batch_transfer(raw, 0)
    return (batch, dm) if return_datamodule else batch


def spread_confidences(model, scale=10.0, bias=True):
    """An untrained network predicts near-uniformly; scaling its classifier spreads the confidences across
    the thresholds, as partly trained weights do, so that masks keep some rows and drop others."""
    with torch.no_grad():
        model.net.fc.weight.mul_(scale)
        if bias:
            model.net.fc.bias.mul_(scale)
    return model


def step_and_reference_logits(model, batch):
    """The module's losses and total loss on ``batch``, and the logits a copy of its network taken before
    that step gives in USB's ``use_cat`` forward (one pass over labeled, weak and strong images, no
    gradient): the reference side of a train-step test."""
    net = copy.deepcopy(model.net)
    losses = model.compute_losses(batch)
    total = model.total_loss(losses)
    labeled = batch["labeled"]["image"]
    with torch.no_grad():
        logits = net(torch.cat((labeled, batch["unlabeled"]["weak"], batch["unlabeled"]["strong"])))
    weak, strong = logits[len(labeled):].chunk(2)
    return losses, total, (logits[: len(labeled)], weak, strong)


class WeightTrajectory(L.Callback):
    """Records the module's state at fit start and after every optimizer step (list it before a
    callback that changes the weights at the end of a step, e.g. EMA, to see the raw weights)."""

    def __init__(self) -> None:
        self.states, self.seen = [], 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.states.append(copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.seen:
            self.seen = trainer.global_step
            self.states.append(copy.deepcopy(pl_module.state_dict()))

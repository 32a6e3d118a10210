"""Ensembling predictor: several trained checkpoints evaluated as one classifier.

Usage from the command line (no training; ``validate``, ``test`` or ``predict``)::

    python train.py test --model Ensemble --model.checkpoints '[a.ckpt,b.ckpt,c.ckpt]' --data DigitsSSL
    python train.py predict --model Ensemble --model.checkpoints '[a.ckpt,b.ckpt]' --model.mode vote --data DigitsSSL
"""

from __future__ import annotations

import contextvars
import importlib
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.core.checkpoint_loading import load_module, read_checkpoint


def _import_class(path: str) -> type:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"module_class {path!r} is not an import path such as 'lightning_modules.Supervised'")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r} ({err}): give the full import path of a LightningModule") from err
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ValueError(f"{path!r} is not a LightningModule class")
    return cls


def load_member(path: str | Path, module_class: str | None = None) -> LightningModule:
    """Load a Lightning checkpoint of any module of this collection, on CPU, read as data
    (:mod:`lightning_modules.core.checkpoint_loading`).

    The class comes from the checkpoint's ``_class_path`` hyperparameter (written by
    ``LightningCLI`` in subclass mode, i.e. by ``train.py``), else from ``module_class``.
    """
    checkpoint = read_checkpoint(path, "ensemble checkpoint", mmap=True)  # the class path only: tensors unread
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path") or module_class
    if class_path is None:
        raise ValueError(
            f"{path} does not record its LightningModule class (it was not saved by train.py's LightningCLI): "
            f"pass --model.module_class, e.g. lightning_modules.Supervised"
        )
    cls = _import_class(class_path)
    # LightningCLI hands its own hyper-parameters to every module created while it instantiates the
    # Ensemble (a context variable); an empty context lets each member record its own.
    return contextvars.Context().run(load_module, cls, path)


class Ensemble(LightningModule):
    """Combines the eval outputs of several trained checkpoints; it does not train.

    Each member is evaluated through its ``eval_net`` when it has one (the EMA weights of the
    methods in this collection), else through the module itself.

    Args:
        checkpoints: Lightning checkpoint paths, at least one; the same path may appear twice.
        mode: ``"mean"`` averages the members' softmax probabilities and predicts their argmax;
            ``"vote"`` predicts the class most members' argmax chose, ties broken by the mean
            probability. In both modes ``predict`` returns the mean probabilities as ``probs``.
        num_classes: classes of the data (linked from the DataModule by ``train.py``); every
            checkpoint must have been trained for this many.
        in_channels: image channels (linked from the DataModule); checked against the checkpoints.
        module_class: import path of the members' class, for checkpoints that do not record it
            (saved by a plain ``Trainer`` rather than ``train.py``).
    """

    #: no unlabeled stream: the ensemble never trains
    unlabeled_views: tuple[str, ...] = ()
    #: its weights are the members' trained ones (train.py evaluates it without --ckpt_path)
    has_trained_weights = True

    @property
    def evaluation_weights(self) -> str:
        """Which weights it evaluates, in words (``train.py`` prints it after a run)."""
        return f"{self.hparams.mode} of {len(self.members)} checkpoints' evaluation weights"

    def __init__(
        self,
        checkpoints: list[str],
        mode: Literal["mean", "vote"] = "mean",
        num_classes: int = 10,
        in_channels: int = 3,
        module_class: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("mean", "vote"):
            raise ValueError(f"mode must be 'mean' or 'vote', got {mode!r}")
        if not checkpoints:
            raise ValueError("checkpoints is empty: give at least one checkpoint path")
        self.save_hyperparameters()
        nets = []
        for path in checkpoints:
            member = load_member(path, module_class)
            hp = member.hparams
            for name, expected in (("num_classes", num_classes), ("in_channels", in_channels)):
                if name in hp and hp[name] != expected:
                    raise ValueError(
                        f"checkpoint {path} was trained with {name}={hp[name]}, but the ensemble expects "
                        f"{name}={expected} (from the data): ensemble only checkpoints of this data set"
                    )
            net = getattr(member, "eval_net", None)
            nets.append(net if isinstance(net, nn.Module) else member)
        # A ModuleList so the members follow the ensemble across devices; frozen and always in eval mode.
        self.members = nn.ModuleList(nets).requires_grad_(False).eval()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def train(self, mode: bool = True) -> Ensemble:
        super().train(mode)
        self.members.eval()  # BatchNorm statistics and dropout stay frozen whatever the trainer asks
        return self

    # --- combining -------------------------------------------------------------------------
    @torch.no_grad()
    def member_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of every member, ``(members, batch, classes)``."""
        return torch.stack([torch.softmax(net(images).float(), dim=1) for net in self.members])

    @staticmethod
    def combine(probs: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean probabilities, prediction)`` from the members' probabilities ``(M, B, C)``."""
        mean = probs.mean(dim=0)
        if mode == "mean":
            return mean, mean.argmax(dim=1)
        votes = F.one_hot(probs.argmax(dim=2), probs.shape[2]).sum(dim=0)  # (B, C)
        tied = votes == votes.max(dim=1, keepdim=True).values
        return mean, mean.masked_fill(~tied, -1.0).argmax(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Mean probabilities ``(batch, classes)`` (the ensemble's output in both modes)."""
        return self.member_probs(images).mean(dim=0)

    # --- evaluation ------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        mean, prediction = self.combine(self.member_probs(batch["image"]), self.hparams.mode)
        metric.update(prediction, batch["target"])
        loss = F.nll_loss(mean.clamp_min(1e-12).log(), batch["target"])
        self.log(f"{stage}/loss", loss, batch_size=len(prediction))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=len(prediction))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        mean, prediction = self.combine(self.member_probs(batch["image"]), self.hparams.mode)
        return {"index": batch["index"], "probs": mean, "prediction": prediction}

    # --- no training -----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.training_step()

    def training_step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "Ensemble does not train: fit its members, then run validate, test or predict with "
            "--model Ensemble --model.checkpoints '[a.ckpt,b.ckpt]'"
        )

    def configure_optimizers(self) -> None:
        return None

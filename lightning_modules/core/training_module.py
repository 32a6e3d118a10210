"""The task-neutral training core every method builds on.

It owns what methods share whatever the task: the network (built by the ``build_net`` hook), SGD with
Nesterov momentum and FixMatch's cosine schedule, an EMA copy of the weights used for validation, test and
predict, the finite-loss check, logging, and the commit of running state once per optimizer step
(:mod:`lightning_modules.core.step_state`). What the labeled loss, evaluation and prediction are is the
*task* the module is given by its ``build_task`` hook (:mod:`lightning_modules.core.task`): classification
(``lightning_modules.classification.semi_supervised.SemiSupervisedModule`` is this core with a
``ClassificationTask``), segmentation or detection. A method subclass says only what makes it different: the
unlabeled views it needs (``unlabeled_views``) and its ``unlabeled_loss``; a method whose forward is not a
plain pass over the views (MixMatch's mixup, a detector) overrides ``compute_losses``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from lightning_modules.core.data_contract import ModelDataContract
from lightning_modules.core.distributed import average_batchnorm_statistics, check_full_parameters
from lightning_modules.core.ema import EMAModel
from lightning_modules.core.fast_path import FastForward, FastPath
from lightning_modules.core.optimization import RAMPUPS, OptimizerRecipe, scheduled_regularizers, set_training_progress
from lightning_modules.core.progress_values import HostValues
from lightning_modules.core.step_state import StepState
from lightning_modules.core.task import Task
from lightning_modules.core.training_checks import FiniteLossCheck, check_model_fits_data


class TrainingModule(ModelDataContract, OptimizerRecipe, FastForward, LightningModule):
    """Shared training, evaluation and optimization for every method, given its task.

    Its side of the model-data contract (``unlabeled_views``, ``data_facts``; the batch contract is
    ``task.name``) is :class:`ModelDataContract`. Subclasses implement :meth:`build_net` and :meth:`build_task`.

    Args:
        num_classes: classes of the data (linked from the DataModule by ``train.py``).
        in_channels: image channels (linked from the DataModule by ``train.py``).
        network: the network's name, read by the subclass's :meth:`build_net`.
        network_kwargs: extra arguments for the network constructor.
        lr, momentum, nesterov, weight_decay: SGD; weight decay skips biases and norm weights.
        cosine_fraction: ``lr = lr0 * cos(pi * cosine_fraction * k / K)``, 7/16 in FixMatch.
        warmup_steps: linear learning-rate warm-up steps.
        ema_decay: decay of the evaluation EMA; ``None`` evaluates the raw weights.
        unlabeled_loss_weight: lambda_u, the weight of the unlabeled loss.
        rampup: ramp lambda_u up from 0: ``"sigmoid"`` (exp(-5(1-t)^2)), ``"linear"`` or ``None``.
        rampup_steps: length of the ramp-up in optimizer steps.
        concat_forward: one forward over labeled and unlabeled images together (BatchNorm sees
            the whole step's batch, as in FixMatch) instead of one forward per view; methods with
            ``supports_concat_forward = False`` (VAT) refuse it.
        channels_last, compile, compile_mode, no_grad_target_views: the fast path (:mod:`lightning_modules.core.fast_path`).
    """

    #: whether the method may forward its views together (``concat_forward=True``)
    supports_concat_forward: bool = True

    #: DropBlock-like regularizers told the training progress before each step; found at fit start
    scheduled_regularizers: list[nn.Module] | tuple = ()

    #: labeled views (of ``labeled_views``) whose labeled loss is averaged with the image's (DeFixMatch: ``("strong",)``)
    labeled_loss_views: tuple[str, ...] = ()

    #: the step's terms shown in the progress bar beside the total loss, when the method logs them
    progress_bar_terms: tuple[str, ...] = ("mask_ratio",)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        network: str = "wrn28_2",
        network_kwargs: dict[str, Any] | None = None,
        lr: float = 0.03,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        cosine_fraction: float = 7 / 16,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        unlabeled_loss_weight: float = 1.0,
        rampup: str | None = None,
        rampup_steps: int = 0,
        concat_forward: bool = True,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        no_grad_target_views: bool = False,
    ) -> None:
        super().__init__()
        if rampup is not None and rampup not in RAMPUPS:
            raise ValueError(f"rampup must be one of {sorted(RAMPUPS)} or None, got {rampup!r}")
        self.save_hyperparameters()
        self.net = self.build_net()
        self.fast_path = FastPath(self)  # core/fast_path.py; before the EMA copies the network
        self.task = self.build_task()
        for name, piece in self.task.modules().items():  # under their own names: checkpoint keys, logged metrics
            self.add_module(name, piece)
        # A plain attribute, not a submodule: DDP never wraps it and it gets no gradient.
        self.ema = EMAModel(self.net, decay=ema_decay) if ema_decay is not None else None
        self.finite_loss_check = FiniteLossCheck()  # stops at a NaN/inf loss, naming the term and step
        self.progress_values = HostValues()  # the progress bar's values, read without a GPU sync
        self.step_state = StepState()  # running state: proposed by the loss, committed after the optimizer step

    def build_net(self) -> nn.Module:
        """The trained network, from the ``network`` hyper-parameters."""
        raise NotImplementedError(f"{type(self).__name__} must build its network in build_net()")

    def build_task(self) -> Task:
        """The task (labeled loss, evaluation, prediction), built after the network (``self.net`` exists)."""
        raise NotImplementedError(f"{type(self).__name__} must return its task from build_task() (core/task.py)")

    # --- forward ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    @property
    def eval_net(self) -> nn.Module:
        """The weights used for validation, test and predict: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.net

    @property
    def evaluation_weights(self) -> str:
        """Which weights validation, test and predict use, in words (``train.py`` prints it after a run)."""
        if self.ema is None:
            return "raw weights"
        return f"EMA weights (decay {self.ema.decay}, {self.ema.num_updates} updates)"

    # --- training --------------------------------------------------------------------------
    def labeled_loss(self, logits: Any, targets: Any) -> torch.Tensor:
        """The task's labeled loss (a criterion with running state proposes it through ``step_state``)."""
        return self.task.labeled_loss(logits, targets, self.step_state)

    def unlabeled_loss(self, logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``{"unlabeled_loss": ..., <diagnostics>...}`` from the logits of each unlabeled view."""
        raise NotImplementedError(f"{type(self).__name__} lists unlabeled views but defines no unlabeled_loss")

    def unlabeled_weight(self) -> float:
        """lambda_u at the current optimizer step, ramped up when ``rampup`` is set."""
        weight = self.hparams.unlabeled_loss_weight
        if self.hparams.rampup is not None:
            weight *= RAMPUPS[self.hparams.rampup](self.global_step, self.hparams.rampup_steps)
        return weight

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One forward over the labeled image (``labeled_passes`` times), the ``labeled_views`` and the
        ``unlabeled_views``; the labeled loss averaged over the passes and ``labeled_loss_views``; the rest to
        :meth:`unlabeled_loss`, whose ``logits`` also hold the labeled logits: ``"labeled"`` (the first pass)
        and ``"labeled_<view>"`` per labeled view (AdaMatch's relative threshold, DeFixMatch's debiasing)."""
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        missing = [view for view in self.labeled_views if view not in labeled]
        if missing:
            places = ", ".join(f"batch['labeled'][{view!r}]" for view in missing)
            raise ValueError(f"{type(self).__name__} needs the view(s) {missing} of the labeled batch under {places}: "
                             "a classification DataModule makes them when the trainer's module names them in "
                             "labeled_views (for a hand-made batch, add them)")
        views = self.unlabeled_views if unlabeled is not None else ()
        passes, extra = self.task.labeled_passes, tuple(self.labeled_views)
        images = [labeled["image"]] * passes + [labeled[v] for v in extra] + [unlabeled[v] for v in views]
        no_grad = self.fast_path.no_grad_argument(passes + len(extra), views)  # {} unless no_grad_target_views
        logits = self.forward_views(images, **no_grad)
        labeled_logits, extra_logits, logits = (logits[:passes], logits[passes:passes + len(extra)],
                                                logits[passes + len(extra):])
        by_view = {f"labeled_{v}": x for v, x in zip(extra, extra_logits)}
        supervised = labeled_logits + [by_view[f"labeled_{v}"] for v in self.labeled_loss_views]
        loss = sum(self.labeled_loss(x, labeled["target"]) for x in supervised) / len(supervised)
        losses = {"labeled_loss": loss, **self.task.pass_losses(labeled_logits)}
        if views:
            losses.update(self.unlabeled_loss({"labeled": labeled_logits[0], **by_view,
                                               **dict(zip(views, logits))}, unlabeled))
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``labeled + lambda_u * unlabeled + sum_k w_k * term_k`` over the task's weighted terms present."""
        loss = losses["labeled_loss"]
        if "unlabeled_loss" in losses:
            loss = loss + self.unlabeled_weight() * losses["unlabeled_loss"]
        for name, weight in self.task.loss_weights.items():
            if name in losses:
                loss = loss + weight * losses[name]
        return loss

    def training_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """The step's total loss without logging, for callbacks' extra passes (FGM, PGD): it proposes no state."""
        with self.step_state.frozen():
            return self.total_loss(self.compute_losses(batch))

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        loss = self.total_loss(losses)
        self.finite_loss_check(loss, losses, self.global_step, self.current_epoch)
        logged = {f"train/{k}": v.detach() for k, v in losses.items()}
        logged["train/loss"] = loss.detach()
        batch_size = self.labeled_batch_size(batch)
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        shown = {"loss": loss, **{name: losses[name] for name in self.progress_bar_terms if name in losses}}
        self.log_dict(self.progress_values(shown), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                      batch_size=batch_size)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.scheduled_regularizers:
            # From the step count, so a resumed run, FGM's extra passes and every DDP rank see the same value.
            total = self.trainer.estimated_stepping_batches  # inf for an unbounded run: no schedule, progress 0
            set_training_progress(self.scheduled_regularizers, min(1.0, self.global_step / max(1.0, float(total))))

    def labeled_batch_size(self, batch: dict[str, dict[str, Any]]) -> int:
        """Labeled samples in a training batch (for logging)."""
        return len(batch["labeled"]["target"])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.step_state.commit()  # once per optimizer step, every micro-batch's proposals (core/step_state.py)
        average_batchnorm_statistics(self.trainable_modules())  # DDP: every rank, and so the EMA, agrees
        if self.ema is not None:
            self.ema.update(self.net)

    def on_train_end(self) -> None:
        self.finite_loss_check.flush()

    def on_train_epoch_end(self) -> None:
        self.task.train_epoch_end()

    # --- evaluation ------------------------------------------------------------------------
    def _sync_ema_device(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    on_validation_start = on_test_start = on_predict_start = _sync_ema_device

    def on_fit_start(self) -> None:
        self._sync_ema_device()
        self.scheduled_regularizers = scheduled_regularizers(self.net)  # DropBlock's ramp; usually none
        self.step_state.discard()  # proposals of losses computed before fit
        check_model_fits_data(self.hparams, self.trainer.datamodule)
        if self.ema is None:
            return
        check_full_parameters(self.trainer.strategy, type(self).__name__)
        if self.ema.num_updates == 0:
            # After DDP's broadcast of rank 0's weights (the copy made in __init__ holds this rank's own).
            self.ema.restart(self.net)

    # The task scores and predicts (core/task.py); the module hands it the stage.
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.task.evaluate(self, batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.task.evaluate(self, batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.task.predict(self, batch)

    def on_validation_epoch_start(self) -> None:
        self.task.evaluation_epoch_start(self, "val")

    def on_test_epoch_start(self) -> None:
        self.task.evaluation_epoch_start(self, "test")

    def on_validation_epoch_end(self) -> None:
        self.task.evaluation_epoch_end(self, "val")

    def on_test_epoch_end(self) -> None:
        self.task.evaluation_epoch_end(self, "test")

    # --- optimization: OptimizerRecipe (core/optimization.py) trains these ------------------
    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimizer trains: the network, plus the task's (a learnable criterion)."""
        return [self.net, *self.task.trainable_modules()]

    # --- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_loss_check.flush()  # never save weights from a step whose loss is still unchecked
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

"""The base every semi-supervised classifier (and the supervised baseline) builds on.

It owns what methods share: the network, the labeled loss, SGD with Nesterov momentum and FixMatch's
cosine schedule, an EMA copy of the weights used for validation, test and predict, logging, and the
commit of running state once per optimizer step (:mod:`lightning_modules.core.step_state`). A method
subclass says only what makes it different: the unlabeled views it needs (``unlabeled_views``) and its
``unlabeled_loss``; a method whose forward is not a plain pass over the views (MixMatch's mixup)
overrides ``compute_losses``. The labeled loss is a criterion by name
(:mod:`lightning_modules.classification.criteria`: label smoothing and its relatives, focal, OHEM, class
weights, multi-label BCE or sigmoid-F1); R-Drop adds a second dropout pass of the labeled batch with a
symmetric-KL penalty, for any method that uses the base's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score

# The classification task the base still is (docs/design.md, "Import rules": the one exception to core <- tasks)
from lightning_modules.classification.criteria import build_criterion
from lightning_modules.classification.label_regularization import symmetric_kl
from lightning_modules.classification.networks import build_network
from lightning_modules.core.data_contract import ModelDataContract
from lightning_modules.core.distributed import average_batchnorm_statistics, check_full_parameters
from lightning_modules.core.ema import EMAModel
from lightning_modules.core.fast_path import FastForward, FastPath
from lightning_modules.core.optimization import RAMPUPS, OptimizerRecipe
from lightning_modules.core.progress_values import HostValues
from lightning_modules.core.step_state import StepState
from lightning_modules.core.training_checks import FiniteLossCheck, check_model_fits_data


class SemiSupervisedModule(ModelDataContract, OptimizerRecipe, FastForward, LightningModule):
    """Shared training, evaluation and optimization for semi-supervised classifiers.

    Its side of the model-data contract (``task``, ``unlabeled_views``, ``data_facts``) is :class:`ModelDataContract`.

    Args:
        num_classes: classes of the data (linked from the DataModule by ``train.py``).
        in_channels: image channels (linked from the DataModule by ``train.py``).
        network: a name for :func:`lightning_modules.classification.networks.build_network` (``wrn28_2``,
            ``wrn28_8``, ``resnet18``, ``timm:<name>``, ...).
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
        criterion: the labeled loss by name (``ce``, ``label_smoothing``, ``online_label_smoothing``, ``disturb_label``,
            ``tfkd_reg``, ``knowledge_refinery``, ``focal``, ``ohem``, ``weighted_ce``; multi-label: ``bce``,
            ``sigmoid_f1``, which also switch evaluation to macro and micro F1).
        criterion_kwargs: arguments of the criterion (e.g. ``{"smoothing": 0.1}``).
        rdrop_weight: R-Drop (Liang et al., 2021): the labeled batch goes through the network
            twice (two dropout masks) and ``rdrop_weight * symmetric_kl`` of the two passes is
            added; 0 turns it off. Needs a network with dropout.
        channels_last, compile, compile_mode, no_grad_target_views: the fast path (:mod:`lightning_modules.core.fast_path`).
    """

    #: whether the method's labeled loss goes through ``criterion`` (mixup methods use soft targets)
    uses_criterion: bool = True
    #: whether the method trains through the base's ``compute_losses`` (needed by R-Drop)
    supports_rdrop: bool = True
    #: whether the method may forward its views together (``concat_forward=True``)
    supports_concat_forward: bool = True

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
        criterion: str = "ce",
        criterion_kwargs: dict[str, Any] | None = None,
        rdrop_weight: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        no_grad_target_views: bool = False,
    ) -> None:
        super().__init__()
        if rampup is not None and rampup not in RAMPUPS:
            raise ValueError(f"rampup must be one of {sorted(RAMPUPS)} or None, got {rampup!r}")
        if criterion != "ce" and not self.uses_criterion:
            raise ValueError(f"{type(self).__name__} trains on its own soft targets and ignores criterion="
                             f"{criterion!r}: leave criterion at 'ce' or pick a method that uses it")
        if rdrop_weight < 0 or (rdrop_weight > 0 and not self.supports_rdrop):
            raise ValueError(f"rdrop_weight={rdrop_weight} is not possible for {type(self).__name__}: it must be "
                             ">= 0, and R-Drop needs a method that trains through the base's forward")
        self.save_hyperparameters()
        self.net = self.build_net()
        self.fast_path = FastPath(self)  # core/fast_path.py; before the EMA copies the network
        self.criterion = build_criterion(criterion, num_classes, **(criterion_kwargs or {}))
        # A plain attribute, not a submodule: DDP never wraps it and it gets no gradient.
        self.ema = EMAModel(self.net, decay=ema_decay) if ema_decay is not None else None
        self.finite_loss_check = FiniteLossCheck()  # stops at a NaN/inf loss, naming the term and step
        self.progress_values = HostValues()  # the progress bar's values, read without a GPU sync
        self.step_state = StepState()  # running state: proposed by the loss, committed after the optimizer step
        self.val_acc, self.test_acc = self._metric(), self._metric()
        if self.multilabel:
            self.val_micro_f1 = MultilabelF1Score(num_classes, average="micro")
            self.test_micro_f1 = MultilabelF1Score(num_classes, average="micro")

    def build_net(self) -> nn.Module:
        """The trained network, from the ``network`` hyper-parameters (segmenters build theirs otherwise)."""
        hp = self.hparams
        return build_network(hp.network, num_classes=hp.num_classes, in_channels=hp.in_channels, **(hp.network_kwargs or {}))

    @property
    def multilabel(self) -> bool:
        """Sigmoid outputs and F1 metrics, set by a multi-label criterion (``bce``, ``sigmoid_f1``)."""
        return bool(getattr(self.criterion, "multilabel", False))

    def _metric(self) -> MulticlassAccuracy | MultilabelF1Score:
        num_classes = self.hparams.num_classes
        if self.multilabel:
            return MultilabelF1Score(num_classes, average="macro")
        return MulticlassAccuracy(num_classes, average="micro")

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
    def labeled_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.step_state.observe(self.criterion, logits, targets)  # a criterion's running state (online label smoothing)
        return self.criterion(logits, targets)

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
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        views = self.unlabeled_views if unlabeled is not None else ()
        passes = 2 if self.hparams.rdrop_weight > 0 else 1
        images = [labeled["image"]] * passes + [unlabeled[v] for v in views]
        logits = self.forward_views(images, **self.fast_path.no_grad_argument(passes, views))  # {} unless no_grad_target_views
        labeled_logits, logits = logits[:passes], logits[passes:]
        loss = sum(self.labeled_loss(x, labeled["target"]) for x in labeled_logits) / passes
        losses = {"labeled_loss": loss}
        if passes == 2:
            losses["rdrop_loss"] = symmetric_kl(*labeled_logits)
        if views:
            losses.update(self.unlabeled_loss(dict(zip(views, logits)), unlabeled))
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = losses["labeled_loss"]
        if "unlabeled_loss" in losses:
            loss = loss + self.unlabeled_weight() * losses["unlabeled_loss"]
        if "rdrop_loss" in losses:
            loss = loss + self.hparams.rdrop_weight * losses["rdrop_loss"]
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
        if hasattr(self.criterion, "epoch_end"):  # online label smoothing swaps in its epoch's soft labels
            self.criterion.epoch_end()

    # --- evaluation ------------------------------------------------------------------------
    def _sync_ema_device(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    on_validation_start = on_test_start = on_predict_start = _sync_ema_device

    def on_fit_start(self) -> None:
        self._sync_ema_device()
        self.step_state.discard()  # proposals of losses computed before fit
        check_model_fits_data(self.hparams, self.trainer.datamodule)
        if self.ema is None:
            return
        check_full_parameters(self.trainer.strategy, type(self).__name__)
        if self.ema.num_updates == 0:
            # After DDP's broadcast of rank 0's weights (the copy made in __init__ holds this rank's own).
            self.ema.restart(self.net)

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        logits = self.eval_net(batch["image"])
        if self.multilabel:
            self._evaluate_multilabel(logits, batch["target"], stage, metric)
            return
        metric.update(logits.argmax(dim=1), batch["target"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["target"]), batch_size=len(logits))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=len(logits))

    def _evaluate_multilabel(self, logits: torch.Tensor, targets: torch.Tensor, stage: str,
                             macro_f1: MultilabelF1Score) -> None:
        if targets.ndim == 1:  # single-label data scored as multi-hot
            targets = F.one_hot(targets, self.hparams.num_classes)
        micro_f1 = getattr(self, f"{stage}_micro_f1")
        macro_f1.update(logits, targets.long())
        micro_f1.update(logits, targets.long())
        size = len(logits)
        self.log(f"{stage}/loss", F.binary_cross_entropy_with_logits(logits.float(), targets.float()), batch_size=size)
        self.log(f"{stage}/macro_f1", macro_f1, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        self.log(f"{stage}/micro_f1", micro_f1, on_epoch=True, batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self.eval_net(batch["image"]).float()
        if self.multilabel:
            probs = torch.sigmoid(logits)
            return {"index": batch["index"], "probs": probs, "prediction": (probs > 0.5).long()}
        probs = torch.softmax(logits, dim=1)
        return {"index": batch["index"], "probs": probs, "prediction": probs.argmax(dim=1)}

    # --- optimization: OptimizerRecipe (core/optimization.py) trains these ------------------
    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimizer trains: the network, plus a learnable criterion's."""
        return [self.net, self.criterion]

    # --- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_loss_check.flush()  # never save weights from a step whose loss is still unchecked
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

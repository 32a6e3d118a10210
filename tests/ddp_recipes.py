"""Tiny runs of each method, trained on two DDP ranks (this file as a script, one process per rank)
and in one process on the same global batches (tests/test_distributed.py), which compares them.

The test forks two rank processes from itself (no second import of torch and Lightning); each
sets ``LOCAL_RANK`` and the master's address, as torchrun or srun would, so Lightning joins the
process group instead of launching processes. By hand, one shell per rank::

    LOCAL_RANK=0 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/ddp_recipes.py OUT TEACHER MEMBRANE

Equality with one process needs the same global batches (the StreamSampler's shards), the same
augmentation (here none: every view is the plain image, since each process draws its own) and
no per-rank BatchNorm statistics: the networks are BatchNorm-free (``tiny_cnn``; smp's ``vgg11``
encoder with ``decoder_use_norm=False``). ``FixMatchBN`` (a Wide ResNet with BatchNorm) is only
compared across ranks. The ranks start from different seeds (as ``seed_everything: true`` gives
under SLURM), so rank 1's own initialization must not survive anywhere.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import DigitsSSL, SegmentationFolders  # noqa: E402
from lightning_modules import (CPS, AdaMatch, CoMatch, Dash, FixMatch, FlexMatch, FreeMatch, KDStudent,  # noqa: E402
                               LabelPropagation, MeanTeacher, MultiMatch, MutualLearning, Segmenter, SequenceMatch, SimMatch,
                               SimMatchV2, SoftMatch, Supervised, TemporalEnsembling)
from lightning_modules.classification.networks import available_networks, register_network  # noqa: E402

METHODS = ("FixMatch", "MeanTeacher", "TemporalEnsembling", "FlexMatch", "KDStudent", "Segmenter",
           "OnlineLabelSmoothing", "MutualLearning", "FixMatchBN", "FreeMatch", "SoftMatch", "AdaMatch", "Dash",
           "DropMaxDropout", "CPS", "LabelPropagation", "CRD", "SimMatch", "CoMatch", "SimMatchV2", "SequenceMatch",
           "MultiMatch")
STEPS = 4
RANK_BATCH = 2  # labeled images per rank and step; one process gets 2 * RANK_BATCH
SEED = 100  # rank r seeds SEED + r


if "tiny_cnn" not in available_networks():
    @register_network("tiny_cnn")
    def _tiny_cnn(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
        """A BatchNorm-free CNN: the same function of a sample on any rank and in any batch."""
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class _TinyFeatureCNN(nn.Module):
    """tiny_cnn with its pooled features exposed (``forward_features``, ``fc``, ``num_features``), for the
    projection heads of SimMatch and CoMatch."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features, self.fc = 16, nn.Linear(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


if "tiny_cnn_features" not in available_networks():
    register_network("tiny_cnn_features")(lambda num_classes, in_channels=3, **kwargs: _TinyFeatureCNN(num_classes,
                                                                                                        in_channels))


class TinyDigits(DigitsSSL):
    """The first 60 training digits, so a few steps revisit samples (Temporal Ensembling's
    targets, FlexMatch's memory); no augmentation, so every process sees the same pixels."""

    def __init__(self, **kwargs) -> None:
        super().__init__(num_labeled=20, uratio=8, steps_per_epoch=STEPS, pad_fraction=0.0, randaugment_ops=0,
                         cutout_fraction=0.0, **kwargs)

    def load_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = super().load_train()
        return images[:60], targets[:60]


def build(method: str, batch_size: int, teacher: Path, membrane: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The model and data of one recipe; ``batch_size`` is per process."""
    opt = dict(lr=0.1, ema_decay=0.7, weight_decay=5e-4)
    net = dict(num_classes=10, in_channels=1, network="tiny_cnn", **opt)
    if method in ("Segmenter", "CPS"):
        # lr 0.02: float32 rounding of the 14M-parameter gradients stays well under the 1e-5 tolerance
        module = Segmenter if method == "Segmenter" else CPS  # CPS: two such networks, cross-supervised
        model = module(network="Unet", loss_terms={"ce": 1.0}, log_images=0, num_classes=2, in_channels=1,
                       network_kwargs=dict(encoder_name="vgg11", decoder_use_norm=False,
                                           decoder_channels=[16, 8, 8, 8, 8]), **(opt | dict(lr=0.02)))
        data = SegmentationFolders(root=str(membrane), num_labeled=8, num_test=2, crop_size=None, flips=False,
                                   rot90=False, batch_size=batch_size, steps_per_epoch=STEPS, decode_threads=1)
        return model, data
    models = {
        "FixMatch": lambda: FixMatch(threshold=0.12, **net),
        "MeanTeacher": lambda: MeanTeacher(unlabeled_loss_weight=10.0, rampup=None, **net),
        "TemporalEnsembling": lambda: TemporalEnsembling(unlabeled_loss_weight=10.0, rampup=None, **net),
        "FlexMatch": lambda: FlexMatch(threshold=0.12, **net),
        # FlexMatch's memory under three views and SequenceMatch's KL terms
        "SequenceMatch": lambda: SequenceMatch(threshold=0.12, **net),
        "KDStudent": lambda: KDStudent(teacher=str(teacher), teacher_network="tiny_cnn", distill_unlabeled=True,
                                       **net),
        # per-sample memories written from every rank's rows after the step; Z from the first global batch
        "CRD": lambda: KDStudent(teacher=str(teacher), teacher_network="tiny_cnn", distill_unlabeled=True, crd_weight=0.8,
                                 crd_kwargs={"nce_k": 32, "feat_dim": 16}, relation_layer=["6:input", "6:input"],
                                 image_size=8, **net),
        # soft labels accumulated over the epoch from all-reduced sums, swapped in at its end
        "OnlineLabelSmoothing": lambda: FixMatch(threshold=0.12, criterion="online_label_smoothing", **net),
        "MutualLearning": lambda: MutualLearning(distill_unlabeled=True, **net),
        "FixMatchBN": lambda: FixMatch(threshold=0.12, **(net | dict(network="wrn10_1"))),
        # moving averages of every rank's weak-view probabilities, used in the loss and committed after the step
        "FreeMatch": lambda: FreeMatch(ema_momentum=0.5, **net),
        "SoftMatch": lambda: SoftMatch(ema_momentum=0.5, **net),
        # class marginals and the relative threshold from every rank's batch, gathered in the loss
        "AdaMatch": lambda: AdaMatch(ema_momentum=0.5, **net),
        # rho^ from every rank's labeled losses of the warm-up (gathered in the commit), then the threshold
        "Dash": lambda: Dash(supervised_warmup_steps=2, rho_window=2, rho_update_steps=1, gamma=4.0, **net),
        # every rank embeds its shard of the 60 images at the epoch start; the gathered features give all ranks
        # the same labels
        "LabelPropagation": lambda: LabelPropagation(warmup_epochs=0, num_neighbors=10, **net),
        # DropMax's retain head (a criterion's parameters) all-reduced with the network; each rank draws its own
        # masks, DropBlock ramps from global_step on both: compared across ranks only
        "DropMaxDropout": lambda: Supervised(criterion="dropmax", **(net | dict(network="wrn10_1", network_kwargs=dict(
            stochastic_depth=0.5, drop_block=0.2, drop_connect=0.3, spatial_dropout=0.1)))),
        # the labeled bank and the alignment queue from every rank's rows, committed after the step
        "SimMatch": lambda: SimMatch(threshold=0.12, bank_warmup_epochs=0, **(net | dict(network="tiny_cnn_features"))),
        # the queue from every rank's rows (two steps' worth: smoothing from step 4), the graphs over the global batch
        "CoMatch": lambda: CoMatch(threshold=0.12, contrast_threshold=0.1, queue_size=72, bank_warmup_epochs=0,
                                   **(net | dict(network="tiny_cnn_features"))),
        # the labeled bank, the queue (two steps' unlabeled rows) and DA's marginal from every rank's rows
        "SimMatchV2": lambda: SimMatchV2(threshold=0.12, queue_size=64, topn=8,
                                         **(net | dict(network="tiny_cnn_features"))),
        # per-sample APM and weak labels written from every rank's rows, each head's FreeMatch thresholds from the
        # gathered batch, cutoffs recalibrated from that state after step 2. The run stays in epoch 0 (no
        # pseudo-label) and the fresh heads never agree, so the cutoffs stay 0 here: test_multimatch pins them
        "MultiMatch": lambda: MultiMatch(ema_momentum=0.5, recalibrate_every=2,
                                         **(net | dict(network="tiny_cnn_features"))),
    }
    return models[method](), TinyDigits(batch_size=batch_size)


class Recorder(L.Callback):
    """The sample indices and the loss of every step on this process."""

    def __init__(self) -> None:
        self.indices: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.indices.append({k: v["index"].cpu() for k, v in batch.items()})
        self.losses.append(float(outputs["loss"]))


def fit(method: str, devices: int, batch_size: int, teacher: Path, membrane: Path) -> dict:
    """Train one recipe for STEPS steps; return this process's state and what it saw."""
    model, data = build(method, batch_size, teacher, membrane)
    recorder = Recorder()
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    state = {"net": model.net.state_dict(), "ema": model.ema.module.state_dict(), "indices": recorder.indices,
             "losses": recorder.losses, "rank": trainer.global_rank}
    if hasattr(model, "criterion"):  # a classification task's; Segmenter has none since issue 16
        state["criterion"] = model.criterion.state_dict()
    if isinstance(model, CPS):
        state["second_net"] = model.second_net.state_dict()
    if isinstance(model, MutualLearning):
        state["peers"] = model.peers.state_dict()
    if isinstance(model, TemporalEnsembling):
        state["ensemble"], state["update_counts"] = model.ensemble, model.update_counts
    if getattr(model, "crd", None) is not None:
        state["crd"] = model.crd.state_dict()
    if isinstance(model, FlexMatch):
        state["memory"], state["thresholds"] = model.memory, model.class_thresholds()
    state["method_buffers"] = dict(model.named_buffers(recurse=False))  # the methods' running state
    if isinstance(model, (SimMatch, CoMatch, SimMatchV2)):  # memories in submodules, and the projection head
        state["memories"] = {name: buffer for name, buffer in model.named_buffers()
                             if name.startswith(("bank.", "queue.", "dist_align."))}
        state["projection"] = model.projection.state_dict()
    return {k: _cpu(v) for k, v in state.items()}


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value


def run_rank(out: Path, teacher: Path, membrane: Path) -> None:
    """Train every recipe on this rank (``LOCAL_RANK`` and the master's address in the environment)
    and save each final state to ``out/<method>_rank<r>.pt``."""
    rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(1)
    for method in METHODS:
        start = time.perf_counter()
        L.seed_everything(SEED + rank, verbose=False)
        state = fit(method, devices=2, batch_size=RANK_BATCH, teacher=teacher, membrane=membrane)
        torch.save(state, out / f"{method}_rank{rank}.pt")
        print(f"rank {rank} {method}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    run_rank(*(Path(a) for a in sys.argv[1:4]))

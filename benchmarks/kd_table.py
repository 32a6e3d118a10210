"""Distillation and label regularization on CIFAR-10: one teacher, students on the same budget.

    python benchmarks/kd_table.py --budget cpu                   # 2 CPU cores, about 45 minutes
    python benchmarks/kd_table.py --budget gpu                   # the device
    python benchmarks/kd_table.py --methods CE KD --student-steps 100

The teacher is trained once with ``Supervised`` and cached under ``benchmarks/.cache`` (keyed by
budget, network, steps and seed); later runs reuse it. Every student row then trains the same
student network from the same seed for the same number of steps on all 50,000 labeled CIFAR-10
training images (JPEG copies from ../shared/data/cifar10) and is tested, EMA weights, on the
10,000 test images. Writes ``docs/results/kd_cifar10.md`` with the command, machine and date.

Rows: vanilla CE; label smoothing; Tf-KD reg (virtual teacher); R-Drop; DropMax; D2L (40 epochs of 10 steps at the
cpu budget); the student's dropout family
(spatial dropout, stochastic depth, DropBlock, DropConnect); Hinton KD; FitNets;
attention transfer; RKD; similarity-preserving KD; category-structure KD; DKD; DIST; PKT; VID; CRD; ReviewKD; FNKD;
multi-teacher KD (the teacher and the CE row's student, entropy-weighted); adversarial KD (KD plus a logit
discriminator);
Deep Mutual Learning (two student peers); Tf-KD self (the CE row's student as its own teacher).
Feature and relation rows use CE plus their own term, as RepDistiller does; weights are the published ones. DKD's warm-up
keeps its published share of training: 20 of 240 epochs, so 1/12 of the student steps. The teacher is trained
(or read from the cache) only when a selected row distils from it. The Tf-KD rows
use the authors' CIFAR-100 ResNet-18 strengths carried to 10 classes, as configs/tfkd_*_cifar10.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.report import accuracy_rows, report_header, timed_fit, write_report  # noqa: E402

from benchmarks.ssl_table import unpack  # noqa: E402
from datamodules import ImageFolderSSL  # noqa: E402
from lightning_modules.core.atomic import atomic_path, write_json_atomically  # noqa: E402
from lightning_modules import KDStudent, MutualLearning, Supervised  # noqa: E402

BUDGETS = {
    "cpu": dict(teacher="wrn16_2", student="wrn10_1", teacher_steps=800, student_steps=400, batch_size=64,
                bn_momentum=0.01, ema_decay=0.99),
    "gpu": dict(teacher="wrn40_2", student="wrn16_2", teacher_steps=30000, student_steps=30000, batch_size=64,
                bn_momentum=0.001, ema_decay=0.999),
}
# Feature-map pairs for a Wide ResNet pair (group outputs are pre-activation sums). FitNets hints the
# middle group, as the paper's middle-layer hint and RepDistiller's --hint_layer 2 (block2) do; AT
# uses all three groups, as the authors' code and RepDistiller (feat[1:-1]) and configs/at_cifar10.yaml.
MIDDLE_GROUP = [["groups.1", "groups.1"]]
ALL_GROUPS = [[f"groups.{k}", f"groups.{k}"] for k in range(3)]
CE_ONLY = dict(ce_weight=1.0, kd_weight=0.0)
# Tf-KD at the authors' CIFAR-100 ResNet-18 strength carried to 10 classes (configs/tfkd_*_cifar10.yaml):
# reg: weight * multiplier / C = 0.1, the criterion's defaults (multiplier = C, here 10);
# self: alpha 0.95, T 6, multiplier 50 -> CE 0.05, batch-mean KD 0.475.
TFKD_REG = dict(criterion="tfkd_reg")
TFKD_SELF = dict(temperature=6.0, ce_weight=0.05, kd_weight=0.475)
# DKD: mdistiller's CIFAR-100 recipe (CE 1, alpha 1, beta 8, T 4, warm-up 20 of 240 epochs); DIST: the
# authors' CIFAR-100 recipe (CE 1, DIST weight 2, beta = gamma = 1, T 4); PKT and VID: RepDistiller's
# (CE 1 + PKT 30000 on the pooled features; CE 1 + VID 1 on every group, as AT's layers).
DKD = dict(logit_loss="dkd", logit_loss_kwargs={"alpha": 1.0, "beta": 8.0}, temperature=4.0, ce_weight=1.0, kd_weight=1.0)
DIST = dict(logit_loss="dist", logit_loss_kwargs={"beta": 1.0, "gamma": 1.0}, temperature=4.0, ce_weight=1.0, kd_weight=2.0)
# DropMax: the authors' weights (all 1, tau 0.1). The dropout family at its papers' rates: spatial dropout 0.1;
# stochastic depth p_L 0.5 (Huang et al.'s CIFAR value); DropBlock keep 0.9 ramped from 1 (Ghiasi et al.) with
# block 3, not ImageNet's 7, as wrn10_1's DropBlock maps are 16 x 16 and 8 x 8; DropConnect 0.5 (Wan et al.).
DROPMAX = dict(criterion="dropmax")
# D2L watches the LID once per epoch and needs more than init_epochs + window of them before it can turn: its row
# runs the same steps as 40 epochs (EPOCHS) and keeps the authors' CIFAR-10 shares (xingjunm/dimensionality-driven-
# learning train_models.py: init_epochs 40 of 120, window 5, k 20), so init_epochs is 13 of 40.
D2L_EPOCHS = 40
D2L = dict(criterion="d2l", criterion_kwargs={"epochs": D2L_EPOCHS, "init_epochs": round(D2L_EPOCHS * 40 / 120),
                                              "window": 5, "k": 20})
EPOCHS = {"D2L": D2L_EPOCHS}  # rows whose run is cut into this many epochs (every other row: one epoch)
# CRD: RepDistiller's CIFAR-100 recipe (CE 1, KD 0, CRD 0.8 on the pooled features; feat_dim 128, 16384 negatives,
# T 0.07, momentum 0.5). ReviewKD: the authors' (CE 1 + HCL 5, warm-up 20 of 240 epochs) over the three group
# outputs and the pooled feature, as their ResNet32x4 -> ResNet8x4 levels (stage outputs, pooled feature).
CRD = dict(CE_ONLY, crd_weight=0.8)
REVIEW_LEVELS = ALL_GROUPS + [["fc:input", "fc:input"]]
# FNKD: the authors' CIFAR recipe (CE 1 + 9 x the normalized responses' KL, tau 2, T 1); multi-teacher and adversarial
# KD: Hinton KD's weights (CE 0.1 + KD 0.9, T 4), the latter with the discriminator's term at weight 1
FNKD = dict(logit_loss="fnkd", logit_loss_kwargs={"feature_norm": 2.0}, temperature=1.0, ce_weight=1.0, kd_weight=9.0)
# row name -> (module, extra arguments or a function of the student steps that gives them); "teacher" /
# "self" mark the rows that distil from a checkpoint
METHODS = {
    "CE": (Supervised, {}),
    "label smoothing": (Supervised, dict(criterion="label_smoothing", criterion_kwargs={"smoothing": 0.1})),
    "Tf-KD reg": (Supervised, TFKD_REG),
    "R-Drop": (Supervised, dict(rdrop_weight=1.0, network_kwargs={"dropout": 0.1})),
    "DropMax": (Supervised, DROPMAX),
    "D2L": (Supervised, D2L),
    "spatial dropout": (Supervised, dict(network_kwargs={"spatial_dropout": 0.1})),
    "stochastic depth": (Supervised, dict(network_kwargs={"stochastic_depth": 0.5})),
    "DropBlock": (Supervised, dict(network_kwargs={"drop_block": 0.1, "drop_block_size": 3})),
    "DropConnect": (Supervised, dict(network_kwargs={"drop_connect": 0.5})),
    "KD": ("teacher", {}),
    "FitNets": ("teacher", dict(CE_ONLY, hint_layers=MIDDLE_GROUP, connector_relu=False)),
    "AT": ("teacher", dict(CE_ONLY, at_layers=ALL_GROUPS)),
    "RKD": ("teacher", dict(CE_ONLY, rkd_distance_weight=25.0, rkd_angle_weight=50.0)),
    "SP": ("teacher", dict(CE_ONLY, sp_weight=3000.0)),
    "CSKD": ("teacher", dict(cskd_weight=1.0)),
    "DKD": ("teacher", lambda steps: dict(DKD, kd_warmup_steps=round(steps * 20 / 240))),
    "DIST": ("teacher", DIST),
    "PKT": ("teacher", dict(CE_ONLY, pkt_weight=30000.0)),
    "VID": ("teacher", dict(CE_ONLY, vid_layers=ALL_GROUPS)),
    "CRD": ("teacher", CRD),
    "ReviewKD": ("teacher", lambda steps: dict(CE_ONLY, reviewkd_layers=REVIEW_LEVELS, reviewkd_weight=5.0,
                                               reviewkd_warmup_steps=round(steps * 20 / 240))),
    "FNKD": ("teacher", FNKD),
    "multi-teacher KD": ("teacher+self", dict(teacher_weighting="entropy")),
    "adversarial KD": ("teacher", dict(adversarial_weight=1.0)),
    "DML": (MutualLearning, {}),
    "Tf-KD self": ("self", TFKD_SELF),
}


def fit_and_test(model: L.LightningModule, datamodule: ImageFolderSSL, steps: int, accelerator: str,
                 save: Path | None = None) -> tuple[dict[str, float], float]:
    trainer, seconds = timed_fit(model, datamodule, steps, accelerator, datamodule.root)
    if save is not None:
        with atomic_path(save) as partial:  # an interrupted run never leaves a half-written cached teacher
            trainer.save_checkpoint(partial)
    metrics = trainer.test(model, datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--student-steps", type=int, help="override the budget's student steps")
    parser.add_argument("--teacher-steps", type=int, help="override the budget's teacher steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "kd_cifar10.md")
    args = parser.parse_args()
    budget = dict(BUDGETS[args.budget])
    for key in ("student_steps", "teacher_steps"):
        if getattr(args, key):
            budget[key] = getattr(args, key)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    common = dict(num_classes=10, in_channels=3, network_kwargs={"bn_momentum": budget["bn_momentum"]},
                  ema_decay=budget["ema_decay"], lr=0.05)
    args.cache.mkdir(parents=True, exist_ok=True)
    teacher_ckpt = args.cache / f"teacher_{args.budget}_{budget['teacher']}_{budget['teacher_steps']}_seed{args.seed}.ckpt"
    self_ckpt = args.cache / f"ce_student_{args.budget}_{budget['student']}_{budget['student_steps']}_seed{args.seed}.ckpt"
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        datamodule = ImageFolderSSL(root=str(unpack(args.shared, Path(tmp))), num_labeled=None,
                                    batch_size=budget["batch_size"], steps_per_epoch=budget["student_steps"],
                                    seed=args.seed, mean=[0.4914, 0.4822, 0.4465], std=[0.2471, 0.2435, 0.2616])
        datamodule.setup("fit")  # decode once, outside every row's train time
        order = [m for m in METHODS if m in args.methods]
        needs_teacher = any(METHODS[m][0] in ("teacher", "teacher+self") for m in order)
        teacher_acc = cached_teacher(teacher_ckpt, datamodule, common, budget, args.seed, accelerator) \
            if needs_teacher else None
        if any(METHODS[m][0] in ("self", "teacher+self") for m in order) and "CE" in order:
            order.remove("CE")
            order.insert(0, "CE")  # Tf-KD self distils from the CE row's student
        for name in order:
            kind, extra = METHODS[name]
            extra = extra(budget["student_steps"]) if callable(extra) else extra
            L.seed_everything(args.seed, verbose=False)
            options = {**common, **extra, "network_kwargs": {**common["network_kwargs"], **extra.get("network_kwargs", {})}}
            if kind in ("teacher", "self", "teacher+self"):
                sources = {"teacher": [teacher_ckpt], "self": [self_ckpt], "teacher+self": [teacher_ckpt, self_ckpt]}[kind]
                if not all(source.exists() for source in sources):
                    raise SystemExit(f"{name} needs {sources}: run the CE row first (it is saved there)")
                teacher = str(sources[0]) if len(sources) == 1 else [str(source) for source in sources]
                model = KDStudent(teacher=teacher, network=budget["student"], test_teacher=False, **options)
            else:
                model = kind(network=budget["student"], **options)
            save = self_ckpt if name == "CE" else None
            datamodule.steps_per_epoch = budget["student_steps"] // EPOCHS.get(name, 1)
            metrics, seconds = fit_and_test(model, datamodule, budget["student_steps"], accelerator, save)
            rows.append((name, metrics["test/acc"], seconds))
            print(f"{name}: test accuracy {100 * metrics['test/acc']:.2f} %, {seconds:.0f} s", flush=True)
            criterion = getattr(getattr(model, "task", None), "criterion", None)
            if hasattr(criterion, "turning_epoch"):  # D2L: whether and when the LID turned (-1: never)
                print(f"{name}: LID per epoch {[round(v, 2) for v in criterion.lids.tolist()]}, turning epoch "
                      f"{int(criterion.turning_epoch)}, alpha {float(criterion.alpha):.3f}", flush=True)
    write_table(args, budget, accelerator, teacher_acc, rows)


def cached_teacher(ckpt: Path, datamodule: ImageFolderSSL, common: dict, budget: dict, seed: int,
                   accelerator: str) -> float:
    """Train the teacher unless its checkpoint and recorded accuracy are cached; return its test accuracy."""
    record = ckpt.with_suffix(".json")
    if ckpt.exists() and record.exists():
        return float(json.loads(record.read_text())["test_acc"])
    L.seed_everything(seed, verbose=False)
    teacher = Supervised(network=budget["teacher"], **common)
    metrics, seconds = fit_and_test(teacher, datamodule, budget["teacher_steps"], accelerator, ckpt)
    print(f"teacher {budget['teacher']}: test accuracy {100 * metrics['test/acc']:.2f} %, {seconds:.0f} s", flush=True)
    write_json_atomically(record, {"test_acc": metrics["test/acc"], "train_seconds": seconds})
    return metrics["test/acc"]


def write_table(args: argparse.Namespace, budget: dict, accelerator: str, teacher_acc: float | None,
                rows: list[tuple[str, float, float]]) -> None:
    title = f"Distillation and label regularization on CIFAR-10 ({args.budget} budget)"
    teacher = "No row used the teacher." if teacher_acc is None else (
        f"Teacher: `{budget['teacher']}` trained with cross-entropy for {budget['teacher_steps']} steps, test "
        f"accuracy {100 * teacher_acc:.2f} %.")
    lines = report_header(title, accelerator, args.seed) + [
        f"{teacher} Every student: `{budget['student']}`, {budget['student_steps']} steps "
        f"of batch {budget['batch_size']} on all 50,000 labeled training images, SGD lr 0.05 with the cosine "
        f"schedule, EMA {budget['ema_decay']} weights tested on the 10,000 test images.", "",
        "| method | student test accuracy % | vs CE | train time |", "|---|---|---|---|",
    ]
    lines += accuracy_rows(rows, "CE")
    write_report(args.output, lines)


if __name__ == "__main__":
    main()

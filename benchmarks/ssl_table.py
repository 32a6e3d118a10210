"""Every semi-supervised method on CIFAR-10 with the same labels, network and step budget.

    python benchmarks/ssl_table.py --budget cpu              # 2 CPU cores, under an hour
    python benchmarks/ssl_table.py --budget gpu              # the device
    python benchmarks/ssl_table.py --methods Supervised FixMatch --steps 200

Reads CIFAR-10 from the JPEG tarballs in ../shared/data/cifar10 (unpacked once into a temporary
folder) through ``ImageFolderSSL``, trains each method from the same seed and labeled split,
tests the EMA weights, and writes ``docs/results/ssl_cifar10.md`` with the command, machine,
date and table. The DataModule is built once, so images are decoded once for all methods.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.report import accuracy_rows, report_header, timed_fit, write_report  # noqa: E402

import lightning_modules  # noqa: E402
from datamodules import ImageFolderSSL  # noqa: E402

# Per-budget settings shared by every method: only the method differs between rows.
BUDGETS = {
    "cpu": dict(network="wrn10_1", steps=800, batch_size=16, num_labeled=4000, bn_momentum=0.01, ema_decay=0.99),
    "gpu": dict(network="wrn28_2", steps=20000, batch_size=64, num_labeled=4000, bn_momentum=0.001, ema_decay=0.999),
}
RAMPUP_FRACTION = 0.4
# The published unlabeled ratio of each method (ANCHORS.md): 7 for the FixMatch line, 1 for the classics.
URATIO = {"FixMatch": 7, "FlexMatch": 7, "FreeMatch": 7, "SoftMatch": 7, "UDA": 7, "AdaMatch": 7, "Dash": 7,
          "DeFixMatch": 7, "ReFixMatch": 7,
          "SimMatch": 7, "CoMatch": 7,  # USB results/classic_cv.csv, 40 labels: SimMatch 5.18 %, CoMatch 5.44 % error
          "SimMatchV2": 7,  # no USB CIFAR-10 number in ANCHORS.md
          "CRMatch": 7,  # USB results/classic_cv.csv: 10.13 % error at 40 labels, 3.81 % at 4000 (ANCHORS.md)
          "SequenceMatch": 7,  # USB publishes no SequenceMatch row
          "MultiMatch": 7}  # FixMatch's image ratio; USB runs MultiMatch on text only (ag_news config: uratio 1)
# Schedules counted in steps of a 2^20-step recipe, shortened with the budget as in benchmarks/digits_ssl.py:
# Dash's supervised warm-up over 5 % of the run and an update of its threshold every 1 % (USB: every 10 epochs).
SCHEDULES = {"Dash": lambda steps: dict(supervised_warmup_steps=max(1, steps // 20),
                                        rho_update_steps=max(1, steps // 100)),
             "LabelPropagation": lambda steps: dict(warmup_epochs=EPOCHS["LabelPropagation"] // 2),
             # the budget is one epoch: the memory terms from the start (USB waits 1024 of 2^20 steps, 0.1 %);
             # CoMatch's default queue is 5 steps of the gpu budget's batches (USB's queue_batch 5)
             "SimMatch": lambda steps: dict(bank_warmup_epochs=0),
             "CoMatch": lambda steps: dict(bank_warmup_epochs=0)}
# Methods that act once per epoch see the budget as this many epochs (the others as one): LabelPropagation's
# supervised first half and a propagation over all training images at each later epoch's start (the paper
# propagates every epoch after a supervised stage of the same length). No published USB number.
# MultiMatch: USB's 100 epochs (config/usb_nlp/multimatch/*.yaml), in which its APM weight smoothness / (1 + epoch)
# decays, its cutoffs are recalibrated at each end, and epoch 0 (1 %) has no pseudo-label; no published image number.
EPOCHS = {"LabelPropagation": 20, "MultiMatch": 100}
# Methods that replace the shared network or optimizer. The ladder is its own MLP over the 3072 pixels with the
# paper's Adam (its conv ladders are not built: ssl/ladder.py); published CIFAR-10 errors at 4000 labels, no USB
# number for these: Ladder Conv-Large Gamma 20.40 (Rasmus et al. Table 3; LadderGamma, here on the shared WRN),
# Deep Co-Training 9.03 (Qiao et al. Table 1, two views).
OWN_NETWORK = {"LadderNetwork": dict(network="mlp", input_features=3072, lr=0.002, weight_decay=0.0, network_kwargs={}),
               "LadderGamma": dict(lr=0.002, weight_decay=0.0)}


def unpack(shared: Path, into: Path) -> Path:
    for part in ("train", "test"):
        if not (into / part).is_dir():
            with tarfile.open(shared / "cifar10" / f"{part}.tar.gz") as tar:
                tar.extractall(into, filter="data")
    return into


def run_method(name: str, datamodule: ImageFolderSSL, budget: dict, seed: int, accelerator: str) -> tuple[float, float]:
    L.seed_everything(seed, verbose=False)
    datamodule.uratio = URATIO.get(name, 1)
    datamodule.steps_per_epoch = budget["steps"] // EPOCHS.get(name, 1)
    # Ramp-ups end at 40 % of the run (as in benchmarks/digits_ssl.py): the published lengths
    # (VAT's 400k, MixMatch's 16k steps) would keep the unlabeled weight near 0 in a short budget.
    arguments = {"network": budget["network"], "network_kwargs": {"bn_momentum": budget["bn_momentum"]},
                 **SCHEDULES.get(name, lambda steps: {})(budget["steps"]), **OWN_NETWORK.get(name, {})}
    model = getattr(lightning_modules, name)(num_classes=10, in_channels=3, ema_decay=budget["ema_decay"],
                                             rampup_steps=int(RAMPUP_FRACTION * budget["steps"]), **arguments)
    trainer, seconds = timed_fit(model, datamodule, budget["steps"], accelerator, datamodule.root)
    return float(trainer.test(model, datamodule, verbose=False)[0]["test/acc"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(lightning_modules.SSL_METHODS))
    parser.add_argument("--steps", type=int, help="override the budget's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "ssl_cifar10.md")
    args = parser.parse_args()
    budget = dict(BUDGETS[args.budget], **({"steps": args.steps} if args.steps else {}))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datamodule = ImageFolderSSL(root=str(unpack(args.shared, Path(tmp))), num_labeled=budget["num_labeled"],
                                    batch_size=budget["batch_size"], steps_per_epoch=budget["steps"], seed=args.seed,
                                    mean=[0.4914, 0.4822, 0.4465], std=[0.2471, 0.2435, 0.2616])
        datamodule.setup("fit")  # decode the JPEGs once, outside every method's train time
        for name in args.methods:
            acc, seconds = run_method(name, datamodule, budget, args.seed, accelerator)
            rows.append((name, acc, seconds))
            print(f"{name}: test accuracy {100 * acc:.2f} %, {seconds:.0f} s", flush=True)
    title = f"Semi-supervised methods on CIFAR-10 ({budget['num_labeled']} labels, {args.budget} budget)"
    lines = report_header(title, accelerator, args.seed) + [
        f"Every method: `{budget['network']}`, {budget['steps']} steps, labeled batch {budget['batch_size']}, "
        f"the method's published unlabeled ratio, ramp-ups (where a method has one) ending at "
        f"{int(RAMPUP_FRACTION * budget['steps'])} steps, EMA {budget['ema_decay']} weights tested on the 10,000 "
        "test images (JPEG copies of CIFAR-10, see shared/data/README.md).", "",
        "| method | test accuracy % | vs Supervised | train time |", "|---|---|---|---|",
    ]
    lines += accuracy_rows(rows, "Supervised")
    write_report(args.output, lines)


if __name__ == "__main__":
    main()

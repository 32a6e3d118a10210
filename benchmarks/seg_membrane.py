"""Segmentation networks and semi-supervised segmentation on the ISBI 2012 membrane slices.

    python benchmarks/seg_membrane.py                          # CPU budget
    python benchmarks/seg_membrane.py --steps 2000 --crop 256  # a longer run (the device)
    python benchmarks/seg_membrane.py --rows unet unet3plus

Reads ../shared/data/membrane (30 annotated 512x512 slices). Five slices are held out for the
test (the same five for every row); every row trains from the same seed for the same number of
steps on random crops and is tested, EMA weights, on the whole held-out slices. The network rows
train on all 25 remaining slices; the semi-supervised rows use 6 labeled slices, the other 19
unlabeled, against the supervised network on the same 6. Writes ``docs/results/seg_membrane.md``
with the command, machine and date.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.report import report_header, timed_fit, write_report  # noqa: E402

from datamodules import SegmentationFolders  # noqa: E402
from lightning_modules import CPS, SegFixMatch, SegMeanTeacher, Segmenter, UniMatch  # noqa: E402

# row -> (module, network, labeled slices (None = all 25), extra module arguments)
ROWS = {
    "unet": (Segmenter, "Unet", None, {}),
    "unet3plus": (Segmenter, "unet3plus", None, {"loss_terms": {"hybrid": 1.0}}),
    "refinenet": (Segmenter, "refinenet", None, {}),
    "lw_refinenet": (Segmenter, "lw_refinenet", None, {}),
    "unet_6_labels": (Segmenter, "Unet", 6, {}),
    "segfixmatch_6_labels": (SegFixMatch, "Unet", 6, {"threshold": 0.9}),
    "segmeanteacher_6_labels": (SegMeanTeacher, "Unet", 6, {}),
    "cps_6_labels": (CPS, "Unet", 6, {}),  # parameters: the first network, the one evaluated (CPS trains two)
    "cps_cutmix_6_labels": (CPS, "Unet", 6, {"cutmix": True}),
    "unimatch_6_labels": (UniMatch, "Unet", 6, {}),  # the paper's threshold 0.95 and stream weights
    "unimatch_threshold09_6_labels": (UniMatch, "Unet", 6, {"threshold": 0.9}),  # SegFixMatch's row's threshold
}


def run_row(name: str, args: argparse.Namespace, accelerator: str, workdir: Path) -> tuple[dict[str, float], float, int]:
    module, network, num_labeled, extra = ROWS[name]
    L.seed_everything(args.seed, verbose=False)
    datamodule = SegmentationFolders(root=str(args.shared / "membrane"), num_labeled=num_labeled, num_test=5,
                                     seed=args.seed, crop_size=args.crop, batch_size=args.batch_size, uratio=1,
                                     steps_per_epoch=args.steps)
    rampup = {"rampup_steps": int(0.4 * args.steps)} if module is SegMeanTeacher else {}
    model = module(network=network, network_kwargs={"encoder_name": args.encoder}, lr=args.lr, ema_decay=0.99,
                   log_images=0, **rampup, **extra)
    trainer, seconds = timed_fit(model, datamodule, args.steps, accelerator, workdir / name)
    metrics = trainer.test(model, datamodule, verbose=False)[0]
    parameters = sum(p.numel() for p in model.net.parameters())
    return {k.removeprefix("test/"): float(v) for k, v in metrics.items()}, seconds, parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "seg_membrane.md")
    args = parser.parse_args()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows:
            metrics, seconds, parameters = run_row(name, args, accelerator, Path(tmp))
            results.append((name, metrics, seconds, parameters))
            print(f"{name}: foreground Dice {metrics['fg_dice']:.4f}, mIoU {metrics['miou']:.4f}, {seconds:.0f} s",
                  flush=True)
    write_table(args, accelerator, results)


def write_table(args: argparse.Namespace, accelerator: str, results: list) -> None:
    lines = report_header("Segmentation on the ISBI 2012 membrane slices", accelerator, args.seed) + [
        f"Every row: `{args.encoder}` encoder (random init, nothing downloaded), {args.steps} steps of "
        f"{args.batch_size} random {args.crop}x{args.crop} crops (flips, 90-degree rotations), SGD lr {args.lr} "
        "with the cosine schedule, EMA 0.99 weights tested on the 5 held-out 512x512 slices, whole images. "
        "Metrics are dataset-level (one confusion matrix over all test pixels): foreground = cell interior. "
        "The RefineNet rows use their default `decoder_use_norm=\"batchnorm\"`; the papers' unnormalised decoder "
        "diverges at this learning rate (docs/segmentation.md).", "",
        "| row | labeled slices | parameters | fg Dice | fg IoU | mIoU | FWIoU | pixel acc | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m, seconds, parameters in results:
        labeled = ROWS[name][2] or 25
        lines.append(f"| {name} | {labeled} | {parameters:,} | {m['fg_dice']:.4f} | {m['fg_iou']:.4f} | "
                     f"{m['miou']:.4f} | {m['fwiou']:.4f} | {m['pixel_acc']:.4f} | {seconds:.0f} s |")
    write_report(args.output, lines)


if __name__ == "__main__":
    main()

"""Detection on coco128 and the membrane cells: mAP after a fixed budget, every row the same.

    python benchmarks/det_coco128.py --steps 3000             # the device (from random weights)
    python benchmarks/det_coco128.py --rows mobilenet --steps 2 --min-size 256   # a smoke run

Rows: Faster R-CNN MobileNetV3-Large FPN, Faster R-CNN ResNet-50 FPN and Mask R-CNN ResNet-50 FPN
on coco128 (112 training images, the same 16 held out); Detector against UnbiasedTeacher on the
same 32 labeled images (the other 80 unlabeled for the teacher), and SoftTeacher beside it
(no burn-in: the paper trains end to end; Unbiased Teacher burns in for 30 % of the steps); Mask R-CNN and Faster R-CNN
MobileNet on the membrane cells (written as COCO instances by benchmarks/membrane_cells_to_coco.py;
25 training slices, 5 held out), and Detector against UnbiasedTeacher on 6 labeled slices.
All start from random weights (nothing can be downloaded here), so the budget must be long for
mAP to move; the EMA weights are tested. Writes ``docs/results/det_coco128.md``.
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

from benchmarks.membrane_cells_to_coco import write_membrane_cells_coco  # noqa: E402
from benchmarks.report import report_header, timed_fit, write_report  # noqa: E402
from datamodules import COCODetection  # noqa: E402
from lightning_modules import Detector, SoftTeacher, UnbiasedTeacher  # noqa: E402

COCO128 = dict(annotation_file="annotations/instances_train2017.json", image_dir="train2017", num_test=16)
CELLS = dict(annotation_file="annotations.json", image_dir="images", num_test=5)
# row -> (module, network, data set, masks, labeled images (None = all))
ROWS = {
    "mobilenet": (Detector, "fasterrcnn_mobilenet_v3_large_fpn", "coco128", False, None),
    "resnet50": (Detector, "fasterrcnn_resnet50_fpn", "coco128", False, None),
    "maskrcnn": (Detector, "maskrcnn_resnet50_fpn", "coco128", True, None),
    "mobilenet_32_labels": (Detector, "fasterrcnn_mobilenet_v3_large_fpn", "coco128", False, 32),
    "unbiased_teacher_32_labels": (UnbiasedTeacher, "fasterrcnn_mobilenet_v3_large_fpn", "coco128", False, 32),
    "soft_teacher_32_labels": (SoftTeacher, "fasterrcnn_mobilenet_v3_large_fpn", "coco128", False, 32),
    "maskrcnn_cells": (Detector, "maskrcnn_resnet50_fpn", "cells", True, None),
    "mobilenet_cells": (Detector, "fasterrcnn_mobilenet_v3_large_fpn", "cells", False, None),
    "mobilenet_cells_6_labels": (Detector, "fasterrcnn_mobilenet_v3_large_fpn", "cells", False, 6),
    "unbiased_teacher_cells_6_labels": (UnbiasedTeacher, "fasterrcnn_mobilenet_v3_large_fpn", "cells", False, 6),
}


def run_row(name: str, args: argparse.Namespace, roots: dict[str, Path], accelerator: str,
            workdir: Path) -> tuple[dict[str, float], float]:
    module, network, dataset, masks, num_labeled = ROWS[name]
    L.seed_everything(args.seed, verbose=False)
    layout = COCO128 if dataset == "coco128" else CELLS
    datamodule = COCODetection(root=str(roots[dataset]), masks=masks, num_labeled=num_labeled, seed=args.seed,
                               batch_size=args.batch_size, steps_per_epoch=args.steps, **layout)
    extra = {"burn_in_steps": int(0.3 * args.steps)} if module is UnbiasedTeacher else {}
    model = module(network=network, num_classes=datamodule.num_classes, min_size=args.min_size, lr=args.lr,
                   max_size=args.max_size, log_images=0, roi_heads_kwargs={"detections_per_img": 300},
                   ema_decay=args.ema_decay, **extra)
    trainer, seconds = timed_fit(model, datamodule, args.steps, accelerator, workdir / name,
                                 mixed_precision=False)
    metrics = trainer.test(model, datamodule, verbose=False)[0]
    return {k.removeprefix("test/"): float(v) for k, v in metrics.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=512)
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument("--lr", type=float, default=0.01,
                        help="SGD learning rate; torchvision's reference recipe scales 0.02 per 16 images (0.00125 per "
                             "image): at batch 1 from random weights, 0.01 let SoftTeacher's student diverge (2026-12-02)")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="the tested EMA's decay; 0.999 keeps ~37%% of the random start after 1000 steps, so "
                             "short budgets need less (0.99)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "det_coco128.md")
    args = parser.parse_args()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"coco128": args.shared / "coco128"}
        if any(ROWS[name][2] == "cells" for name in args.rows):  # the membrane data need not travel otherwise
            roots["cells"] = write_membrane_cells_coco(args.shared / "membrane", Path(tmp) / "cells")
        for name in args.rows:
            metrics, seconds = run_row(name, args, roots, accelerator, Path(tmp))
            results.append((name, metrics, seconds))
            print(f"{name}: box mAP {metrics['map']:.4f}, {seconds:.0f} s", flush=True)
    lines = report_header("Detection on coco128 and the membrane cells", accelerator, args.seed) + [
        f"Every row: random initial weights, {args.steps} steps of {args.batch_size} images (min size "
        f"{args.min_size}, horizontal flips), SGD lr {args.lr} with the cosine schedule, EMA ({args.ema_decay}) weights "
        "tested; COCO mAP@[.5:.95] from torchmetrics (faster-coco-eval backend) on up to 300 detections per "
        "image (the detector's detections_per_img), and on COCO's 100.", "",
        "| row | labeled images | box mAP | box mAP50 | box mAP, 100 detections | mask mAP | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m, seconds in results:
        labeled = ROWS[name][4] or ("112" if ROWS[name][2] == "coco128" else "25")
        mask = f"{m['segm_map']:.4f}" if "segm_map" in m else ""
        at_100 = m.get("map_maxdets100", m["map"])  # the same number when the limit is not above 100
        lines.append(f"| {name} | {labeled} | {m['map']:.4f} | {m.get('map_50', float('nan')):.4f} | {at_100:.4f} | "
                     f"{mask} | {seconds:.0f} s |")
    write_report(args.output, lines)


if __name__ == "__main__":
    main()

"""Does a RefineNet decoder train from random weights? A short probe on membrane crops.

    python benchmarks/refinenet_norm_probe.py lw_refinenet --norm none --lr 0.01
    python benchmarks/refinenet_norm_probe.py refinenet --norm batchnorm --lr 0.01 --clip 1.0

A plain loop (no Lightning): ResNet-18 encoder, random 128-pixel crops of the 25 training slices,
batch 4, SGD momentum 0.9 Nesterov, weight decay 5e-4, cross-entropy. Prints the loss and logit
spread on the way and the mean loss of the last 20 steps; docs/segmentation.md has the table that
chose the decoders' default norm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from datamodules import SegmentationFolders  # noqa: E402
from lightning_modules.segmentation.networks import build_segmentation_network  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("network", choices=["refinenet", "lw_refinenet"])
    parser.add_argument("--norm", choices=["none", "batchnorm"], default="batchnorm")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip; 0 = none")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    data = SegmentationFolders(root=str(args.shared / "membrane"), num_test=5, seed=0, crop_size=128, batch_size=4,
                               steps_per_epoch=args.steps, unlabeled_views=())
    data.setup("fit")
    net = build_segmentation_network(args.network, encoder_name="resnet18", in_channels=1, classes=2,
                                     decoder_use_norm=False if args.norm == "none" else args.norm).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    losses, start = [], time.time()
    for step, (batch, _, _) in enumerate(data.train_dataloader()):
        logits = net(data.to_float(batch["labeled"]["image"]))
        loss = F.cross_entropy(logits, batch["labeled"]["target"])
        optimizer.zero_grad()
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        optimizer.step()
        losses.append(loss.item())
        if step in (0, 1, 2, 4) or (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}, logit std {logits.detach().std().item():.3g}", flush=True)
    tail = losses[-20:]
    print(f"{args.network} norm={args.norm} lr={args.lr} clip={args.clip}: mean loss of the last {len(tail)} steps "
          f"{sum(tail) / len(tail):.4f} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()

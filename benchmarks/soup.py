"""Greedy model soup of checkpoints, scored on a DataModule's validation set.

    python benchmarks/soup.py --checkpoints a.ckpt b.ckpt c.ckpt --data DigitsSSL \
        --data_kwargs '{"num_labeled": 50}' --metric val/acc --output soup.ckpt [--update_bn]

Prints each ingredient's score, which ones the soup kept, and the soup's score; writes the soup
checkpoint atomically (a temporary file, then os.replace). Checkpoints written by train.py rebuild
their module on their own; others need ``--model package.Class``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datamodules  # noqa: E402
import lightning_modules  # noqa: E402,F401  (LightningModule.load_from_checkpoint only rebuilds imported classes)
from callbacks.soup import save_soup, soup_from_checkpoints  # noqa: E402


def _resolve(name: str, default_module):
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return getattr(default_module, name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--data", default="DigitsSSL", help="a datamodules class name or a dotted path")
    parser.add_argument("--data_kwargs", default="{}", help="JSON arguments of the DataModule")
    parser.add_argument("--metric", default="val/acc")
    parser.add_argument("--mode", choices=["max", "min"], default="max")
    parser.add_argument("--output", required=True)
    parser.add_argument("--update_bn", action="store_true", help="re-estimate BatchNorm statistics of each candidate")
    parser.add_argument("--model", default=None, help="module class (dotted path) if the checkpoint cannot say")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(argv)

    datamodule = _resolve(args.data, datamodules)(**json.loads(args.data_kwargs))
    module_class = _resolve(args.model, None) if args.model else None
    module, chosen, scores = soup_from_checkpoints(
        args.checkpoints, datamodule, metric=args.metric, update_bn=args.update_bn, module_class=module_class,
        higher_is_better=args.mode == "max", trainer_kwargs={"accelerator": args.accelerator})
    print(f"\n| ingredient | {args.metric} | in soup |\n|---|---|---|")
    for p in args.checkpoints:
        print(f"| {p} | {scores[str(p)]:.4f} | {'yes' if str(p) in chosen else 'no'} |")
    print(f"| **soup** ({len(chosen)} of {len(args.checkpoints)}) | {scores['soup']:.4f} | |")
    save_soup(module, args.checkpoints, chosen, scores, args.output)
    print(f"soup written to {args.output}")
    return {"chosen": chosen, "scores": scores}


if __name__ == "__main__":
    main()

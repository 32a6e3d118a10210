"""Greedy model soup of checkpoints, selected on held-out validation images, reported on the test set.

    python benchmarks/soup.py --checkpoints a.ckpt b.ckpt c.ckpt --data DigitsSSL \
        --data_kwargs '{"num_labeled": 50, "val_labeled_per_class": 5}' --metric val/acc --output soup.ckpt

The DataModule must hold out validation images (``val_labeled_per_class``, ``num_val``, a fold, or
the ingredients' ``split_file``), the ones the ingredients were trained without; selecting on the
test set needs ``--select_on_test`` and is marked in the output. Prints each ingredient's
validation score, which ones the soup kept, the soup's validation score, then the test score of
the soup and of the best single ingredient; writes the soup checkpoint atomically (a temporary
file, then os.replace). Checkpoints written by train.py rebuild their module on their own; others
need ``--model package.Class``.
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
from callbacks.soup import eval_state_dict, load_checkpoint, load_into, save_soup, soup_from_checkpoints  # noqa: E402


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
    parser.add_argument("--select_on_test", action="store_true",
                        help="allow a DataModule that validates on its test set (the test score is then optimistic)")
    args = parser.parse_args(argv)

    datamodule = _resolve(args.data, datamodules)(**json.loads(args.data_kwargs))
    module_class = _resolve(args.model, None) if args.model else None
    module, chosen, scores = soup_from_checkpoints(
        args.checkpoints, datamodule, metric=args.metric, update_bn=args.update_bn, module_class=module_class,
        higher_is_better=args.mode == "max", trainer_kwargs={"accelerator": args.accelerator},
        select_on_test=args.select_on_test)
    selected_on = "the TEST set (optimistic: --select_on_test)" if datamodule.validates_on_test_set else \
        f"{len(datamodule.held_out_ids())} held-out validation images"
    print(f"\nselected on {selected_on}\n| ingredient | {args.metric} | in soup |\n|---|---|---|")
    for p in args.checkpoints:
        print(f"| {p} | {scores[str(p)]:.4f} | {'yes' if str(p) in chosen else 'no'} |")
    print(f"| **soup** ({len(chosen)} of {len(args.checkpoints)}) | {scores['soup']:.4f} | |")
    save_soup(module, args.checkpoints, chosen, scores, args.output)
    print(f"soup written to {args.output}")
    test_metric = args.metric.replace("val/", "test/", 1)
    tests = {"soup": score_on_test(module, datamodule, test_metric, args.accelerator)}
    load_into(module, eval_state_dict(load_checkpoint(chosen[0])))
    tests["best ingredient"] = score_on_test(module, datamodule, test_metric, args.accelerator)
    print(f"on the test set: {test_metric} soup {tests['soup']:.4f}, best ingredient alone ({chosen[0]}) "
          f"{tests['best ingredient']:.4f}")
    return {"chosen": chosen, "scores": scores, "test": tests}


def score_on_test(module, datamodule, metric: str, accelerator: str) -> float:
    """``metric`` of ``module`` on ``datamodule``'s test set."""
    import lightning as L

    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    return float(trainer.test(module, datamodule=datamodule, verbose=False)[0][metric])


if __name__ == "__main__":
    main()

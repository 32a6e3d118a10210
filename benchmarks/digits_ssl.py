"""Supervised vs FixMatch on digits with the quickstart's labels and budget, over several seeds.

    python benchmarks/digits_ssl.py --seeds 0 1 2

Runs ``configs/supervised_digits.yaml`` and ``configs/quickstart.yaml`` through ``train.py``'s
CLI with each seed (the seed of the run and of the labeled split) and prints a Markdown table of
test accuracy (EMA weights after the last step) and wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import cli_main  # noqa: E402

RECIPES = {"Supervised": REPO / "configs" / "supervised_digits.yaml", "FixMatch": REPO / "configs" / "quickstart.yaml"}


def run(config: Path, seed: int, root: str, extra: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(config), "--seed_everything", str(seed), "--data.seed", str(seed),
                    "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", *extra])
    return float(cli.trainer.callback_metrics["test/acc"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("extra", nargs="*", help="more train.py overrides, e.g. --trainer.max_epochs=5")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for name, config in RECIPES.items():
                results[name].append(run(config, seed, root, args.extra))
    print("\n| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | wall time per run |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for name, rows in results.items():
        accs = [100 * a for a, _ in rows]
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs)
              + f" | {statistics.mean(accs):.2f} | {statistics.mean(t for _, t in rows):.0f} s |")


if __name__ == "__main__":
    main()

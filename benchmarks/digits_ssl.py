"""Semi-supervised methods on digits with the quickstart's labels and budget, over several seeds.

    python benchmarks/digits_ssl.py --seeds 0 1 2                    # Supervised vs FixMatch
    python benchmarks/digits_ssl.py --seeds 0 --methods all          # every method

Runs ``configs/quickstart.yaml`` through ``train.py``'s CLI with ``--model <method>`` and each
seed (the seed of the run and of the labeled split) and prints a Markdown table of test accuracy
(EMA weights after the last step) and wall time. Supervised uses ``configs/supervised_digits.yaml``,
the same recipe without unlabeled data.
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

import lightning_modules  # noqa: E402
from train import cli_main  # noqa: E402

SUPERVISED, QUICKSTART = REPO / "configs" / "supervised_digits.yaml", REPO / "configs" / "quickstart.yaml"
# Schedules counted in steps of a 2^20-step recipe, shortened for the 1,000-step run as the ramp-ups are.
# Dash: warm-up 50 steps (USB's 2048 of 2^20 would be 2 steps here, too few to train anything) and an
# update of its threshold every 10 steps (1 % of the run, as USB's 10240 of 2^20).
# LabelPropagation: supervised for the first half of the 10 epochs (the paper's 180 of 360), then a propagation
# at the start of each epoch.
# CoMatch: a queue of 5 steps' rows (USB's queue_batch 5), 5 x (32 + 7 x 32) = 1280 at this batch size.
# SimMatchV2: 32 steps' unlabeled rows (7 x 32 each), where the authors keep 256 steps' of a 300-epoch run.
SHORTENED = {"Dash": ["--model.supervised_warmup_steps", "50", "--model.rho_update_steps", "10"],
             "LabelPropagation": ["--model.warmup_epochs", "5"],
             "CoMatch": ["--model.queue_size", "1280"], "SimMatchV2": ["--model.queue_size", "7168"],
             # The ladder is its own MLP over the 64 pixels, trained with the paper's Adam (ssl/ladder.py).
             "LadderNetwork": ["--model.network", "mlp", "--model.input_features", "64", "--model.lr", "0.002",
                               "--model.weight_decay", "0"],
             # The Gamma model at the authors' MNIST Conv-Small Gamma cost (CuriousAI/ladder README line 83:
             # denoising cost 1 on the top), not the CIFAR recipe's 4, which collapses here (docs/results.md).
             "LadderGamma": ["--model.lr", "0.002", "--model.weight_decay", "0", "--model.unlabeled_loss_weight", "1"]}


def run(method: str, seed: int, root: str, extra: list[str], rampup_steps: int) -> tuple[float, float]:
    start = time.perf_counter()
    recipe = ["--config", str(SUPERVISED)] if method == "Supervised" else \
        ["--config", str(QUICKSTART), "--model", method, "--model.rampup_steps", str(rampup_steps),
         *SHORTENED.get(method, [])]
    cli = cli_main(["fit", *recipe, "--seed_everything", str(seed), "--data.seed", str(seed),
                    "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", *extra])
    return float(cli.trainer.callback_metrics["test/acc"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["Supervised", "FixMatch"],
                        help="method class names, or 'all' for every semi-supervised method")
    parser.add_argument("--rampup_steps", type=int, default=400,
                        help="ramp-up length for methods that ramp lambda_u (their recipes assume 2^20 steps)")
    parser.add_argument("extra", nargs="*", help="more train.py overrides, e.g. --trainer.max_epochs=5")
    args = parser.parse_args()
    methods = list(lightning_modules.SSL_METHODS) if args.methods == ["all"] else args.methods
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for name in methods:
                results[name].append(run(name, seed, root, args.extra, args.rampup_steps))
                print(f"{name} seed {seed}: test accuracy {100 * results[name][-1][0]:.2f} %", flush=True)
    print("\n| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | wall time per run |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for name, rows in results.items():
        accs = [100 * a for a, _ in rows]
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs)
              + f" | {statistics.mean(accs):.2f} | {statistics.mean(t for _, t in rows):.0f} s |")


if __name__ == "__main__":
    main()

"""EMA test accuracy against training wall time: FixMatch and Supervised on CIFAR-10 with 4000 labels.

    python benchmarks/time_to_accuracy.py --budgets 240 60                 # the GPU run (device_suite.sh)
    python benchmarks/time_to_accuracy.py --budgets 10 6 --eval-every 4 --batch-size 4 --uratio 2   # CPU smoke

Issue 17's goal: >= 90 % test accuracy (EMA weights) within 7 minutes; kekmodel/FixMatch-pytorch reached
74.7 % after 8.5 minutes (ANCHORS.md). Each method trains WRN-28-2 on the CIFAR-10 JPEGs (all 50,000
training images, 4000 of them labeled, class-balanced) for ``--budgets`` seconds of training wall time; every
``--eval-every`` seconds the EMA weights are evaluated on the 10,000 test images (that time is not counted).
The cosine schedule's length is the number of steps expected in the budget, from a short probe run of the
same configuration (eager). Writes ``--out``/tta.md and tta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_common import REPO, StepClock, cifar_data, device_name, synchronize, trainer, unpack_cifar  # noqa: E402

from lightning import Callback  # noqa: E402
from lightning_modules import FixMatch, Supervised  # noqa: E402

METHODS = {"FixMatch": FixMatch, "Supervised": Supervised}


class AccuracyClock(Callback):
    """Counts training wall time only; evaluates the EMA weights every ``every`` seconds; stops at ``budget``."""

    def __init__(self, test: tuple[torch.Tensor, torch.Tensor], data, budget: float, every: float,
                 precision: str) -> None:
        self.test, self.data, self.budget, self.every, self.precision = test, data, budget, every, precision
        self.trained, self.since, self.curve = 0.0, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.since is None:
            self.since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due = len(self.curve) + 1
        elapsed = self.trained + time.perf_counter() - self.since
        if elapsed >= min(due * self.every, self.budget):
            synchronize()
            self.trained += time.perf_counter() - self.since
            self.curve.append((self.trained, trainer.global_step, self.accuracy(pl_module)))
            print(f"  {self.trained:7.1f} s  step {trainer.global_step:6d}  EMA test acc {self.curve[-1][2]:.2%}",
                  flush=True)
            if self.trained >= self.budget:
                trainer.should_stop = True
            self.since = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.since is not None and (not self.curve or self.curve[-1][1] != trainer.global_step):
            synchronize()
            self.trained += time.perf_counter() - self.since
            self.curve.append((self.trained, trainer.global_step, self.accuracy(pl_module)))

    @torch.no_grad()
    def accuracy(self, module) -> float:
        images, targets = self.test
        net, correct = module.eval_net.eval(), 0
        dtype = torch.bfloat16 if self.precision.startswith("bf16") else torch.float32
        for start in range(0, len(images), 1000):
            x = self.data.to_float(images[start:start + 1000].to(module.device, non_blocking=True))
            with torch.autocast(module.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = net(x)
            correct += (logits.argmax(1).cpu() == targets[start:start + 1000]).sum().item()
        return correct / len(images)


def probe_ms(method, args, data, options: dict) -> float:
    """ms per step of ``method`` in this configuration, eager (the schedule's length comes from it)."""
    clock = StepClock(args.probe_warmup, args.probe_steps)
    eager = {k: v for k, v in options.items() if k != "compile"}
    trainer(args.probe_warmup + args.probe_steps, args.precision, [clock]).fit(method(**model_args(args, eager)), data)
    return clock.ms_per_step()


def model_args(args, options: dict) -> dict:
    return dict(num_classes=10, in_channels=3, network=args.network, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/labelwise-cifar10"),
                        help="ImageFolder root; unpacked from the tarballs if missing")
    parser.add_argument("--train-per-class", type=int, default=None, help="a subset (smoke runs); default all")
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--num-labeled", type=int, default=4000)
    parser.add_argument("--methods", nargs="+", default=["FixMatch", "Supervised"], choices=sorted(METHODS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[240.0, 60.0], help="seconds, one per method")
    parser.add_argument("--eval-every", type=float, default=30.0)
    parser.add_argument("--network", default="wrn28_2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--uratio", type=int, default=7)
    parser.add_argument("--precision", default="bf16-mixed" if torch.cuda.is_available() else "32-true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-grad-weak", action="store_true", help="FixMatch's weak view under no_grad")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--probe-warmup", type=int, default=10)
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".cache" / "tta")
    args = parser.parse_args(argv)
    if len(args.budgets) != len(args.methods):
        parser.error(f"--budgets needs one value per method ({len(args.methods)}), got {len(args.budgets)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    unpack_cifar(args.data, args.train_per_class, args.test_per_class)
    header = (f"device: {device_name()}; torch {torch.__version__}; CIFAR-10 JPEGs, {args.num_labeled} labels, "
              f"{args.network}, batch {args.batch_size} (+{args.uratio}x unlabeled), {args.precision}, "
              f"channels_last={args.channels_last}, no-grad weak={args.no_grad_weak}, compile={args.compile}; "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(header, flush=True)
    results = []
    for name, budget in zip(args.methods, args.budgets):
        method = METHODS[name]
        options = {"channels_last": args.channels_last, "compile": args.compile}
        if name == "FixMatch":
            options["no_grad_target_views"] = args.no_grad_weak
        data = cifar_data(args.data, args.num_labeled, args.batch_size, args.uratio, steps_per_epoch=1024)
        ms = probe_ms(method, args, data, options)
        steps = max(10, int(budget * 1e3 / ms))
        data.setup("test")
        clock = AccuracyClock(data._test, data, budget, args.eval_every, args.precision)
        print(f"{name}: probe {ms:.1f} ms/step -> schedule of {steps} steps for {budget:.0f} s", flush=True)
        start = time.perf_counter()
        trainer(steps, args.precision, [clock]).fit(method(**model_args(args, options)), data)
        results.append({"method": name, "budget_s": budget, "probe_ms_per_step": ms, "schedule_steps": steps,
                        "wall_s": time.perf_counter() - start,
                        "curve": [{"train_s": t, "step": s, "ema_test_acc": a} for t, s, a in clock.curve]})
    lines = [header, "", "| method | train s | steps | EMA test acc |", "|---|---:|---:|---:|"]
    for r in results:
        lines += [f"| {r['method']} | {p['train_s']:.0f} | {p['step']} | {p['ema_test_acc']:.2%} |" for p in r["curve"]]
    (args.out / "tta.md").write_text("\n".join(lines) + "\n")
    (args.out / "tta.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

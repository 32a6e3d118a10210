"""FixMatch's training step through the Lightning Trainer, one row per optimization switched on cumulatively.

    python benchmarks/speed_fixmatch.py                                    # the GPU table (device_suite.sh)
    python benchmarks/speed_fixmatch.py --batch-size 4 --uratio 2 --warmup 3 --steps 6 --window 3   # CPU smoke

Rows: fp32 -> bf16 autocast -> + channels_last -> + weak view under no_grad -> + torch.compile (issue 17;
the options are in lightning_modules/core/fast_path.py). Every row is a fresh WRN-28-2 FixMatch trained on
real CIFAR-10 images (the JPEG tarballs) with the recipe's batch (64 labeled + 448 weak + 448 strong), its
augmentation on the device, the EMA update and logging included. ms/step is the median over windows of
``--window`` steps after ``--warmup`` steps (compilation and autotuning happen there); img/s counts the
960 images a step forwards. The best row is then profiled: the device time between Lightning's hook points
(augmentation, forward + loss, backward, optimizer, EMA, the rest) and torch.profiler's top kernels.
Writes ``--out``/speed.md, speed.json and profile.txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_common import REPO, StepClock, cifar_data, device_name, synchronize, trainer, unpack_cifar  # noqa: E402

from lightning import Callback  # noqa: E402
from lightning_modules import FixMatch  # noqa: E402

ROWS = [  # (label, precision, model options), cumulative
    ("fp32", "32-true", {}),
    ("bf16 autocast", "bf16-mixed", {}),
    ("+ channels_last", "bf16-mixed", {"channels_last": True}),
    ("+ weak view under no_grad", "bf16-mixed", {"channels_last": True, "no_grad_target_views": True}),
    ("+ torch.compile", "bf16-mixed", {"channels_last": True, "no_grad_target_views": True, "compile": True}),
]
PHASES = ("augmentation", "forward + loss", "backward", "optimizer", "EMA", "rest of step", "between steps")


class Marks:
    """Time stamps on the device's timeline (CUDA events), or the host's on the CPU."""

    def __init__(self) -> None:
        self.cuda, self.steps, self.current = torch.cuda.is_available(), [], None

    def mark(self, name: str) -> None:
        if self.current is None:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.current[name] = event
        else:
            self.current[name] = time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def phases(self) -> dict[str, float]:
        synchronize()
        rows = []
        for step, following in zip(self.steps, self.steps[1:]):
            m = {**step, "next": following["augment_start"]}
            order = ["augment_start", "augment_end", "step_start", "forward_end", "backward_end", "closure_end",
                     "ema_start", "ema_end", "step_end", "next"]
            if not all(k in m for k in order):
                continue
            span = lambda a, b: self.ms(m[a], m[b])  # noqa: E731
            rows.append({"augmentation": span("augment_start", "augment_end"),
                         "forward + loss": span("step_start", "forward_end"), "backward": span("forward_end", "backward_end"),
                         "optimizer": span("backward_end", "ema_start"), "EMA": span("ema_start", "ema_end"),
                         "rest of step": span("ema_end", "step_end"),
                         "between steps": span("step_end", "next") + span("augment_end", "step_start"),
                         "total": span("augment_start", "next")})
        return {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "total")} if rows else {}


class PhaseMarks(Callback):
    def __init__(self, marks: Marks, skip: int) -> None:
        self.marks, self.skip, self.seen = marks, skip, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.mark("step_start")

    def on_before_backward(self, trainer, pl_module, loss):
        self.marks.mark("forward_end")

    def on_after_backward(self, trainer, pl_module):
        self.marks.mark("backward_end")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.marks.mark("closure_end")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.marks.mark("step_end")


class Profile(Callback):
    """torch.profiler over ``active`` steps after ``wait`` steps."""

    def __init__(self, wait: int, active: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities,
                                               schedule=torch.profiler.schedule(wait=wait, warmup=1, active=active))

    def on_train_start(self, trainer, pl_module):
        self.profiler.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.profiler.step()

    def on_train_end(self, trainer, pl_module):
        self.profiler.stop()

    def table(self, rows: int = 15) -> str:
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=key, row_limit=rows)


def build(args, options: dict) -> FixMatch:
    return FixMatch(num_classes=10, in_channels=3, network=args.network, **options)


def marked_data(data, marks: Marks):
    """The DataModule with its view-making hook marked (augmentation on the device)."""
    hook = type(data).on_after_batch_transfer.__get__(data)

    def on_after_batch_transfer(batch, dataloader_idx):
        marks.current = {}
        marks.steps.append(marks.current)
        marks.mark("augment_start")
        out = hook(batch, dataloader_idx)
        marks.mark("augment_end")
        return out

    data.on_after_batch_transfer = on_after_batch_transfer
    return data


def profile_row(args, data, precision: str, options: dict) -> tuple[dict, str]:
    marks = Marks()
    model = build(args, options)
    update = model.ema.update

    def timed_update(net):
        marks.mark("ema_start")
        update(net)
        marks.mark("ema_end")

    model.ema.update = timed_update
    profile = Profile(wait=args.warmup, active=args.profile_steps)
    steps = args.warmup + 1 + args.profile_steps + 1
    trainer(steps, precision, [PhaseMarks(marks, args.warmup), profile]).fit(model, marked_data(data, marks))
    marks.steps = marks.steps[args.warmup:]
    return marks.phases(), profile.table()


def write(out: Path, lines: list[str], header: str, rows: list[dict], **extra) -> None:
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    (out / "speed.json").write_text(json.dumps({"header": header, "rows": rows, **extra}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/labelwise-cifar10-speed"),
                        help="ImageFolder root; made from the tarballs if missing (410 train, 10 test images per class)")
    parser.add_argument("--network", default="wrn28_2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--uratio", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per row")
    parser.add_argument("--window", type=int, default=20, help="steps per timed window")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=len(ROWS), help="the first N rows only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".cache" / "speed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    unpack_cifar(args.data, train_per_class=410, test_per_class=10)
    images = args.batch_size * (1 + 2 * args.uratio)
    data = cifar_data(args.data, num_labeled=4000, batch_size=args.batch_size, uratio=args.uratio,
                      steps_per_epoch=args.warmup + args.steps + args.profile_steps + 4)
    header = (f"device: {device_name()}; torch {torch.__version__}; {args.network}, {args.batch_size} labeled + "
              f"{args.batch_size * args.uratio} weak + {args.batch_size * args.uratio} strong = {images} images per step; "
              f"median of {args.steps // args.window} windows of {args.window} steps after {args.warmup} warm-up steps; "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    lines = [header, "", "| optimizations (cumulative) | ms/step | img/s | x fp32 |", "|---|---:|---:|---:|"]
    results = []
    for label, precision, options in ROWS[:args.rows]:
        clock = StepClock(args.warmup, args.window)
        start = time.perf_counter()
        try:
            trainer(args.warmup + args.steps, precision, [clock]).fit(build(args, options), data)
            ms = clock.ms_per_step()
            results.append({"row": label, "precision": precision, "options": options, "ms_per_step": ms,
                            "images_per_second": images / ms * 1e3, "seconds": time.perf_counter() - start})
            base = results[0]["ms_per_step"]
            lines.append(f"| {label} | {ms:.1f} | {images / ms * 1e3:,.0f} | {base / ms:.2f} |")
        except Exception as error:  # noqa: BLE001 - a failed row is reported, the others still run
            traceback.print_exc()
            results.append({"row": label, "precision": precision, "options": options, "error": repr(error)[:300]})
            lines.append(f"| {label} | failed: {type(error).__name__} | | |")
        print(lines[-1], flush=True)
        write(args.out, lines, header, results)  # row by row: a run stopped by its time limit keeps its rows
    timed = [r for r in results if "ms_per_step" in r]
    best = min(timed, key=lambda r: r["ms_per_step"])
    phases, table = profile_row(args, data, best["precision"], best["options"])
    total = phases.get("total", float("nan"))
    lines += ["", f"Profile of the best row ({best['row']}): median ms per step between hook points "
              f"({'CUDA events, device timeline' if torch.cuda.is_available() else 'host clock'})", "",
              "| phase | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {phases[k]:.2f} | {phases[k] / total:.0%} |" for k in PHASES if k in phases]
    lines.append(f"| total | {total:.2f} | |")
    write(args.out, lines, header, results, best=best["row"], phases=phases)
    (args.out / "profile.txt").write_text(f"{header}\nbest row: {best['row']}\n\n{table}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

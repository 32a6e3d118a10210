"""How long every recipe in configs/ takes: measured seconds per step and per test pass, extrapolated.

    python benchmarks/recipe_times.py                     # every recipe, this machine's CPU
    python benchmarks/recipe_times.py --recipes quickstart unet3plus_membrane --steps 5

Each recipe is built as ``train.py`` builds it (``cli_main``) and trained for ``--warmup`` + ``--steps``
steps; the seconds per step are the wall time between the starts of the measured steps (loading,
augmentation, forward, backward, optimizer and EMA), averaged. One test pass is timed on the data at
hand and scaled to the recipe's test set. A recipe's wall time is then steps x seconds per step +
(validations + 1 test) x seconds per pass. Data: CIFAR-10 recipes read the shared JPEGs through
``ImageFolderSSL`` (same image size as torchvision's CIFAR-10; CIFAR-100's recipe too, with 10
classes: its time is the WRN-28-8 body's), the membrane and coco128 recipes the shared folders, the
membrane-cells recipes a set written by membrane_cells_to_coco.py; distillation teachers are the
checkpoints of the teacher recipes' own short runs. Writes ``docs/results/recipe_times.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import subprocess
import tarfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from benchmarks.membrane_cells_to_coco import write_membrane_cells_coco  # noqa: E402
from benchmarks.report import report_header, write_report  # noqa: E402
from lightning_modules.core.training_checks import NonFiniteLossError  # noqa: E402
from train import cli_main  # noqa: E402

# Recipes whose checkpoints later recipes read, first; the rest in name order.
PRODUCERS = {"teacher_wrn40_2_cifar10": "runs/teacher_wrn40_2_cifar10/teacher.ckpt",
             "supervised_full_cifar10": "runs/supervised_full_cifar10/student.ckpt",
             "fixmatch_cifar10": "runs/fixmatch_cifar10/teacher.ckpt"}
MAX_STEPS = 200  # measured steps at most (light recipes); heavy ones stop after --steps and --seconds
TEST_IMAGES = {"CIFAR10SSL": 10_000, "CIFAR100SSL": 10_000}  # full test sets where a subset is timed


class StepClock(Callback):
    """Start time of every training step (after the batch is loaded, moved and augmented); stops the fit
    once ``warmup`` steps (and ``warmup_seconds``) are done and ``steps`` more and ``seconds`` have passed."""

    def __init__(self, warmup: int, steps: int, seconds: float, warmup_seconds: float = 3.0) -> None:
        self.warmup, self.steps, self.seconds, self.warmup_seconds = warmup, steps, seconds, warmup_seconds
        self.starts: list[float] = []
        self.first: int | None = None  # index of the first measured start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.starts.append(now)
        if self.first is None and len(self.starts) > self.warmup and now - self.starts[0] >= self.warmup_seconds:
            self.first = len(self.starts) - 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first is None:
            return
        measured, elapsed = len(self.starts) - self.first, time.perf_counter() - self.starts[self.first]
        if (measured >= self.steps and elapsed >= self.seconds) or measured >= MAX_STEPS:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        measured = self.starts[self.first:]
        return (measured[-1] - measured[0]) / (len(measured) - 1)


def cifar_folder(shared: Path, root: Path, per_class: int = 410, test_per_class: int = 10) -> Path:
    """An ImageFolder tree of the shared CIFAR-10 JPEGs: enough training images for 4,000 labels."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        counts: dict[str, int] = {}
        with tarfile.open(shared / "cifar10" / f"{split}.tar.gz") as tar:
            for member in tar:
                label, _, name = member.name.rpartition("/")
                label = label.rpartition("/")[2]
                if member.isfile() and name.endswith(".jpg") and counts.get(label, 0) < n:
                    counts[label] = counts.get(label, 0) + 1
                    (root / split / label).mkdir(parents=True, exist_ok=True)
                    (root / split / label / name).write_bytes(tar.extractfile(member).read())
    return root


def data_arguments(recipe: Path, cifar: Path, cells: Path) -> list[str]:
    text = recipe.read_text()
    if "datamodules.CIFAR10SSL" in text or "datamodules.CIFAR100SSL" in text:
        labels = yaml.safe_load(text)["data"]["init_args"].get("num_labeled")
        fewer = ["--data.num_labeled", "4000"] if labels and labels > 4000 else []  # the folder has 4,100
        return ["--data", "ImageFolderSSL", "--data.root", str(cifar), *fewer]
    return ["--data.root", str(cells)] if "membrane_cells" in text else []


def measure(recipe: Path, args: argparse.Namespace, cifar: Path, cells: Path) -> dict:
    cli = cli_main(["--config", str(recipe), *data_arguments(recipe, cifar, cells), "--trainer.max_steps", "100000",
                    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger",
                    "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
                   run=False)
    trainer, clock = cli.trainer, StepClock(args.warmup, args.steps, args.seconds)
    trainer.callbacks.append(clock)
    written = yaml.safe_load(recipe.read_text())  # the recipe's own length, not this run's
    trainer_config, data_config = written["trainer"], written["data"].get("init_args", {})
    epochs = trainer_config.get("max_epochs", 1024)  # train.py's default: 1024 epochs
    total = trainer_config.get("max_steps") or epochs * data_config.get("steps_per_epoch", 1024)
    validations = epochs // trainer_config.get("check_val_every_n_epoch", 1)
    diverged = None
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule)
    except NonFiniteLossError as error:  # timed up to there, and said so in the table
        if clock.first is None or len(clock.starts) - clock.first < 2:
            raise
        clock.starts.append(time.perf_counter())
        diverged = str(error).split(";")[0]
    if recipe.stem in PRODUCERS:
        trainer.save_checkpoint(PRODUCERS[recipe.stem])
    per_step = clock.seconds_per_step()
    start = time.perf_counter()
    trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    per_pass = time.perf_counter() - start
    data_class = cli.config.data.class_path.rpartition(".")[2]
    original = recipe.read_text()
    for name, size in TEST_IMAGES.items():  # the CIFAR subset's test pass, scaled to the real test set
        if f"datamodules.{name}" in original:
            per_pass *= size / len(cli.datamodule.test_dataloader().dataset)
    return {"recipe": recipe.stem, "data": data_class, "steps": int(total), "seconds_per_step": per_step,
            "measured_steps": len(clock.starts) - clock.first - 1, "validations": int(validations),
            "seconds_per_pass": per_pass,
            "hours": (total * per_step + (validations + 1) * per_pass) / 3600, "load": os.getloadavg()[0],
            "diverged": diverged}


def table(rows: list[dict], gpu_ms_fixmatch: float) -> list[str]:
    """The report's table; the GPU column scales each CPU step by FixMatch's CPU/GPU ratio (see the module)."""
    fixmatch = next((r["seconds_per_step"] for r in rows if r["recipe"] == "fixmatch_cifar10"), None)
    lines = ["| recipe | steps | CPU s/step | CPU test pass | CPU total (estimate) | GPU total (estimate) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["recipe"]):
        gpu = "" if fixmatch is None else \
            _duration(r["steps"] * r["seconds_per_step"] * gpu_ms_fixmatch / 1000 / fixmatch)
        lines.append(f"| {r['recipe']} | {r['steps']:,} | {r['seconds_per_step']:.2f} | {r['seconds_per_pass']:.0f} s"
                     f" | {_duration(r['hours'] * 3600)} | {gpu} |")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:.0f} days"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", help="recipe names (default: every recipe in configs/)")
    parser.add_argument("--warmup", type=int, default=2, help="steps (and at least 3 s) before measuring")
    parser.add_argument("--steps", type=int, default=3, help="measured steps, at least")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds, at least")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--gpu-ms-fixmatch", type=float, default=62.0,
                        help="FixMatch's step on one GPU, ms (ANCHORS.md: WRN-28-2, GPU-resident data, fp32, H100)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".cache" / "recipe_times_work")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # measure one recipe in this process (the parent's child)
    parser.add_argument("--again", action="store_true", help="measure recipes already in --results again")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / ".cache" / "recipe_times.json")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "recipe_times.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # cli_main(args=...) on purpose
    if args.one:
        cells = args.work / "data" / "membrane_cells"
        print(json.dumps(measure(REPO / "configs" / f"{args.one}.yaml", args, args.work / "cifar10", cells)))
        return
    names = args.recipes or sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    names = [n for n in PRODUCERS if n in names] + [n for n in names if n not in PRODUCERS]
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    args.work.mkdir(parents=True, exist_ok=True)  # runs/, the teachers' checkpoints and the data sets
    if not (args.work / "cifar10" / "test").is_dir():
        cifar_folder(args.shared, args.work / "cifar10")
    if not (args.work / "data" / "membrane_cells").is_dir():
        write_membrane_cells_coco(args.shared / "membrane", args.work / "data" / "membrane_cells")
    for name in names:
        if name in results and not args.again and (name not in PRODUCERS or (args.work / PRODUCERS[name]).is_file()):
            continue  # measured already (a producer also wrote the checkpoint later recipes read)
        # a fresh process per recipe: one that trained a large model before times later recipes 2-10x slower
        run = subprocess.run([sys.executable, __file__, "--one", name, *sys.argv[1:]], cwd=args.work,
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{name}: exit status {run.returncode}: {run.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        result = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        earlier = results.get(name)  # on a shared machine the fastest run is the least disturbed one
        best = result if earlier is None or result["seconds_per_step"] < earlier["seconds_per_step"] else earlier
        results[name] = {**best, "runs": (earlier or {}).get("runs", 1) + (earlier is not None)}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
    lines = report_header("Wall time of every recipe", "cpu", 0) + ["", *table(list(results.values()),
                                                                             args.gpu_ms_fixmatch)]
    write_report(args.output, lines)


if __name__ == "__main__":
    main()

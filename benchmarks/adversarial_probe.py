"""Adversarial KD's discriminator and student, step by step, on the KD table's CPU budget (issue 19).

    python benchmarks/adversarial_probe.py --steps 120 --options '{"discriminator_input": "logits"}' '{}'

Trains the ``adversarial KD`` row of ``benchmarks/kd_table.py`` (wrn10_1 from the cached wrn16_2 teacher, batch
64, SGD lr 0.05 with the 400-step cosine schedule) once per ``--options`` (extra ``KDStudent`` arguments, JSON)
for ``--steps`` steps or until the loss is not finite, and prints per step: the student's terms, the gradient
norms of the student and the discriminator (before the optimizer step), the logits' scales and the
discriminator's verdicts ``D(x(z))`` on the batch; then a summary line per run. Needs the teacher that
``kd_table.py --budget cpu`` caches in ``benchmarks/.cache``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.kd_table import BUDGETS  # noqa: E402
from benchmarks.ssl_table import unpack  # noqa: E402
from datamodules import ImageFolderSSL  # noqa: E402
from lightning_modules import KDStudent  # noqa: E402
from lightning_modules.core.training_checks import NonFiniteLossError  # noqa: E402

SUMMARY = ("grad_student", "grad_discriminator", "verdict_absmax", "student_logit_absmax")


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.stack([t.norm() for t in tensors]).norm()) if tensors else 0.0


class Probe(L.Callback):
    """One row per optimizer step: gradients, logits and verdicts on the step's labeled images before the step."""

    def __init__(self, steps: int) -> None:
        self.steps, self.rows = steps, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.images = batch["labeled"]["image"]

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        row = {"step": trainer.global_step}
        row["grad_student"] = norm([p.grad for p in module.net.parameters() if p.grad is not None])
        row["grad_discriminator"] = norm([p.grad for p in module.discriminator.parameters() if p.grad is not None])
        row["discriminator_lr"] = [g["lr"] for g in optimizer.param_groups
                                   if any(p is q for p in g["params"] for q in module.discriminator.parameters())][0]
        with torch.no_grad():
            student, teacher = module.net(self.images), module.teacher(self.images)
            fake, real = module.discriminator(student), module.discriminator(teacher)
        row.update(student_logit_std=float(student.std()), student_logit_absmax=float(student.abs().max()),
                   teacher_logit_std=float(teacher.std()), teacher_logit_absmax=float(teacher.abs().max()),
                   verdict_student=float(fake.mean()), verdict_teacher=float(real.mean()),
                   verdict_absmax=float(torch.cat([fake, real]).abs().max()))
        self.rows.append(row)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        row = self.rows[-1]  # the step's terms, logged by its training_step
        row.update({k[6:]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        trainer.should_stop = trainer.global_step >= self.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--options", nargs="+", default=["{}"], help="KDStudent arguments per run, JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache")
    args = parser.parse_args()
    budget = BUDGETS["cpu"]
    teacher = args.cache / f"teacher_cpu_{budget['teacher']}_{budget['teacher_steps']}_seed{args.seed}.ckpt"
    if not teacher.exists():
        raise SystemExit(f"{teacher} not found: run benchmarks/kd_table.py --budget cpu --methods KD first")
    with tempfile.TemporaryDirectory() as tmp:
        data = ImageFolderSSL(root=str(unpack(args.shared, Path(tmp))), num_labeled=None,
                              batch_size=budget["batch_size"], steps_per_epoch=budget["student_steps"],
                              seed=args.seed, mean=[0.4914, 0.4822, 0.4465], std=[0.2471, 0.2435, 0.2616])
        data.setup("fit")
        for options in args.options:
            L.seed_everything(args.seed, verbose=False)
            model = KDStudent(teacher=str(teacher), network=budget["student"], test_teacher=False, num_classes=10,
                              in_channels=3, network_kwargs={"bn_momentum": budget["bn_momentum"]},
                              ema_decay=budget["ema_decay"], lr=0.05, adversarial_weight=1.0, **json.loads(options))
            probe = Probe(args.steps)
            trainer = L.Trainer(default_root_dir=tmp, max_steps=budget["student_steps"], accelerator="cpu",
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                                callbacks=[probe])
            stopped = "no"
            try:
                trainer.fit(model, data)
            except NonFiniteLossError as error:
                stopped = str(error).split(";")[0]
            rows = probe.rows
            print(f"SUMMARY {options}: {len(rows)} steps, non-finite: {stopped}; max "
                  + ", ".join(f"{k} {max(r[k] for r in rows):.4g}" for k in SUMMARY)
                  + f"; last discriminator_loss {rows[-1]['discriminator_loss']:.3f}, labeled_loss "
                  f"{rows[-1]['labeled_loss']:.3f}, kd_loss {rows[-1]['kd_loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Iterative self-training in the manner of Noisy Student (Xie, Luong, Hovy and Le, CVPR 2020, "Self-training
with Noisy Student improves ImageNet classification"), as rounds of :class:`KDStudent` with ``distill_unlabeled``.

Round 0 trains a teacher on the labeled images (``Supervised``, the recipe's network and noise). Round
``r >= 1`` trains a student of equal or larger size (``student_networks``) on the labeled images with their
labels plus every unlabeled image with the round ``r - 1`` model's soft predictions as its target, the
teacher frozen in eval mode (no dropout, no stochastic depth) and the student noised by the recipe's
``network_kwargs`` (dropout, stochastic depth) and augmentation. The student's EMA weights, the weights its
test accuracy was measured on, become the next round's teacher (``load_teacher`` takes a checkpoint's EMA).

The recipe's ``KDStudent`` arguments set the loss; Noisy Student's soft pseudo-labels for in-domain data
are ``temperature 1, ce_weight 1, kd_weight 1``: ``L = CE(y, p_s(x_l)) + KL(p_t(x) || p_s(x))`` over the
labeled and unlabeled images of the step, whose gradient is the paper's soft-target cross-entropy
(the KL differs by the teacher's entropy, a constant). Hard pseudo-labels are not offered. Two
differences from the paper: the teacher sees the student's (weakly augmented) image, not the clean one,
because ``KDStudent`` feeds both networks one view; and RandAugment is not applied to the student's input.

Each round runs in ``<folder>/round_<r>/``; its final checkpoint is copied to ``<folder>/round_<r>.ckpt``
and ``summary.json`` / ``summary.csv`` (rewritten whole after every round) list round, model, network,
teacher, checkpoint, test accuracy and seconds. A rerun with the same folder skips the rounds the summary
lists whose checkpoint exists, so an interrupted loop continues with the round it was in (that round
starts over). The command line (``labelwise self-train``) is in ``train.py``; this module runs the loop
given a function that trains one round.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from lightning_modules.classification.networks import build_network
from lightning_modules.core.atomic import atomic_path, write_json_atomically, write_text_atomically
from lightning_modules.core.checkpoint_loading import read_checkpoint

#: trains one round from its command-line arguments; returns (its final checkpoint, its test accuracy)
FitRound = Callable[[list[str]], tuple[str, float]]
FIELDS = ("round", "model", "network", "teacher", "checkpoint", "test_acc", "seconds")


def parameter_count(network: str, num_classes: int, in_channels: int) -> int:
    net = build_network(network, num_classes=num_classes, in_channels=in_channels)
    return sum(p.numel() for p in net.parameters())


def check_student_size(teacher_checkpoint: str | Path, student_network: str | None) -> str:
    """The student's network (the teacher's when None); refused if it has fewer parameters than the teacher's."""
    hparams = read_checkpoint(teacher_checkpoint, "teacher checkpoint", mmap=True)["hyper_parameters"]
    teacher_network, classes, channels = hparams["network"], hparams["num_classes"], hparams["in_channels"]
    student_network = student_network or teacher_network
    teacher_size = parameter_count(teacher_network, classes, channels)
    student_size = parameter_count(student_network, classes, channels)
    if student_size < teacher_size:
        raise ValueError(f"Noisy Student trains an equal-or-larger student: {student_network} has {student_size:,} "
                         f"parameters, fewer than the teacher's {teacher_network} ({teacher_size:,}); pick a larger "
                         "network in --student_networks")
    return student_network


def round_arguments(round_index: int, folder: Path, teacher: str | None, network: str | None) -> list[str]:
    """The overrides of round ``round_index`` on top of the recipe's arguments."""
    args = ["--trainer.default_root_dir", str(folder / f"round_{round_index}")]
    if teacher is None:
        return args + ["--model", "Supervised"]
    return args + ["--model", "KDStudent", "--model.teacher", teacher, "--model.distill_unlabeled", "true",
                   *(["--model.network", network] if network else [])]


def read_summary(folder: Path) -> list[dict]:
    """The finished rounds the summary lists, in order, up to the first whose checkpoint is missing."""
    path = folder / "summary.json"
    if not path.exists():
        return []
    finished = []
    for record in json.loads(path.read_text())["rounds"]:
        if record["round"] != len(finished) or not Path(record["checkpoint"]).exists():
            break
        finished.append(record)
    return finished


def write_summary(folder: Path, rounds: list[dict], recipe: list[str]) -> None:
    write_json_atomically(folder / "summary.json", {"recipe": recipe, "rounds": rounds}, indent=2)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rounds)
    write_text_atomically(folder / "summary.csv", text.getvalue())


def run_self_training(fit_round: FitRound, recipe: list[str], rounds: int, folder: str | Path,
                      student_networks: Sequence[str] | None = None,
                      log: Callable[[str], None] = print) -> list[dict]:
    """Round 0 (the teacher) and ``rounds`` student rounds; returns the summary's records.

    ``recipe`` holds the arguments every round shares (``--config ...`` and overrides); ``student_networks``
    one network for every student round, or one per round (None: the recipe's network throughout).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1 (round 0 trains the teacher, then one student per round), "
                         f"got {rounds}")
    networks = list(student_networks or [])
    if len(networks) not in (0, 1, rounds):
        raise ValueError(f"--student_networks gives one network for every round or one per round ({rounds}), "
                         f"got {len(networks)}: {networks}")
    networks = networks * rounds if len(networks) == 1 else networks or [None] * rounds
    folder = Path(folder)
    done = read_summary(folder)[: rounds + 1]
    for record in done:
        asked = networks[record["round"] - 1] if record["round"] else None
        if asked is not None and asked != record["network"]:
            raise ValueError(f"{folder} holds round {record['round']} trained with {record['network']}, but "
                             f"{asked} is asked for: use another folder or the same --student_networks")
        log(f"self-training round {record['round']}: done before ({record['model']} {record['network']}, "
            f"test accuracy {100 * record['test_acc']:.2f} %), skipped")
    for index in range(len(done), rounds + 1):
        teacher = done[-1]["checkpoint"] if done else None
        network = check_student_size(teacher, networks[index - 1]) if teacher else None
        start = time.perf_counter()
        checkpoint, accuracy = fit_round(recipe + round_arguments(index, folder, teacher, network))
        kept = folder / f"round_{index}.ckpt"
        with atomic_path(kept) as tmp:
            shutil.copyfile(checkpoint, tmp)
        stored = read_checkpoint(kept, "round checkpoint", mmap=True)["hyper_parameters"]
        done.append({"round": index, "model": "KDStudent" if teacher else "Supervised", "network": stored["network"],
                     "teacher": teacher, "checkpoint": str(kept), "test_acc": accuracy,
                     "seconds": round(time.perf_counter() - start, 1)})
        write_summary(folder, done, recipe)
        log(f"self-training round {index}: {done[-1]['model']} {stored['network']}, test accuracy "
            f"{100 * accuracy:.2f} %, checkpoint {kept}")
    return done

"""Checkpoints are decoded in one place (``lightning_modules/core/checkpoint_loading.py``) under one policy,
``weights_only=True`` for every file (docs/robustness.md, "Reading checkpoints"): a file that pickles code
is refused by every entry point, and every kind of checkpoint labelwise writes reads under that policy."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import EMA, SWA, AtomicCheckpointIO, ema_weights_from_checkpoint
from callbacks.ckpt_path import checkpoint_problem
from datamodules import DigitsSSL
from lightning_modules import Ensemble, Supervised
from lightning_modules.core.checkpoint_loading import read_checkpoint
from lightning_modules.fusion.soup import load_ingredients
from train import RECIPES, cli_main

REPO = Path(__file__).resolve().parents[3]
STORED = REPO / "tests" / "data" / "quickstart_main_2026-12-02.ckpt"  # written by main (test_checkpoint_compatibility)

pytestmark = pytest.mark.usefixtures("one_thread")


def _calls_that_decode(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if node.func.attr == "load_from_checkpoint" or (
                    node.func.attr == "load" and isinstance(owner, ast.Name) and owner.id == "torch"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_checkpoints_are_decoded_only_in_checkpoint_loading():
    sources = [p for package in ("lightning_modules", "callbacks", "datamodules")
               for p in (REPO / package).rglob("*.py")]
    found = [call for path in [*sources, REPO / "train.py"] for call in _calls_that_decode(path)]
    assert found and all(call.startswith("lightning_modules/core/checkpoint_loading.py:") for call in found), found
    # the scan sees what it must refuse (this file decodes with torch.load; main did in six places)
    assert _calls_that_decode(REPO / "tests" / "lightning_modules" / "core" / "test_checkpoint_loading.py")


def _run_on_load(marker: str) -> str:
    Path(marker).write_text("the checkpoint ran code while it was read")
    return "loaded"


class _Payload:
    """Pickles as a call of :func:`_run_on_load`: what an untrusted file can make ``torch.load`` run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _run_on_load, (self.marker,)


@pytest.fixture
def booby_trapped(tmp_path) -> tuple[Path, Path]:
    """The checkpoint main wrote, with one hyper-parameter that runs code when unpickled."""
    checkpoint = torch.load(STORED, map_location="cpu", weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["hyper_parameters"]["note"] = _Payload(marker)
    path = tmp_path / "trapped.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_a_checkpoint_that_pickles_code_is_refused_by_every_reader(booby_trapped, tmp_path):
    """main read Ensemble members, soup ingredients and the EMA callback's export with
    weights_only=False: the file's code ran (the marker was written) and the file loaded."""
    path, marker = booby_trapped
    unreadable = rf"{path.name} cannot be read as a checkpoint \(Unsupported global.*_run_on_load.*\): it is cut short"
    for read in (lambda: Ensemble(checkpoints=[str(path)], num_classes=10, in_channels=1),
                 lambda: load_ingredients([path]),
                 lambda: ema_weights_from_checkpoint(path),
                 lambda: AtomicCheckpointIO().load_checkpoint(path)):
        with pytest.raises(ValueError, match=unreadable):
            read()
        assert not marker.exists()
    assert "cannot be read as a checkpoint" in checkpoint_problem(str(path), "lightning_modules.FixMatch")
    assert not marker.exists()


def test_lightnings_weights_only_false_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["test", "--config", str(RECIPES / "quickstart.yaml"), "--ckpt_path", str(STORED),
                  "--weights_only", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert "--weights_only false: labelwise reads every checkpoint as data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="weights_only=False: labelwise reads every checkpoint as data"):
        AtomicCheckpointIO().load_checkpoint(STORED, weights_only=False)


def _fit_and_save(model: L.LightningModule, callbacks: list, path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=path.parent)
    trainer.fit(model, DigitsSSL(num_labeled=50, batch_size=8, steps_per_epoch=3))
    trainer.save_checkpoint(path)


def test_every_kind_of_checkpoint_we_write_reads_as_data(tmp_path):
    """The base's EMA ("ema"), the EMA callback's state, SWA's state (its SWALR included) and the optimizer
    and scheduler states all hold tensors and plain values only; a run resumes from them through the
    policy's reader."""
    small = dict(num_classes=10, in_channels=1, network="wrn10_1")
    _fit_and_save(Supervised(**small, ema_decay=None), [EMA(decay=0.9)], tmp_path / "ema_callback.ckpt")
    _fit_and_save(Supervised(**small), [SWA(start=1, interval="step", swa_lrs=0.01, anneal_epochs=2)],
                  tmp_path / "swa.ckpt")
    callback_state = read_checkpoint(tmp_path / "ema_callback.ckpt", "checkpoint")["callbacks"]["EMA"]
    assert callback_state["ema"]["num_updates"] == 3
    swa = read_checkpoint(tmp_path / "swa.ckpt", "checkpoint")
    assert swa["ema"]["num_updates"] == 3 and swa["callbacks"]["SWA"]["swalr"]
    assert read_checkpoint(STORED, "checkpoint")["ema"]["num_updates"] == 2
    resumed = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        plugins=[AtomicCheckpointIO()], callbacks=[EMA(decay=0.9)], default_root_dir=tmp_path)
    resumed.fit(Supervised(**small, ema_decay=None), DigitsSSL(num_labeled=50, batch_size=8, steps_per_epoch=3),
                ckpt_path=tmp_path / "ema_callback.ckpt")
    (ema,) = [c for c in resumed.callbacks if isinstance(c, EMA)]
    assert resumed.global_step == 4 and ema.ema.num_updates == 4

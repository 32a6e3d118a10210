"""ResumableCheckpoint in two DDP ranks (gloo, CPU): a signal that reaches rank 0 alone stops both
ranks at the same step, one step later, and no training step waits on a collective of the callback
(the ranks' stop flags are all-reduced in the background; only the epoch end waits for them). The
same through a real ``train.py`` and its resume: ``tests/test_signal_resume.py``."""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from callbacks import ResumableCheckpoint, StoppedBySignal
from lightning_modules import Supervised
from tests.rank_processes import free_port, run_to_the_end
from tests.test_exact_resume import NET, digits

SIGNAL_AT = 4  # rank 0 gets SIGTERM at the start of step 5, the first of epoch 1 (4 steps an epoch)


class SignalAndLogCollectives(Callback):
    """Sends rank 0 SIGTERM at the start of step ``SIGNAL_AT + 1``; logs each ``torch.distributed.all_reduce``
    that ResumableCheckpoint makes for a stop as (global step, its hook, whether it blocks)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, bool]] = []
        self._all_reduce = torch.distributed.all_reduce

    def on_train_start(self, trainer, pl_module) -> None:
        def logged(*args, **kwargs):
            frames = [f.name for f in traceback.extract_stack() if f.filename.endswith("resumable_checkpoint.py")]
            if frames and frames[-1] in ("_stop_if_signalled", "_agreed_signal"):  # not a checkpoint write's
                self.calls.append((trainer.global_step, frames[0], not kwargs.get("async_op", False)))
            return self._all_reduce(*args, **kwargs)

        torch.distributed.all_reduce = logged

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == SIGNAL_AT:
            signal.raise_signal(signal.SIGTERM)  # handled as a scheduler's SIGTERM would be

    def teardown(self, trainer, pl_module, stage) -> None:
        torch.distributed.all_reduce = self._all_reduce


def _rank(rank: int, port: str, out: Path) -> None:
    os.chdir(out)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK="0", LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    log = SignalAndLogCollectives()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        callbacks=[log, ResumableCheckpoint(out / "checkpoints")], max_epochs=3, logger=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(Supervised(**NET), digits(steps_per_epoch=4)())
        stopped = None
    except StoppedBySignal as stop:
        stopped = stop.signum
    torch.save({"stopped": stopped, "step": trainer.global_step, "calls": log.calls}, out / f"rank{rank}.pt")


def test_a_signal_to_rank_0_stops_both_ranks_one_step_later_without_a_blocking_collective_per_step(tmp_path):
    context = multiprocessing.get_context("fork")  # the ranks reuse this process's imports
    port = str(free_port())
    run_to_the_end([context.Process(target=_rank, args=(r, port, tmp_path)) for r in range(2)], 300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        blocking = [(step, hook) for step, hook, blocks in rank["calls"] if blocks]
        assert blocking == [(4, "on_train_epoch_end")]  # epoch 0's end; in steps only background ones
        assert [step for step, hook, blocks in rank["calls"] if not blocks] == [1, 2, 3, 5]
        # recorded during step 5, agreed during step 6: both stop after step 6, in the middle of epoch 1
        assert (rank["stopped"], rank["step"]) == (signal.SIGTERM, SIGNAL_AT + 2)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == SIGNAL_AT + 2

"""Two DDP ranks (gloo, CPU) against one process on the same global batches.

One pair of rank processes trains every recipe of tests/ddp_recipes.py for a few steps; the test
then trains each recipe in this process with twice the batch and checks that (a) the two ranks end
with identical state (weights, EMA/teacher, method state) and (b) that state matches the one
process's within 1e-5. FixMatchBN has BatchNorm, whose per-rank batch statistics make (b) false by
design; for it only (a) is checked, including the BatchNorm running statistics. So for DropMaxDropout (DropMax
and the dropout family on a Wide ResNet), whose ranks draw their own masks.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.distillation.crd import CRDLoss
from tests.conftest import SHARED_DATA
from tests.ddp_recipes import METHODS, RANK_BATCH, SEED, fit, run_rank
from tests.rank_processes import free_port, run_to_the_end

EXACT = [m for m in METHODS if m not in ("FixMatchBN", "DropMaxDropout")]  # BatchNorm; per-rank masks



@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A frozen tiny_cnn teacher file and 12 membrane slices shrunk to 32 x 32."""
    membrane = SHARED_DATA / "membrane"
    if not membrane.exists():
        pytest.skip(f"{membrane} not found")
    root = tmp_path_factory.mktemp("ddp_inputs")
    from lightning_modules.classification.networks import build_network

    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(build_network("tiny_cnn", num_classes=10, in_channels=1).state_dict(), teacher)
    for sub, resample in (("image", Image.BILINEAR), ("label", Image.NEAREST)):
        (root / "membrane" / sub).mkdir(parents=True)
        for k in range(12):
            with Image.open(membrane / sub / f"{k}.png") as pil:
                pil.convert("L").resize((32, 32), resample).save(root / "membrane" / sub / f"{k}.png")
    return teacher, root / "membrane"


@pytest.fixture(scope="module")
def ranks(inputs, tmp_path_factory) -> dict[str, list[dict]]:
    """Every recipe's final state on rank 0 and rank 1 of one two-process run."""
    teacher, membrane = inputs
    out = tmp_path_factory.mktemp("ddp_out")
    port = str(free_port())
    # fork: the ranks reuse this process's imports (torch and Lightning take seconds to import)
    context = multiprocessing.get_context("fork")
    run_to_the_end([context.Process(target=_rank, args=(r, port, out, teacher, membrane)) for r in range(2)], 400)
    return {m: [torch.load(out / f"{m}_rank{r}.pt", weights_only=False) for r in range(2)] for m in METHODS}


def _rank(rank: int, port: str, out: Path, teacher: Path, membrane: Path) -> None:
    os.chdir(out)  # the ranks' run files (split.json) land there
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK="0", LOCAL_RANK=str(rank), WORLD_SIZE="2")
    run_rank(out, teacher, membrane)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a recorded state except what each rank sees of the data, by a flat name."""
    flat = {}
    for key, value in state.items():
        if key in ("indices", "losses", "rank"):
            continue
        items = value.items() if isinstance(value, dict) else [("", value)]
        flat.update({f"{key}.{name}".rstrip("."): t for name, t in items})
    return flat


@pytest.mark.parametrize("method", METHODS)
def test_ranks_hold_identical_state(ranks, method):
    first, second = ranks[method]
    assert (first["rank"], second["rank"]) == (0, 1)
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{method}: ranks differ in {different}"
    # the ranks saw disjoint halves of every step's global batch
    for step_a, step_b in zip(first["indices"], second["indices"]):
        for stream in step_a:
            assert len(step_a[stream]) == len(step_b[stream])
            if method == "Segmenter" or stream == "labeled":  # drawn without replacement within one pass
                assert not set(step_a[stream].tolist()) & set(step_b[stream].tolist())
    print(f"{method}: {len(a)} tensors identical on both ranks; losses rank0 {np.round(first['losses'], 4).tolist()}")


@pytest.mark.parametrize("method", EXACT)
def test_two_ranks_match_one_process_on_the_global_batch(ranks, inputs, method, one_thread):
    teacher, membrane = inputs
    L.seed_everything(SEED, verbose=False)
    single = fit(method, devices=1, batch_size=2 * RANK_BATCH, teacher=teacher, membrane=membrane)
    first, second = ranks[method]
    for k, step in enumerate(single["indices"]):  # the same global batches, rank 0's half first
        for stream, index in step.items():
            assert torch.equal(index, torch.cat([first["indices"][k][stream], second["indices"][k][stream]]))
    ddp, one = _tensors(first), _tensors(single)
    worst = {name: float((ddp[name].double() - one[name].double()).abs().max()) for name in one if one[name].numel()}
    far = {name: err for name, err in worst.items() if err > 1e-5}
    assert not far, f"{method}: DDP and one process differ by more than 1e-5 in {far}"
    # the losses of a step are the mean of the two ranks' (equal batch sizes)
    ddp_losses = (np.array(first["losses"]) + np.array(second["losses"])) / 2
    assert np.allclose(ddp_losses, single["losses"], atol=1e-5)
    if "memory" in single:
        assert int((single["memory"] >= 0).sum()) > 0, "FlexMatch recorded no confident prediction: a vacuous test"
    if method == "OnlineLabelSmoothing":
        initial = 0.9 * torch.eye(10) + 0.01
        assert not torch.allclose(single["criterion"]["soft_labels"], initial), "no soft label was learned: vacuous"
    if method == "Dash":  # two warm-up steps of the global labeled batch made rho^ on both ranks
        assert int(single["method_buffers"]["rho_loss_count"]) == 2 * 2 * RANK_BATCH
    if method == "AdaMatch":
        assert single["method_buffers"]["da_model_marginal"].sum() > 0, "the marginal never moved: a vacuous test"
    if method == "LabelPropagation":  # propagated once, from features each rank embedded half of
        assert (single["method_buffers"]["pseudo_labels"] >= 0).all(), "no propagation: a vacuous test"
    if "crd" in single:  # Z was set and the memories moved for the samples seen
        assert bool((single["crd"]["normalizer"] > 0).all()), "CRD never set its normalizer: a vacuous test"
        memory = single["crd"]["memory_student"]
        initial = CRDLoss(1, 1, num_samples=len(memory), feat_dim=memory.shape[1]).memory_student
        assert int((memory != initial).any(dim=1).sum()) > 0, "no CRD memory row moved: a vacuous test"
    if method == "CoMatch":  # four steps of 2 x (2 + 16) rows, rank 0's first: the queue wrapped and smoothing ran
        assert int(single["memories"]["queue.count"]) == 4 * 36 and int(single["memories"]["queue.ptr"]) == 0
    if method in ("SimMatch", "SimMatchV2"):
        assert single["memories"]["bank.labels"].any(), "no labeled row was written: a vacuous test"
    if method == "SimMatchV2":
        assert int(single["memories"]["queue.count"]) == 4 * 32 and "da_marginal" in single["method_buffers"]
    if method == "MultiMatch":
        buffers = single["method_buffers"]
        assert (buffers["weak_labels"] >= 0).any() and int(buffers["calibrated_at"]) == 2, "vacuous"
    if "update_counts" in single:
        assert int(single["update_counts"].max()) >= 2, "no sample was revisited: Temporal Ensembling's targets untested"
    print(f"{method}: max |DDP - one process| = {max(worst.values()):.2e} over {len(worst)} tensors")


def test_sync_batchnorm_conversion_keeps_the_ema_plain_and_changes_nothing_in_one_process(one_thread):
    """``Trainer(sync_batchnorm=True)`` converts the LightningModule's BatchNorm layers with
    Lightning's TorchSyncBatchNorm when DDP sets up. The EMA copy is no submodule, so it keeps plain
    BatchNorm (evaluation needs no process group), its parameters and buffers still pair with the
    converted net's, and checkpoints keep their keys. SyncBatchNorm needs a GPU to synchronize; in
    one process it is BatchNorm, so a converted run must equal an unconverted one exactly."""
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    from lightning_modules.core.distributed import batchnorm_statistics
    from tests.ddp_recipes import TinyDigits, build

    runs = {}
    for convert in (False, True):
        L.seed_everything(SEED, verbose=False)
        model, _ = build("FixMatchBN", 2 * RANK_BATCH, Path("unused"), Path("unused"))
        if convert:
            model = TorchSyncBatchNorm().apply(model)
            layers = [type(m) for m in model.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            assert layers and set(layers) == {torch.nn.SyncBatchNorm}
            assert not batchnorm_statistics([model.net])  # already global: not averaged again
            assert all(type(m) is not torch.nn.SyncBatchNorm for m in model.ema.module.modules())
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                            num_sanity_val_steps=0, val_check_interval=3)
        trainer.fit(model, datamodule=TinyDigits(batch_size=2 * RANK_BATCH))
        assert model.ema.num_updates == 3 and "val/acc" in trainer.callback_metrics
        runs[convert] = model.state_dict(), model.ema.module.state_dict()
    (plain, plain_ema), (synced, synced_ema) = runs[False], runs[True]
    assert plain.keys() == synced.keys() and plain_ema.keys() == synced_ema.keys()
    assert all(torch.equal(plain[k], synced[k]) for k in plain)
    assert all(torch.equal(plain_ema[k], synced_ema[k]) for k in plain_ema)


def test_strategies_that_shard_parameters_are_refused_with_an_ema_copy():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_modules.core.distributed import check_full_parameters

    check_full_parameters(DDPStrategy(), "FixMatch")
    with pytest.raises(ValueError, match="FixMatch keeps an EMA copy.*FSDPStrategy.*ema_decay"):
        check_full_parameters(FSDPStrategy(), "FixMatch")

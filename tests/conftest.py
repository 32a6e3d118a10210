"""Shared fixtures: real data from ../shared/data and scikit-learn's digits."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LABELWISE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _read_cifar_jpegs(split: str, n: int) -> tuple[torch.Tensor, list[str]]:
    """Decode the first `n` JPEGs of the CIFAR-10 tarball without unpacking it."""
    import numpy as np
    from PIL import Image

    path = SHARED_DATA / "cifar10" / f"{split}.tar.gz"
    if not path.exists():
        pytest.skip(f"{path} not found: put the shared data beside the repository")
    images, names = [], []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as pil:
                images.append(torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1))
            names.append(member.name)
            if len(images) == n:
                break
    return torch.stack(images), names


@pytest.fixture(scope="session")
def cifar_images() -> torch.Tensor:
    """64 real CIFAR-10 test images, uint8, (64, 3, 32, 32)."""
    return _read_cifar_jpegs("test", 64)[0]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """A real ImageFolder tree: 20 train and 5 test CIFAR-10 JPEGs per class, from the test tarball."""
    path = SHARED_DATA / "cifar10" / "test.tar.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    root = tmp_path_factory.mktemp("cifar_folder")
    seen: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            cls = member.name.split("/")[-2]
            k = seen.get(cls, 0)
            if k >= 25:
                continue
            seen[cls] = k + 1
            out = root / ("train" if k < 20 else "test") / cls / Path(member.name).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return root


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own working directory, so runs and split files never land in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_global_seed_from_earlier_tests():
    """seed_everything leaves PL_GLOBAL_SEED in the environment, and the training streams seed
    from it (datamodules.sampling): without this, a test's data order would depend on which
    tests ran before it in the same process. Cleared again afterwards, because a module-scoped
    fixture is set up before this function-scoped one and would see the previous test's seed (not
    monkeypatch, whose undo would restore a seed that such a fixture had set)."""
    os.environ.pop("PL_GLOBAL_SEED", None)
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)


@pytest.fixture
def one_thread():
    """One torch thread for tiny-batch training tests: on 2 shared cores, two threads oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B with no network: offline runs, W&B's own folders under ``tmp_path``, the run finished after
    the test (a ``WandbLogger`` reuses any run still open, so the next test would log into this one)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    yield tmp_path
    wandb.finish()

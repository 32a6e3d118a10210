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
    from torchvision.io import decode_jpeg

    path = SHARED_DATA / "cifar10" / f"{split}.tar.gz"
    if not path.exists():
        pytest.skip(f"{path} not found: put the shared data beside the repository")
    images, names = [], []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            data = torch.frombuffer(bytearray(tar.extractfile(member).read()), dtype=torch.uint8)
            images.append(decode_jpeg(data))
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

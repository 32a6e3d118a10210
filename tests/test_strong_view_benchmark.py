"""``benchmarks/strong_view_cpu.py`` (issue 17): its PIL reference pipeline behaves like kekmodel's strong
view, and both modes run end to end on a few real CIFAR-10 images."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.strong_view_cpu import MEAN, STD, PerImageStrongView
from tests.conftest import REPO, SHARED_DATA


def test_the_pil_pipeline_makes_normalized_views_with_a_grey_square(cifar_images):
    view = PerImageStrongView(seed=0)
    arrays = [image.permute(1, 2, 0).numpy() for image in cifar_images[:16]]
    outputs = torch.stack([view(array) for array in arrays])
    assert outputs.shape == (16, 3, 32, 32) and outputs.dtype == torch.float32
    grey = torch.tensor([(127 / 255 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    is_grey = torch.isclose(outputs, grey, atol=1e-5).all(dim=1)
    # Cutout always runs: a 16-pixel square drawn with its far edge, clipped to at least 9 x 9 pixels.
    assert bool((is_grey.flatten(1).sum(1) >= 81).all())
    # Per-image randomness: the same image twice gives two different views.
    twice = torch.stack([view(arrays[0]), view(arrays[0])])
    assert not torch.equal(twice[0], twice[1])
    assert np.array_equal(arrays[0], cifar_images[0].permute(1, 2, 0).numpy())  # the input is not modified


@pytest.mark.parametrize("mode", [[], ["--scaling", "--sizes", "32", "40"]])
def test_the_benchmark_runs_on_real_images(mode):
    if not (SHARED_DATA / "cifar10" / "train.tar.gz").exists():
        pytest.skip("the CIFAR-10 tarballs are not beside the repository")
    command = [sys.executable, "benchmarks/strong_view_cpu.py", "--batch-sizes", "4", "8", "--repeats", "1",
               "--shared", str(SHARED_DATA), *mode]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == (4 if mode else 2) * 2  # printed as measured and again in the final table

"""The batched strong view on one CPU thread against a per-image PIL pipeline, and how its cost scales.

    python benchmarks/strong_view_cpu.py                       # ours vs PIL per image, batches 64, 448, 1024
    python benchmarks/strong_view_cpu.py --before /tmp/augment_c186ba3.py   # also the float path it replaced
    python benchmarks/strong_view_cpu.py --scaling             # ms per batch of our strong and weak views

Images: real CIFAR-10 training images, decoded from ``../shared/data/cifar10/train.tar.gz`` (every
``--stride``-th JPEG of the archive, so all classes appear; the same tarballs ``ssl_table.py`` unpacks).

Ours: ``strong_augment`` (flip, reflect-pad crop, RandAugment with 2 ops, Cutout) on a uint8 batch, then
``normalize`` to float, as ``AugmentedViews`` makes the strong view. ``--before FILE`` loads an older
``datamodules/classification/augment.py`` on its own (it must import only torch), e.g. the float path of
commit c186ba3: ``git show c186ba3:datamodules/classification/augment.py > /tmp/augment_c186ba3.py``.

PIL per image: what kekmodel/FixMatch-pytorch (commit 040be3b) does to an unlabeled image for its
strong view, rewritten here: ``dataset/cifar.py`` lines 108-128 (``TransformFixMatch``: torchvision's
RandomHorizontalFlip, RandomCrop(32, padding=int(32 * 0.125), padding_mode="reflect"),
``RandAugmentMC(n=2, m=10)``, then ToTensor and Normalize with the CIFAR-10 mean and std of lines 13-14),
the image made by ``Image.fromarray`` from the uint8 array (``CIFAR10SSL.__getitem__``), and the loader's
collate (a ``torch.stack``) at the end. ``dataset/randaugment.py``: ``RandAugmentMC.__call__`` (lines
213-220) picks 2 ops with replacement from ``fixmatch_augment_pool`` (lines 147-163), draws v in 1..9
(``np.random.randint(1, 10)``) per op and applies it with probability 0.5, then always cuts out a 16-pixel
grey (127) square (``CutoutAbs``, lines 47-60: corner at a uniform centre minus 8, clipped, drawn with
``ImageDraw.rectangle``, which includes its far edge). Magnitudes (lines 20-136, 139-144): enhance factors
0.05 + 0.09 v; posterize to 4 + int(0.4 v) bits; solarize at 256 - int(25.6 v); rotate by int(3 v) degrees,
shear by 0.03 v, translate by int(0.03 v * size) pixels, each with a random sign and PIL's defaults
(nearest neighbour, black outside).

Timing: the two (or three) pipelines are timed in turn, A B A B ..., on the same images, ``--repeats``
times after one warm-up each, and the medians are reported, so load from other jobs on a shared CPU
hits all alike; the load average before and after is printed. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance, ImageOps  # noqa: E402
from torchvision import transforms  # noqa: E402

from datamodules.classification.augment import normalize, strong_augment, weak_augment  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
ENHANCERS = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
             "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}


def read_cifar(shared: Path, count: int, stride: int) -> torch.Tensor:
    """Every ``stride``-th training JPEG until ``count``, as uint8 ``(count, 3, 32, 32)``."""
    images = []
    with tarfile.open(shared / "cifar10" / "train.tar.gz") as tar:
        jpegs = (member for member in tar if member.isfile() and member.name.endswith(".jpg"))
        for k, member in enumerate(jpegs):
            if k % stride == 0:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as pil:
                    images.append(torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1))
                if len(images) == count:
                    return torch.stack(images)
    raise SystemExit(f"only {len(images)} images at stride {stride}: lower --stride or the batch sizes")


class PerImageStrongView:
    """kekmodel's strong view of one HWC uint8 array, through PIL (see the module docstring)."""

    def __init__(self, seed: int, size: int = 32):
        self.rng, self.np_rng = random.Random(seed), np.random.default_rng(seed)
        crop = transforms.RandomCrop(size, padding=int(size * 0.125), padding_mode="reflect")
        self.flip_crop = transforms.Compose([transforms.RandomHorizontalFlip(), crop])
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        self.cut = int(size * 0.5)

    def signed(self, value: float) -> float:
        return -value if self.rng.random() < 0.5 else value

    def op(self, name: str, img: Image.Image, v: int) -> Image.Image:
        if name in ENHANCERS:
            return ENHANCERS[name](img).enhance(0.9 * v / 10 + 0.05)
        simple = {"identity": lambda: img, "autocontrast": lambda: ImageOps.autocontrast(img),
                  "equalize": lambda: ImageOps.equalize(img),
                  "posterize": lambda: ImageOps.posterize(img, int(4 * v / 10) + 4),
                  "solarize": lambda: ImageOps.solarize(img, 256 - int(256 * v / 10))}
        if name in simple:
            return simple[name]()
        if name == "rotate":
            return img.rotate(self.signed(int(30 * v / 10)))
        shear, shift = self.signed(0.3 * v / 10), 0.3 * v / 10
        coefficients = {"shear_x": (1, shear, 0, 0, 1, 0), "shear_y": (1, 0, 0, shear, 1, 0),
                        "translate_x": (1, 0, int(self.signed(shift) * img.size[0]), 0, 1, 0),
                        "translate_y": (1, 0, 0, 0, 1, int(self.signed(shift) * img.size[1]))}[name]
        return img.transform(img.size, Image.AFFINE, coefficients)

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        img = self.flip_crop(Image.fromarray(array))
        for name in self.rng.choices(POOL, k=2):
            v = int(self.np_rng.integers(1, 10))
            if self.rng.random() < 0.5:
                img = self.op(name, img, v)
        w, h = img.size
        x0 = int(max(0, self.np_rng.uniform(0, w) - self.cut / 2))
        y0 = int(max(0, self.np_rng.uniform(0, h) - self.cut / 2))
        img = img.copy()
        ImageDraw.Draw(img).rectangle((x0, y0, int(min(w, x0 + self.cut)), int(min(h, y0 + self.cut))), (127, 127, 127))
        return self.to_tensor(img)


POOL = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize", "rotate",
        "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")


def load_augment(path: Path):
    spec = importlib.util.spec_from_file_location("augment_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, timed in turn (A B A B ...) after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def header(args: argparse.Namespace) -> list[str]:
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return [f"Command: `{shlex.join(['python', 'benchmarks/strong_view_cpu.py', *sys.argv[1:]])}`",
            f"Device: {platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} thread; torch {torch.__version__}; commit {commit}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"median of {args.repeats} interleaved repeats; load average {os.getloadavg()[0]:.1f} at the start", ""]


def compare(args: argparse.Namespace, images: torch.Tensor) -> list[str]:
    before = load_augment(args.before) if args.before else None
    lines = ["| batch | PIL per image (us/img) | ours (us/img) | x PIL |"
             + (" before (us/img) | before x PIL | ours x before |" if before else ""),
             "|---:|---:|---:|---:|" + ("---:|---:|---:|" if before else "")]
    for batch in args.batch_sizes:
        uint8 = images[:batch].contiguous()
        arrays = [image.permute(1, 2, 0).numpy() for image in uint8]
        pil = PerImageStrongView(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        runs = {"pil": lambda: torch.stack([pil(array) for array in arrays]),
                "ours": lambda: normalize(strong_augment(uint8, generator=generator), MEAN, STD)}
        if before:
            runs["before"] = lambda: before.normalize(before.strong_augment(uint8, generator=generator), MEAN, STD)
        us = {name: 1e6 * seconds / batch for name, seconds in interleaved(runs, args.repeats).items()}
        row = f"| {batch} | {us['pil']:.0f} | {us['ours']:.0f} | {us['pil'] / us['ours']:.2f} |"
        if before:
            row += f" {us['before']:.0f} | {us['pil'] / us['before']:.2f} | {us['before'] / us['ours']:.2f} |"
        lines.append(row)
        print(row, flush=True)
    return lines


def scaling(args: argparse.Namespace, images: torch.Tensor) -> list[str]:
    lines = ["| image | batch | strong ms/batch | strong us/img | weak ms/batch | weak us/img |",
             "|---:|---:|---:|---:|---:|---:|"]
    generator = torch.Generator().manual_seed(args.seed)
    for size in args.sizes:
        resized = images if size == images.shape[-1] else F.interpolate(
            images.float(), size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255).byte()
        for batch in args.batch_sizes:
            uint8 = resized[:batch].contiguous()
            seconds = interleaved({"strong": lambda: normalize(strong_augment(uint8, generator=generator), MEAN, STD),
                                   "weak": lambda: normalize(weak_augment(uint8, generator=generator), MEAN, STD)},
                                  args.repeats)
            strong, weak = seconds["strong"], seconds["weak"]
            row = (f"| {size}x{size} | {batch} | {1e3 * strong:.1f} | {1e6 * strong / batch:.0f} |"
                   f" {1e3 * weak:.2f} | {1e6 * weak / batch:.1f} |")
            lines.append(row)
            print(row, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", action="store_true", help="our views over batch and image sizes instead")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 448, 1024])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96], help="image sides for --scaling")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--before", type=Path, help="an older augment.py to time beside ours")
    parser.add_argument("--stride", type=int, default=47, help="take every stride-th JPEG of the archive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    images = read_cifar(args.shared, max(args.batch_sizes), args.stride)
    lines = header(args)
    print("\n".join(lines), flush=True)
    lines += scaling(args, images) if args.scaling else compare(args, images)
    lines += ["", f"Load average {os.getloadavg()[0]:.1f} at the end."]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

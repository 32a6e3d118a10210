"""Fill the ignored folders that travel with the checkout to the GPU machine (../shared/guide/GPU.md).

    python benchmarks/pack_carry.py          # then: run(carry=[".whl", ".data"], command="bash benchmarks/device_suite.sh")

* ``.data/cifar10/``: the CIFAR-10 JPEG tarballs (19 MB) from ../shared/data.
* ``.whl/``: pure-Python wheels of what ``import datamodules, lightning_modules`` needs and the GPU machine
  lacks: segmentation-models-pytorch (imported by the segmentation package) and jsonargparse (the data-root
  type). This machine has no package index for them, so each wheel is rebuilt from the installed
  distribution's files (its RECORD), ``py3-none-any``, without byte code. wandb and faster-coco-eval are
  not needed: nothing the benchmarks import reaches them.

Prints the carry's size: the whole checkout plus carry must stay under 64 MiB.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = ("segmentation_models_pytorch", "jsonargparse")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_wheel(distribution: str, dest: Path) -> Path:
    """A ``py3-none-any`` wheel of an installed pure-Python distribution, from the files its RECORD lists."""
    dist = metadata.distribution(distribution)
    name, version = dist.metadata["Name"].replace("-", "_"), dist.version
    info = f"{name}-{version}.dist-info"
    files = [f for f in dist.files or [] if "__pycache__" not in f.parts and f.suffix not in (".pyc", ".so")]
    if any(f.suffix in (".so", ".pyd") for f in dist.files or []):
        raise ValueError(f"{distribution} has compiled files: it needs a wheel built for the GPU machine's Python")
    path = dest / f"{name}-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path.with_suffix(".tmp"), "w", zipfile.ZIP_DEFLATED) as wheel:
        for f in files:
            arcname = f.as_posix()
            if arcname.startswith("..") or arcname.endswith(("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            if arcname == f"{info}/WHEEL":
                data = b"Wheel-Version: 1.0\nGenerator: labelwise pack_carry\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            wheel.writestr(arcname, data)
            records.append(_record_line(arcname, data))
        records.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(records) + "\n")
    path.with_suffix(".tmp").replace(path)  # whole or not at all
    return path


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    wheels, data = REPO / ".whl", REPO / ".data" / "cifar10"
    wheels.mkdir(exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    for distribution in WHEELS:
        print("wheel:", build_wheel(distribution, wheels).name)
    shared = REPO.parent / "shared" / "data" / "cifar10"
    for split in ("train", "test"):
        if not (data / f"{split}.tar.gz").is_file():
            shutil.copyfile(shared / f"{split}.tar.gz", data / f".{split}.tar.gz")
            (data / f".{split}.tar.gz").replace(data / f"{split}.tar.gz")
    mib = (size(wheels) + size(data)) / 2**20
    print(f"carry: .whl {size(wheels) / 2**20:.1f} MiB + .data {size(data) / 2**20:.1f} MiB = {mib:.1f} MiB "
          f"(with the tracked files it must stay under 64 MiB)")
    sys.exit(0 if mib < 60 else 1)


if __name__ == "__main__":
    main()

"""Turn the ISBI membrane labels into a COCO instance-segmentation set of cells.

Each connected component of ``label > 127`` (4-connectivity: pixels touching only at a corner are
separate cells, so a one-pixel diagonal membrane still separates them) with at least ``min_area``
pixels becomes one "cell" instance: bbox ``[x, y, w, h]`` over its pixels, area = its pixel count,
segmentation = uncompressed RLE (column-major, as COCO). Slices are copied as ``images/N.png``
(grayscale; ``COCODetection`` decodes them as RGB); image N gets id N + 1, as COCO ids start at 1.

    python benchmarks/membrane_cells_to_coco.py --membrane ../shared/data/membrane --output DIR

writes ``DIR/images/N.png`` and ``DIR/annotations.json`` through a temporary folder that is renamed
into place, so DIR is either complete or untouched. Read it back with
``COCODetection(root=DIR, annotation_file="annotations.json", image_dir="images", masks=True)``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def cell_instances(label: np.ndarray, min_area: int = 20) -> list[dict]:
    """COCO annotations (without ids) of the 4-connected components of ``label > 127`` with
    ``min_area`` pixels or more, in label order."""
    components, _ = ndimage.label(label > 127)  # default structure: 4-connectivity
    h, w = label.shape
    instances = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(components), start=1):
        c_in, r_in = np.nonzero((components[rows, cols] == k).T)  # column-major order, as COCO's RLE
        if len(r_in) < min_area:
            continue
        flat = (c_in + cols.start) * h + r_in + rows.start
        breaks = np.flatnonzero(np.diff(flat) != 1) + 1
        starts, ends = flat[np.r_[0, breaks]], flat[np.r_[breaks - 1, len(flat) - 1]] + 1
        gaps = starts - np.r_[0, ends[:-1]]
        counts = np.stack([gaps, ends - starts], axis=1).ravel().tolist() + [h * w - int(ends[-1])]
        instances.append({"bbox": [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start],
                          "area": len(flat), "segmentation": {"counts": counts, "size": [h, w]}})
    return instances


def write_membrane_cells_coco(membrane_dir: str | Path, output_dir: str | Path, min_area: int = 20) -> Path:
    """Write ``output_dir/images/N.png`` and ``output_dir/annotations.json``; return ``output_dir``."""
    membrane_dir, output_dir = Path(membrane_dir), Path(output_dir)
    labels = sorted((membrane_dir / "label").glob("*.png"), key=lambda p: [int(t) if t.isdigit() else t
                                                                            for t in re.split(r"(\d+)", p.stem)])
    if not labels:
        raise FileNotFoundError(f"{membrane_dir}/label holds no .png labels: pass the membrane folder "
                                f"(with image/ and label/)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        (staging / "images").mkdir()
        images, annotations = [], []
        for image_id, label_path in enumerate(labels, start=1):
            image_path = membrane_dir / "image" / label_path.name
            if not image_path.is_file():
                raise FileNotFoundError(f"{label_path} has no image {image_path}")
            shutil.copyfile(image_path, staging / "images" / label_path.name)
            with Image.open(label_path) as pil:
                label = np.asarray(pil.convert("L"))
            h, w = label.shape
            images.append({"id": image_id, "file_name": label_path.name, "height": h, "width": w})
            for instance in cell_instances(label, min_area):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "iscrowd": 0, **instance})
        record = {"info": {"description": f"cells of {membrane_dir} (components of label > 127, 4-connected, "
                                          f">= {min_area} px)"},
                  "images": images, "annotations": annotations,
                  "categories": [{"id": 1, "name": "cell", "supercategory": "cell"}]}
        (staging / "annotations.json").write_text(json.dumps(record))
        if output_dir.exists():  # swap: the old copy moves aside, the complete new one takes its name
            old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.old."))
            output_dir.rename(old / output_dir.name)
            staging.rename(output_dir)
            shutil.rmtree(old)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--membrane", default="../shared/data/membrane", help="folder with image/ and label/")
    parser.add_argument("--output", required=True, help="folder to write images/ and annotations.json into")
    parser.add_argument("--min-area", type=int, default=20, help="drop components smaller than this (pixels)")
    args = parser.parse_args()
    out = write_membrane_cells_coco(args.membrane, args.output, args.min_area)
    record = json.loads((out / "annotations.json").read_text())
    print(f"{out}: {len(record['images'])} slices, {len(record['annotations'])} cells "
          f"({len(record['annotations']) / max(len(record['images']), 1):.1f} per slice)")


if __name__ == "__main__":
    main()

"""COCO instance masks: polygon lists (the union of their polygons), uncompressed RLE (``counts`` a list)
and compressed RLE (``counts`` a string), both column-major as in COCO, decoded to uint8 masks.

Decoding is faster-coco-eval's mask API, the C code of COCO's ``maskApi`` that pycocotools also wraps,
so masks are pixel for pixel what pycocotools gives (tested on all of coco128). faster-coco-eval is a
required dependency already (torchmetrics' mAP backend); pycocotools is not. The API does not check
its input (a NaN or a far-off polygon coordinate exhausts memory; corrupt runs surface only when
decoded, without saying which annotation), so our checks run first and name the problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _mask_api() -> Any:
    """faster-coco-eval's mask API, imported when a mask is decoded: classification data (the GPU benchmarks,
    docs/performance.md) imports ``datamodules`` on machines without it."""
    from faster_coco_eval.core import mask

    return mask


def _is_flat_numbers(polygon: Any) -> bool:
    if not isinstance(polygon, list) or len(polygon) % 2:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)


def _check_polygons(polygons: list, height: int, width: int) -> None:
    for polygon in polygons:
        if not _is_flat_numbers(polygon):
            raise ValueError(f"COCO polygon {str(polygon)[:60]} is not a flat [x0, y0, x1, y1, ...] list of "
                             f"numbers: fix or remove the annotation's segmentation")
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        inside = np.isfinite(xy) & (xy >= -np.array([width, height])) & (xy <= 2 * np.array([width, height]))
        if not inside.all():
            raise ValueError(f"COCO polygon {str(polygon)[:60]} has a coordinate that is not finite or lies more "
                             f"than one image size outside its ({height}, {width}) image: the annotation is corrupt")


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A checked COCO ``segmentation`` as the mask API's compressed RLE."""
    if isinstance(segmentation, list):
        _check_polygons(segmentation, height, width)
        # the API gives an empty polygon list a 0 x 0 mask; ours is the image's size
        empty = {"counts": [height * width], "size": [height, width]}
        return _mask_api().segmToRle(segmentation or empty, width, height)
    if not (isinstance(segmentation, dict) and "counts" in segmentation):
        raise ValueError(f"unknown COCO segmentation {str(segmentation)[:80]}: expected polygons or an RLE dict")
    if list(segmentation.get("size", [])) != [height, width]:
        raise ValueError(f"RLE of size {segmentation.get('size')} does not match its image ({height}, {width})")
    counts = segmentation["counts"]
    if not isinstance(counts, (str, bytes)):
        counts = [int(c) for c in counts]
        if sum(counts) != height * width or min(counts, default=0) < 0:
            raise ValueError(f"RLE runs sum to {sum(counts)} (smallest {min(counts, default=0)}), but the image has "
                             f"{height * width} pixels: the counts are corrupt")
    try:
        return _mask_api().segmToRle({"counts": counts, "size": [height, width]}, width, height)
    except ValueError as err:
        raise _corrupt(counts, height, width, err) from None


def _corrupt(counts: Any, height: int, width: int, err: Exception) -> ValueError:
    return ValueError(f"compressed RLE {str(counts)[:40]} does not decode to the image's {height * width} pixels "
                      f"({err}): the counts are corrupt")


def decode_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` entries (polygon lists or RLE dicts) as uint8 ``(n, height, width)`` masks."""
    rles = [_to_rle(segmentation, height, width) for segmentation in segmentations]
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    try:
        masks = _mask_api().decode(rles)  # (height, width, n), column-major
    except ValueError:  # find the corrupt one
        for rle in rles:
            try:
                _mask_api().decode([rle])
            except ValueError as err:
                raise _corrupt(rle["counts"], height, width, err) from None
        raise
    return np.ascontiguousarray(masks.transpose(2, 0, 1))

"""Object areas of a COCO json without ``area`` (coco128 with the key removed): the evaluation targets
get the box's (the mask's with masks), and mAP by object size matches pycocotools on the same json."""

import copy
import json

import numpy as np
import pytest
import torch

from datamodules.detection.coco import COCODetection
from lightning_modules.detection.detector import detection_metric, map_summary, metric_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]
ANNOTATIONS = "annotations/instances_train2017.json"


@pytest.fixture(scope="module")
def without_area(shared_data, tmp_path_factory):
    """(root of a copy of coco128's json with no 'area', the original json, the copy)."""
    source = shared_data / "coco128"
    if not (source / ANNOTATIONS).is_file():
        pytest.skip(f"{source} not found")
    record = json.loads((source / ANNOTATIONS).read_text())
    stripped = copy.deepcopy(record)
    for annotation in stripped["annotations"]:
        del annotation["area"]
    root = tmp_path_factory.mktemp("no_area")
    (root / "instances.json").write_text(json.dumps(stripped))
    return root, record, stripped


def reader(root, shared_data, masks=False):
    return COCODetection(str(root), annotation_file="instances.json", image_dir=str(shared_data / "coco128" / "train2017"),
                         masks=masks, num_test=16)


def test_a_missing_area_is_the_clipped_box_area_or_the_mask_pixel_count(without_area, shared_data):
    root, record, _ = without_area
    boxes_only, with_masks = reader(root, shared_data), reader(root, shared_data, masks=True)
    image_id = record["images"][0]["id"]
    target = boxes_only.target(image_id)
    width, height = (target["boxes"][:, 2:] - target["boxes"][:, :2]).unbind(1)
    assert len(target["area"]) > 0 and (target["area"] > 0).all()
    torch.testing.assert_close(target["area"], width * height)
    masked = with_masks.target(image_id)
    torch.testing.assert_close(masked["area"], masked["masks"].flatten(1).sum(1).float())
    given = [a["area"] for a in record["annotations"] if a["image_id"] == image_id]  # the json's areas, for scale
    assert masked["area"].tolist() == pytest.approx(given, rel=0.05, abs=3)


def test_areas_given_in_the_json_are_kept_and_bad_ones_refused(without_area, shared_data, tmp_path):
    _, record, _ = without_area
    given = COCODetection(str(shared_data / "coco128"), annotation_file=ANNOTATIONS, image_dir="train2017", num_test=16)
    image_id = record["images"][0]["id"]
    expected = [a["area"] for a in record["annotations"] if a["image_id"] == image_id]
    assert given.target(image_id)["area"].tolist() == pytest.approx(expected)
    broken = copy.deepcopy(record)
    broken["annotations"][3]["area"] = "12"
    (tmp_path / "instances.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"annotation \d+ has area '12': it must be a number >= 0"):
        reader(tmp_path, shared_data)


def test_map_by_object_size_without_area_matches_reference_pycocotools(without_area, shared_data):
    """pycocotools on the json with each area set to its box's (what COCO's loadRes does for results)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, _, stripped = without_area
    dm = reader(root, shared_data)
    dm.split = dm.draw_split()
    tested = [dm.image_ids[i] for i in dm.split["test"].tolist()]
    generator = torch.Generator().manual_seed(0)
    targets, predictions, results = [], [], []
    for image_id in tested:
        target = dm.target(image_id)
        boxes = target["boxes"] + torch.randn(target["boxes"].shape, generator=generator) * 3
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = torch.rand(len(boxes), generator=generator)
        targets.append(target)
        predictions.append({"boxes": boxes, "labels": target["labels"], "scores": scores})
        for box, label, score in zip(boxes.tolist(), target["labels"].tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": dm.category_ids[label], "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    metric = detection_metric(False, backend="pycocotools")
    metric.update(metric_inputs(predictions, False), metric_inputs(targets, False))
    ours = map_summary(metric.compute(), False)

    reference_json = copy.deepcopy(stripped)
    reference_json["images"] = [im for im in stripped["images"] if im["id"] in tested]
    reference_json["annotations"] = [a for a in stripped["annotations"] if a["image_id"] in tested]
    for annotation in reference_json["annotations"]:  # boxes clipped to the image, as the reader clips them
        im = next(i for i in reference_json["images"] if i["id"] == annotation["image_id"])
        x, y, w, h = annotation["bbox"]
        x1, y1 = min(max(x + w, 0), im["width"]), min(max(y + h, 0), im["height"])
        x, y = min(max(x, 0), im["width"]), min(max(y, 0), im["height"])
        annotation["bbox"], annotation["area"] = [x, y, x1 - x, y1 - y], (x1 - x) * (y1 - y)
    truth = COCO()
    truth.dataset = reference_json
    truth.createIndex()
    evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    names = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
    assert -1 not in [float(ours[n]) for n in names if n in ours]
    np.testing.assert_allclose([float(ours.get(n, -1)) for n in names], evaluation.stats[:6], atol=1e-6)

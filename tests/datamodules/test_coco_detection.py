"""COCODetection on the real coco128 set: annotations read back as the json states them, boxes dropped
or clipped (and counted), clear errors for bad input, the split, joint augmentation of images,
boxes and masks, batches a torchvision Mask R-CNN trains on; mask decoding; and the membrane cells
converted to COCO and read back."""

import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from torchvision.transforms import v2

from datamodules.detection.coco import COCODetection, DetectionItems
from datamodules.detection.coco_masks import decode_masks

pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning"),  # coco128's 10, asserted once
              pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")]
ANNOTATIONS = "annotations/instances_train2017.json"
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "membrane_cells_to_coco.py"


@pytest.fixture(scope="module")
def coco128(shared_data):
    root = shared_data / "coco128"
    if not (root / ANNOTATIONS).is_file():
        pytest.skip(f"{root} not found")
    return root


@pytest.fixture(scope="module")
def raw(coco128):
    return json.loads((coco128 / ANNOTATIONS).read_text())


@pytest.fixture(scope="module")
def loaded(coco128):
    """coco128 with masks, decoded once: 16 test, 40 labeled, 72 unlabeled images."""
    with pytest.warns(UserWarning, match="10 crowd regions"):
        dm = COCODetection(str(coco128), masks=True, num_labeled=40, batch_size=2, uratio=2, steps_per_epoch=4,
                           unlabeled_views=["weak", "strong"])
    dm.setup("test")
    return dm


def _xyxy(bbox, width, height):
    x, y, w, h = bbox
    return [min(max(x, 0), width), min(max(y, 0), height), min(max(x + w, 0), width), min(max(y + h, 0), height)]


def _tight_box(mask):
    rows, cols = np.nonzero(np.asarray(mask))
    x, y = int(cols.min()), int(rows.min())
    return [x, y, int(cols.max()) + 1 - x, int(rows.max()) + 1 - y]


@pytest.mark.parametrize("image_id", [9, 74, 315])  # 315 holds two crowd regions
def test_targets_match_the_json(loaded, raw, image_id):
    assert loaded.num_classes == len(raw["categories"]) + 1 == 81 and loaded.num_channels == 3
    image = next(im for im in raw["images"] if im["id"] == image_id)
    anns = [a for a in raw["annotations"] if a["image_id"] == image_id]
    plain, crowd = [a for a in anns if not a["iscrowd"]], [a for a in anns if a["iscrowd"]]
    train = loaded.target(image_id, crowd=False)
    expected = torch.tensor([_xyxy(a["bbox"], image["width"], image["height"]) for a in plain])
    assert torch.allclose(train["boxes"], expected) and train["boxes"].dtype == torch.float32
    assert loaded.label_to_category_id(train["labels"]).tolist() == [a["category_id"] for a in plain]
    assert train["masks"].shape == (len(plain), image["height"], image["width"]) and train["masks"].dtype == torch.uint8
    for mask, a in zip(train["masks"], plain):  # polygons: pixel area within 5 % or 3 pixels of "area"
        assert abs(int(mask.sum()) - a["area"]) <= max(0.05 * a["area"], 3), a["id"]
    assert int(train["image_id"]) == image_id and "iscrowd" not in train
    evaluation = loaded.target(image_id, crowd=True)
    assert evaluation["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
    assert evaluation["area"].tolist() == pytest.approx([a["area"] for a in anns])
    for mask, a in zip(evaluation["masks"][evaluation["iscrowd"] == 1], crowd):
        x, y, w, h = _tight_box(mask)  # COCO's crowd bboxes are one pixel short of their RLE's extent
        assert [x, y, w - 1, h - 1] == a["bbox"]


def _small_json(tmp_path, raw, annotations, **changes):
    images = [im for im in raw["images"] if im["id"] in (9, 25)]  # 640x480 and 640x426
    record = {"images": images, "categories": raw["categories"], "annotations": annotations} | changes
    (tmp_path / "small.json").write_text(json.dumps(record))
    return tmp_path / "small.json"


def _ann(i, image_id, bbox, category_id=1, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, "area": 1.0} | extra


def test_labels_are_named_by_class_names_and_the_old_name_warns(loaded, raw):
    """``class_names[label]`` is the json's name of the label's category, as every DataModule names its
    labels; ``category_names``, the name detection used before, still reads, with a warning."""
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert loaded.class_names == ["background"] + [names[c] for c in loaded.category_ids[1:]]
    with pytest.warns(DeprecationWarning, match="COCODetection.category_names is deprecated: use class_names"):
        assert loaded.category_names == loaded.class_names


def test_degenerate_boxes_dropped_outside_boxes_clipped_and_counted(tmp_path, raw, coco128):
    annotations = [_ann(1, 9, [10, 10, 0, 20]), _ann(2, 9, [600, 400, 100, 200]), _ann(3, 9, [700, 10, 20, 20]),
                   _ann(4, 25, [5.5, 6.5, 30, 40], category_id=90), _ann(5, 25, [-10, -5, 20, 500]),
                   _ann(6, 25, [1, 2, 3, 4], iscrowd=1)]
    path = _small_json(tmp_path, raw, annotations)
    with pytest.warns(UserWarning, match=r"2 of 6 annotations dropped.*1 crowd regions.*2 boxes clipped"):
        dm = COCODetection(str(tmp_path), annotation_file=path.name, image_dir=str(coco128 / "train2017"))
    assert dm.target(9, crowd=False)["boxes"].tolist() == [[600, 400, 640, 480]]
    second = dm.target(25, crowd=False)
    assert second["boxes"].tolist() == [[5.5, 6.5, 35.5, 46.5], [0, 0, 10, 426]]
    assert dm.label_to_category_id(second["labels"]).tolist() == [90, 1]
    assert dm.target(25, crowd=True)["iscrowd"].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="0 is the background"):
        dm.label_to_category_id([0])


@pytest.mark.parametrize("problem, match", [
    ("unknown image", "refers to image id 12345, which is not in 'images'"),
    ("unknown category", "has category id 999, which is not in 'categories'"),
    ("missing file", "does not exist: image_dir must be"),
    ("empty", "is empty"),
    ("malformed", "is not valid JSON"),
    ("missing keys", r"lacks the key\(s\) \['annotations'\]"),
])
def test_bad_json_raises_naming_the_problem(tmp_path, raw, coco128, problem, match):
    annotations = [_ann(1, 9, [10, 10, 20, 20])]
    if problem == "unknown image":
        annotations.append(_ann(2, 12345, [1, 1, 5, 5]))
    if problem == "unknown category":
        annotations.append(_ann(2, 9, [1, 1, 5, 5], category_id=999))
    path = _small_json(tmp_path, raw, annotations)
    image_dir = coco128 / "train2017"
    if problem == "missing file":
        image_dir = tmp_path
    if problem == "empty":
        path.write_text("  \n")
    if problem == "malformed":
        path.write_text(path.read_text()[:-40])
    if problem == "missing keys":
        path.write_text(json.dumps({"images": [], "categories": []}))
    error = json.JSONDecodeError if problem == "malformed" else (FileNotFoundError, ValueError)
    with pytest.raises(error, match=match) as info:
        COCODetection(str(tmp_path), annotation_file=path.name, image_dir=str(image_dir))
    assert "small.json" in str(info.value)


def test_split_is_seeded_disjoint_saved_and_reloaded(tmp_path, coco128, raw, loaded):
    s = loaded.split
    assert [len(s[k]) for k in ("test", "labeled", "unlabeled")] == [16, 40, 72]
    ids = [set(loaded.image_ids[i] for i in s[k].tolist()) for k in ("test", "labeled", "unlabeled")]
    assert set.union(*ids) == {im["id"] for im in raw["images"]} and sum(map(len, ids)) == 128
    again = COCODetection(str(coco128), masks=True, num_labeled=40, seed=0).draw_split()
    other = COCODetection(str(coco128), masks=True, num_labeled=40, seed=1).draw_split()
    assert all(torch.equal(s[k], again[k]) for k in s) and not torch.equal(s["test"], other["test"])
    dm = COCODetection(str(coco128), num_labeled=40)
    dm.trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    dm.images = loaded.images  # skip decoding again
    dm.setup("fit")
    assert dm.split_path == tmp_path / "split.json"
    record = json.loads(dm.split_path.read_text())
    assert sorted(record["test"] + record["labeled"] + record["unlabeled"]) == sorted(loaded.image_ids)
    reloaded = COCODetection(str(coco128), num_labeled=3, seed=5, split_file=str(dm.split_path))
    reloaded.images = loaded.images
    reloaded.setup("test")
    assert all(torch.equal(reloaded.split[k], s[k]) for k in s)
    record["labeled"] = record["labeled"][1:]
    (tmp_path / "short.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not partition the 128 image ids"):
        COCODetection(str(coco128), split_file=str(tmp_path / "short.json")).setup("test")


def _orientation(image, original):
    if torch.equal(image, original):
        return "same"
    assert torch.equal(image, original.flip(-1)), "training geometry is a horizontal flip or nothing"
    return "flipped"


def _flip_boxes(boxes, width):
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def test_flips_move_images_boxes_and_masks_together_and_views_share_geometry(loaded):
    torch.manual_seed(0)
    position = {image_id: i for i, image_id in enumerate(loaded.image_ids)}
    seen, changed = set(), []
    for batch, _, _ in loaded.train_dataloader():
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        pairs = list(zip(labeled["image"], labeled["target"])) + list(zip(unlabeled["weak"], unlabeled["target"]))
        for image, target in pairs:
            image_id = int(target["image_id"])
            original, raw_target = loaded.images[position[image_id]], loaded.target(image_id, crowd=False)
            orientation = _orientation(image, original)
            seen.add(orientation)
            boxes, masks = raw_target["boxes"], raw_target["masks"]
            if orientation == "flipped":
                boxes, masks = _flip_boxes(boxes, original.shape[-1]), masks.flip(-1)
            assert torch.allclose(target["boxes"], boxes) and torch.equal(target["masks"], masks)
        for weak, strong, image_id in zip(unlabeled["weak"], unlabeled["strong"], unlabeled["image_id"]):
            assert strong.shape == weak.shape
            changed.append(not torch.equal(strong, weak))
            centred = [x.float().mean(0).flatten() - x.float().mean() for x in (strong, weak, weak.flip(-1))]
            same, mirrored = (torch.dot(centred[0], c) / c.norm() for c in centred[1:])
            assert same > mirrored, f"the strong view of image {image_id} is not in the weak view's geometry"
    assert seen == {"same", "flipped"}
    # every photometric op is random: a strong view comes out unchanged with probability ~0.8 %
    assert sum(changed) >= 0.75 * len(changed)


def test_resize_scales_boxes_and_masks_and_boxes_cut_away_are_dropped(tmp_path, raw, coco128):
    rectangle = [[100, 50, 300, 50, 300, 150, 100, 150]]
    path = _small_json(tmp_path, raw, [_ann(1, 9, [100, 50, 200, 100], segmentation=rectangle)])
    dm = COCODetection(str(tmp_path), annotation_file=path.name, image_dir=str(coco128 / "train2017"), masks=True,
                       num_test=0, num_labeled=2, min_size=240, hflip=False, steps_per_epoch=1)
    dm.setup("fit")
    item = dm.train_dataloader().iterables["labeled"].dataset[0]  # labeled images in id order: 9, 25
    assert item["image"].shape == (3, 240, 320) and item["target"]["boxes"].tolist() == [[50, 25, 150, 75]]
    masks = item["target"]["masks"]
    assert masks.shape == (1, 240, 320) and _tight_box(masks[0]) == [50, 25, 100, 50] and int(masks.sum()) == 5000
    # a geometry that cuts the box away (a centre crop missing rows 50-150) leaves a zero-height box
    cropped = DetectionItems(dm.images, dm.coco.images, torch.tensor([0]), True, v2.CenterCrop(100))
    with pytest.warns(UserWarning, match="1 box.* lost their width or height"):
        item = cropped[0]
    assert item["target"]["boxes"].shape == (0, 4) and item["target"]["masks"].shape == (0, 100, 100)
    assert cropped.dropped_after_transform == 1


def test_batches_train_a_mask_rcnn_and_eval_batches_keep_crowds(loaded):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    plain = COCODetection(str(loaded.root), masks=True, num_labeled=40, steps_per_epoch=1)
    plain.images, plain.split = loaded.images, loaded.split
    assert set(next(iter(plain.train_dataloader()))[0]) == {"labeled"}  # no views asked for: no unlabeled stream
    plain.trainer = SimpleNamespace(lightning_module=SimpleNamespace(unlabeled_views=("weak", "strong2")))
    raw_batch = next(iter(plain.train_dataloader()))[0]
    assert set(raw_batch["unlabeled"]) == {"weak", "strong2", "target", "index", "image_id"}
    batch = plain.on_after_batch_transfer(raw_batch, 0)
    images, targets = batch["labeled"]["image"], batch["labeled"]["target"]
    assert all(x.dtype == torch.float32 and x.shape[0] == 3 and 0 <= x.min() and x.max() <= 1 for x in images)
    assert all(t["labels"].dtype == torch.int64 and t["image_id"].dtype == torch.int64 for t in targets)
    unlabeled = batch["unlabeled"]
    assert unlabeled["strong2"][0].dtype == torch.float32 and isinstance(unlabeled["image_id"][0], int)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 16
    model = MaskRCNN(backbone, num_classes=plain.num_classes, min_size=128, max_size=256,
                     rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
                     box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                     representation_size=64)
    losses = model(images, targets)
    assert {"loss_mask", "loss_classifier"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    evaluation = [plain.on_after_batch_transfer(b, 0) for b in plain.test_dataloader()]
    assert sum(len(b["image"]) for b in evaluation) == 16
    crowded = [t for b in evaluation for t in b["target"] if t["iscrowd"].any()]
    expected = sum(loaded.target(loaded.image_ids[i])["iscrowd"].any().item() for i in loaded.split["test"].tolist())
    assert len(crowded) == expected and all(t["iscrowd"].dtype == torch.int64 for t in crowded)


def test_mask_decoding_polygons_and_rle():
    square = decode_masks([[[1, 1, 4, 1, 4, 3, 1, 3]]], 5, 6)[0]  # 3 x 2 pixels: columns 1-3, rows 1-2
    assert square.sum() == 6 and square[1:3, 1:4].all()
    for text, counts, size in (("151L3", [1, 5, 1, 1, 4], (4, 3)), ("0V22kM04", [0, 70, 2, 1, 2, 5], (8, 10))):
        # the same runs, compressed and uncompressed: column-major, zeros first
        masks = decode_masks([{"counts": text, "size": list(size)}, {"counts": counts, "size": list(size)}], *size)
        runs = torch.from_numpy(np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8))
        for mask in masks:
            assert torch.equal(torch.from_numpy(mask.T.reshape(-1)), runs)
    with pytest.raises(ValueError, match="counts are corrupt"):
        decode_masks([{"counts": [3, 4], "size": [4, 3]}], 4, 3)


@pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="pycocotools not installed")
def test_mask_decoding_agrees_with_pycocotools(raw, loaded):
    """Every coco128 mask, polygons and RLE, decodes pixel for pixel as pycocotools decodes it."""
    from pycocotools import mask as coco_mask

    size = {im["id"]: (im["height"], im["width"]) for im in raw["images"]}
    kinds = []
    for a in raw["annotations"]:
        h, w = size[a["image_id"]]
        ours, segmentation = decode_masks([a["segmentation"]], h, w)[0], a["segmentation"]
        compressed = coco_mask.frPyObjects(segmentation, h, w)
        reference = coco_mask.decode(coco_mask.merge(compressed) if isinstance(segmentation, list) else compressed)
        assert ours.dtype == np.uint8 and np.array_equal(ours, reference), a["id"]
        if not isinstance(segmentation, list):
            assert np.array_equal(decode_masks([compressed], h, w)[0], reference)
        kinds.append(type(segmentation).__name__)
    assert kinds.count("list") == 929 and kinds.count("dict") == 10
    for image_id in (9, 315):  # the per-image stack target_of builds holds pycocotools' masks
        anns = [a for a in raw["annotations"] if a["image_id"] == image_id]
        h, w = size[image_id]
        stacked = loaded.target(image_id, crowd=True)["masks"]
        reference = [coco_mask.frPyObjects(a["segmentation"], h, w) for a in anns]
        reference = [coco_mask.decode(coco_mask.merge(r) if isinstance(r, list) else r) for r in reference]
        assert stacked.is_contiguous() and torch.equal(stacked, torch.from_numpy(np.stack(reference)))


@pytest.mark.parametrize("segmentation, match", [
    ([[1, 1, 4, 1, 4]], "not a flat"),
    ([[1, 1, "4", 1, 4, 3]], "not a flat"),
    ([5, 1, 4, 1, 4, 3], "not a flat"),  # a polygon not wrapped in the list of polygons
    ([[1, 1, 4, 1, 4, float("nan")]], "not finite"),
    ([[1, 1, 4e9, 1, 4, 3]], "more than one image size outside"),
    ({"counts": [3, 4], "size": [4, 3]}, "counts are corrupt"),
    ({"counts": "151L", "size": [4, 3]}, "counts are corrupt"),
    ({"counts": "zzzz", "size": [4, 3]}, "counts are corrupt"),
    ({"counts": [12], "size": [3, 4]}, "does not match its image"),
    ("person", "unknown COCO segmentation"),
])
def test_malformed_masks_raise_naming_the_problem(segmentation, match):
    # the mask API checks none of the polygon cases itself (a NaN or a far coordinate exhausts memory)
    with pytest.raises(ValueError, match=match):
        decode_masks([segmentation], 4, 3)


def test_empty_segmentations_decode_to_empty_masks():
    assert decode_masks([[]], 4, 3).shape == (1, 4, 3) and not decode_masks([[]], 4, 3).any()
    assert decode_masks([[[1, 2, 3, 4]]], 4, 3).sum() == 0  # two points enclose nothing
    assert decode_masks([], 4, 3).shape == (0, 4, 3)


def test_membrane_cells_to_coco_reads_back_as_instances(shared_data, tmp_path):
    membrane = shared_data / "membrane"
    if not (membrane / "label").is_dir():
        pytest.skip(f"{membrane} not found")
    spec = importlib.util.spec_from_file_location("membrane_cells_to_coco", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.write_membrane_cells_coco(membrane, tmp_path / "cells")
    out = script.write_membrane_cells_coco(membrane, tmp_path / "cells")  # replaces the first copy whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells"]
    record = json.loads((out / "annotations.json").read_text())
    first = [a for a in record["annotations"] if a["image_id"] == 1]
    assert 80 <= len(first) <= 200 and len(record["images"]) == 30
    assert all(0 <= x and 0 <= y and x + w <= 512 and y + h <= 512 and w > 0 and h > 0
               for x, y, w, h in (a["bbox"] for a in record["annotations"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to drop, clip or flag
        dm = COCODetection(str(out), annotation_file="annotations.json", image_dir="images", masks=True)
    assert dm.num_classes == 2 and dm.class_names == ["background", "cell"]
    target = dm.target(1)
    masks = target["masks"].numpy().astype(bool)
    assert [int(m.sum()) for m in masks] == [a["area"] for a in first] == target["area"].int().tolist()
    assert [_tight_box(m) for m in masks] == [a["bbox"] for a in first]
    foreground = np.asarray(Image.open(membrane / "label" / "0.png").convert("L")) > 127
    assert masks.sum(0).max() == 1 and not (masks.any(0) & ~foreground).any()
    assert (foreground & ~masks.any(0)).sum() < 0.01 * foreground.sum()  # only fragments under 20 pixels are left

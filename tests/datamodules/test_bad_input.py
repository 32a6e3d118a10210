"""Bad input to the DataModules gives one clear error naming the file and the fix (docs/robustness.md).

Cases that the modules' own tests do not already pin: truncated image files in each reader,
malformed COCO json (wrong types, missing fields), class ids beyond ``num_classes`` in
classification data, and split files that are not split files or belong to other data; and a
write that fails half-way leaves the old file whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from datamodules import COCODetection, DigitsSSL, ImageFolderSSL, SegmentationFolders
from datamodules.split import class_balanced_split, load_split, save_split
from lightning_modules.core.atomic import atomic_path, write_json_atomically

pytestmark = pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def coco128(shared_data) -> Path:
    root = shared_data / "coco128"
    if not (root / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"{root} not found")
    return root


@pytest.fixture(scope="module")
def small_coco(coco128) -> dict:
    """The first 3 coco128 images and their annotations, as a json record."""
    raw = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    images = sorted(raw["images"], key=lambda im: im["id"])[:3]
    ids = {im["id"] for im in images}
    return {"images": images, "annotations": [a for a in raw["annotations"] if a["image_id"] in ids],
            "categories": raw["categories"]}


def write_json(tmp_path: Path, record) -> str:
    (tmp_path / "small.json").write_text(json.dumps(record))
    return "small.json"


# --- corrupt image files --------------------------------------------------------------------
def test_truncated_png_in_an_image_folder(cifar_folder, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(cifar_folder, root)
    from PIL import Image

    victim = next((root / "test" / "ship").iterdir())
    with Image.open(victim) as pil:
        pil.save(root / "test" / "ship" / "cut.png")
    truncate(root / "test" / "ship" / "cut.png")
    with pytest.raises(ValueError, match=r"ImageFolderSSL: cannot decode image .*test/ship/cut\.png \(image file is "
                                         r"truncated\): replace or remove it"):
        ImageFolderSSL(root=str(root), num_labeled=50).setup("test")


def test_truncated_mask_in_segmentation_folders(shared_data, tmp_path):
    for sub in ("image", "label"):
        (tmp_path / sub).mkdir()
        for stem in range(3):
            shutil.copy(shared_data / "membrane" / sub / f"{stem}.png", tmp_path / sub / f"{stem}.png")
    truncate(tmp_path / "label" / "2.png")
    with pytest.raises(ValueError, match=r"cannot decode mask .*label/2\.png \(image file is truncated\)"):
        SegmentationFolders(root=str(tmp_path), num_test=1).setup("fit")


@pytest.mark.parametrize("damage, reason", [("truncate", "Image is incomplete or truncated"),
                                            ("garbage", "Unsupported image file")])
def test_corrupt_image_in_a_coco_folder(coco128, small_coco, tmp_path, damage, reason):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for im in small_coco["images"]:
        shutil.copy(coco128 / "train2017" / im["file_name"], image_dir / im["file_name"])
    victim = image_dir / small_coco["images"][1]["file_name"]
    truncate(victim) if damage == "truncate" else victim.write_bytes(b"not an image at all")
    dm = COCODetection(str(tmp_path), annotation_file=write_json(tmp_path, small_coco), image_dir="images", num_test=1)
    with pytest.raises(ValueError, match=rf"cannot decode image {small_coco['images'][1]['id']} at .*{victim.name} "
                                         rf"\({reason}\): replace the file, or remove the image"):
        dm.setup("fit")


# --- malformed COCO json ----------------------------------------------------------------------
def _break(record: dict, problem: str) -> dict:
    record = json.loads(json.dumps(record))
    if problem == "images not a list":
        record["images"] = {}
    elif problem == "annotations null":
        record["annotations"] = None
    elif problem == "annotation not an object":
        record["annotations"][0] = 5
    elif problem == "image without file_name":
        del record["images"][0]["file_name"]
    elif problem == "height a string":
        record["images"][1]["height"] = "480"
    elif problem == "category without id":
        del record["categories"][2]["id"]
    elif problem == "bbox of strings":
        record["annotations"][3]["bbox"] = ["1", 2, 3, 4]
    elif problem == "no images":
        record["images"], record["annotations"] = [], []
    return record


@pytest.mark.parametrize("problem, match", [
    ("images not a list", r"'images' is dict \{\}, not a list"),
    ("annotations null", r"'annotations' is NoneType None, not a list"),
    ("annotation not an object", r"annotations\[0\] is 5, not an object with \['bbox', 'category_id', 'image_id'\]"),
    ("image without file_name", r"images\[0\] \(id 9\) field 'file_name' is missing: it must be a string"),
    ("height a string", r"images\[1\] \(id \d+\) field 'height' is '480': it must be a positive integer"),
    ("category without id", r"categories\[2\] \(id None\) field 'id' is missing: it must be an integer"),
    ("bbox of strings", r"annotations\[3\] \(id \d+\) field 'bbox' is \['1', 2, 3, 4\]: it must be \[x, y, width"),
    ("no images", "lists no images"),
])
def test_malformed_coco_json_names_the_entry_and_field(coco128, small_coco, tmp_path, problem, match):
    name = write_json(tmp_path, _break(small_coco, problem))
    with pytest.raises(ValueError, match=match) as info:
        COCODetection(str(tmp_path), annotation_file=name, image_dir=str(coco128 / "train2017"))
    assert "small.json" in str(info.value)


# --- class ids out of range -----------------------------------------------------------------
class DigitsWithFiveClasses(DigitsSSL):
    num_classes = 5  # the data's labels go up to 9


def test_classification_targets_beyond_num_classes():
    with pytest.raises(ValueError, match=r"DigitsWithFiveClasses: the train split has \d+ target\(s\) outside the "
                                         r"class ids 0\.\.4 \(e\.g\. \d\): num_classes=5 is too small"):
        DigitsWithFiveClasses(num_labeled=None).setup("fit")


# --- split files that are not split files, or belong to other data ---------------------------
def test_classification_split_file_that_is_not_a_split(tmp_path):
    targets = torch.arange(40) % 10
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"is not a labelwise split \(a JSON list; expected format 'labelwise-split/1'\)"):
        load_split(tmp_path / "list.json", targets, "DigitsSSL")
    (tmp_path / "cut.json").write_text(json.dumps({"format": "labelwise-split/1", "dataset": "DigitsSSL"}))
    with pytest.raises(ValueError, match=r"lacks \['num_train', 'targets_sha1', 'seed', 'labeled', 'unlabeled'\]"):
        load_split(tmp_path / "cut.json", targets, "DigitsSSL")
    path = save_split(tmp_path / "digits.json", class_balanced_split(targets, 20, 10, 0), targets, "DigitsSSL")
    with pytest.raises(ValueError, match="made for DigitsSSL with 40 training images .* but this run uses "
                                         "CIFAR10SSL with 40 .*pass the split file of this dataset"):
        load_split(path, targets, "CIFAR10SSL")


def test_segmentation_split_file_of_other_images_or_another_kind(shared_data, tmp_path):
    for sub in ("image", "label"):
        (tmp_path / "six" / sub).mkdir(parents=True)
        for stem in range(6):
            shutil.copy(shared_data / "membrane" / sub / f"{stem}.png", tmp_path / "six" / sub / f"{stem}.png")
    dm = SegmentationFolders(root=str(shared_data / "membrane"), num_test=2, num_labeled=3)
    dm.load()
    dm.split = dm.draw_split()
    (tmp_path / "membrane_split.json").write_text(json.dumps(dm.split_record()))
    with pytest.raises(ValueError, match=r"does not partition the 6 images under .*six: it was made for other files"):
        SegmentationFolders(root=str(tmp_path / "six"), split_file=str(tmp_path / "membrane_split.json")).setup("fit")
    targets = torch.arange(40) % 10
    save_split(tmp_path / "classification.json", class_balanced_split(targets, 20, 10, 0), targets, "DigitsSSL")
    with pytest.raises(ValueError, match=r"is not a segmentation split \(format 'labelwise-split/1'; expected format "
                                         r"'labelwise-segmentation-split/1'\)"):
        SegmentationFolders(root=str(tmp_path / "six"), split_file=str(tmp_path / "classification.json")).setup("fit")
    (tmp_path / "cut.json").write_text(json.dumps({"format": "labelwise-segmentation-split/1", "labeled": ["0"]}))
    with pytest.raises(ValueError, match=r"lacks \['unlabeled', 'test', 'seed'\]: it was edited or cut short"):
        SegmentationFolders(root=str(tmp_path / "six"), split_file=str(tmp_path / "cut.json")).setup("fit")


# --- nothing half-written -----------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json_atomically(tmp_path / "split.json", {"seed": 0})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomically(path, {"seed": object()})
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"seed": 1, "labe')  # half a record, then the writer dies
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"seed": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]
    with atomic_path(path) as tmp:
        torch.save({"seed": 2}, tmp)
    assert torch.load(path) == {"seed": 2} and [p.name for p in tmp_path.iterdir()] == ["split.json"]

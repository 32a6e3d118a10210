"""Class names as metric keys, on coco128's 80 real category names."""

import json
import re

import pytest

from lightning_modules.core.class_keys import class_keys


def test_coco_category_names_become_unique_lower_case_keys(shared_data):
    path = shared_data / "coco128" / "annotations" / "instances_train2017.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    names = ["background"] + [c["name"] for c in sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])]
    keys = class_keys(names)
    assert len(keys) == len(set(keys)) == 81 and all(re.fullmatch(r"[a-z0-9_]+", k) for k in keys)
    by_name = dict(zip(names, keys))
    assert by_name["person"] == "person" and by_name["traffic light"] == "traffic_light"
    assert by_name["hair drier"] == "hair_drier"


def test_names_with_nothing_left_or_clashing_still_get_one_key_per_label():
    assert class_keys(["background", "Traffic-Light!", "traffic light", "", "細胞", "cell_2", "cell", "cell"]) == [
        "background", "traffic_light", "traffic_light_2", "class3", "class4", "cell_2", "cell", "cell_7"]

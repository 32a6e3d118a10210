"""`train.py predict` for segmentation (mask PNGs read back with PIL and as SegmentationFolders masks,
overlays) and detection (COCO results JSON read back with pycocotools, RLE masks for Mask R-CNN), on the
test images and on a folder of new images (--data.predict_root), from checkpoints trained here."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import SegmentationFolders
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*crowd regions:UserWarning")]
# check_val_every_n_epoch 1: the recipes validate (and so checkpoint) every 5 epochs
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--trainer.check_val_every_n_epoch", "1",
         "--test_after_fit", "false"]


def _fit(args: list[str]) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cli = cli_main(["fit", *args, *QUIET])
    torch.set_num_threads(threads)
    return next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))


def _flat(predictions: list) -> list:
    return [item for batch in predictions for item in (batch if isinstance(batch, list) else [batch])]


# --- segmentation -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmenter(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    args = ["--model", "Segmenter", "--model.network", "Unet", "--model.network_kwargs",
            '{"encoder_name": "vgg11", "decoder_use_norm": false, "decoder_channels": [16, 8, 8, 8, 8]}',
            "--model.loss_terms", '{"ce": 1.0}', "--model.log_images", "0", "--data", "SegmentationFolders",
            "--data.root", str(shared_data / "membrane"), "--data.num_labeled", "2", "--data.num_test", "2",
            "--data.crop_size", "64", "--data.batch_size", "2", "--data.steps_per_epoch", "2",
            "--trainer.default_root_dir", str(root)]
    return args, _fit(args)


def test_segmentation_writes_mask_pngs_that_read_back_as_masks(segmenter, shared_data, tmp_path, capsys):
    args, ckpt = segmenter
    cli = cli_main(["predict", *args, *QUIET, "--ckpt_path", str(ckpt)])
    masks = Path(cli.trainer.log_dir) / "predictions" / "masks"
    assert f"2 masks: {masks}" in capsys.readouterr().out
    data = cli.datamodule
    names = [data.image_names[i] for i in data.split.test.tolist()]
    assert sorted(p.name for p in masks.iterdir()) == sorted(names)
    predicted = {name: p["prediction"][0] for name, p in zip(names, cli.trainer.predict_loop.predictions)}
    for name, classes in predicted.items():
        with Image.open(masks / name) as pil:
            assert pil.mode == "L" and pil.size == (512, 512)
            pixels = torch.from_numpy(np.asarray(pil).copy())
        assert set(pixels.unique().tolist()) <= {0, 255}
        assert torch.equal(pixels, classes.to(torch.uint8) * 255)  # 255 = foreground, as the membrane labels
    # the written masks are masks SegmentationFolders reads: image/ + the predictions as label/
    (tmp_path / "check").mkdir()
    shutil.copytree(shared_data / "membrane" / "image", tmp_path / "check" / "image",
                    ignore=lambda d, files: [f for f in files if f not in names])
    shutil.copytree(masks, tmp_path / "check" / "label")
    reread = SegmentationFolders(root=str(tmp_path / "check"), num_test=0)
    reread.load()
    for stem, mask in zip(reread.stems, reread.masks):
        assert torch.equal(mask.long(), predicted[f"{stem}.png"].long())


def test_segmentation_predicts_a_folder_with_overlays(segmenter, shared_data, tmp_path):
    args, ckpt = segmenter
    folder = tmp_path / "new"
    (folder / "more").mkdir(parents=True)
    for k, size in ((3, 512), (7, 96)):  # two sizes: batches of one image
        with Image.open(shared_data / "membrane" / "image" / f"{k}.png") as pil:
            pil.convert("L").resize((size, size), Image.BILINEAR).save(folder / ("more" if k == 7 else ".") / f"s{k}.tif")
    out = tmp_path / "out"
    cli = cli_main(["predict", *args, *QUIET, "--ckpt_path", str(ckpt), "--data.predict_root", str(folder),
                    "--trainer.callbacks+=PredictionWriter", f"--trainer.callbacks.output_dir={out}",
                    "--trainer.callbacks.overlays=true"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "masks/more/s7.png", "masks/s3.png", "overlays/more/s7.png", "overlays/s3.png"]
    for name, prediction in zip(["more/s7", "s3"], cli.trainer.predict_loop.predictions):  # sorted by path
        classes = prediction["prediction"][0]
        with Image.open(out / "masks" / f"{name}.png") as pil:
            assert torch.equal(torch.from_numpy(np.asarray(pil).copy()), classes.to(torch.uint8) * 255)
        with Image.open(out / "overlays" / f"{name}.png") as pil:
            rgb = torch.from_numpy(np.asarray(pil).copy()).long()
        assert rgb.shape == (*classes.shape, 3)
        grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
        assert torch.equal(grey, classes == 0)  # background stays grey, foreground is tinted


# --- detection ----------------------------------------------------------------------------------
def _boxes_match(results: list[dict], detections: list[dict], image_id: int) -> None:
    mine = [r for r in results if r["image_id"] == image_id]
    boxes = detections["boxes"]
    assert len(mine) == len(boxes) > 0
    expected = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    torch.testing.assert_close(torch.tensor([r["bbox"] for r in mine]), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.tensor([r["score"] for r in mine]), detections["scores"], atol=1e-5, rtol=0)


def test_faster_rcnn_writes_coco_results_that_pycocotools_reads(shared_data, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco128 = shared_data / "coco128"
    args = ["--config", str(REPO / "configs" / "fasterrcnn_mobilenet_coco128.yaml"), "--data.root", str(coco128),
            "--data.num_test", "3", "--data.batch_size", "1", "--data.steps_per_epoch", "1",
            "--model.min_size", "128", "--model.max_size", "160", "--model.log_images", "0",
            "--model.roi_heads_kwargs", '{"score_thresh": 0.0, "detections_per_img": 4}',
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    ckpt = _fit(args)
    cli = cli_main(["predict", *args, *QUIET, "--ckpt_path", str(ckpt)])
    out = Path(cli.trainer.log_dir) / "predictions"
    detections = {int(d["image_id"]): d for d in _flat(cli.trainer.predict_loop.predictions)}
    test_ids = [cli.datamodule.image_ids[i] for i in cli.datamodule.split["test"].tolist()]
    assert sorted(detections) == sorted(test_ids)
    truth = COCO(str(coco128 / "annotations" / "instances_train2017.json"))
    results = truth.loadRes(str(out / "results.json"))  # checks every image id is one of the json's
    assert {a["image_id"] for a in results.dataset["annotations"]} == set(test_ids)
    assert {a["category_id"] for a in results.dataset["annotations"]} <= set(truth.getCatIds())
    listed = json.loads((out / "images.json").read_text())
    assert [(im["id"], im["file_name"]) for im in listed["images"]] == [(i, truth.imgs[i]["file_name"])
                                                                        for i in sorted(test_ids)]
    assert {c["id"]: c["name"] for c in listed["categories"]} == {i: c["name"] for i, c in truth.cats.items()}
    entries = json.loads((out / "results.json").read_text())
    for image_id, detected in detections.items():
        _boxes_match(entries, detected, image_id)
    evaluation = COCOeval(truth, results, "bbox")
    evaluation.params.imgIds = test_ids
    evaluation.evaluate()
    evaluation.accumulate()
    assert len(evaluation.eval["precision"].shape) == 5  # scored like any COCO result file

    folder = tmp_path / "new"
    (folder / "b").mkdir(parents=True)
    for file, where in (("000000000009.jpg", "."), ("000000000025.jpg", "b")):
        shutil.copy(coco128 / "train2017" / file, folder / where / file)
    cli = cli_main(["predict", *args, *QUIET, "--ckpt_path", str(ckpt), "--data.predict_root", str(folder)])
    out = Path(cli.trainer.log_dir) / "predictions"
    images = COCO(str(out / "images.json"))
    assert [(im["id"], im["file_name"]) for im in images.dataset["images"]] == [(1, "000000000009.jpg"),
                                                                                (2, "b/000000000025.jpg")]
    results = images.loadRes(str(out / "results.json"))
    assert {a["image_id"] for a in results.dataset["annotations"]} == {1, 2}
    entries = json.loads((out / "results.json").read_text())
    for detected in _flat(cli.trainer.predict_loop.predictions):
        _boxes_match(entries, detected, int(detected["image_id"]))


def test_mask_rcnn_results_carry_rle_masks(shared_data, tmp_path):
    from benchmarks.membrane_cells_to_coco import write_membrane_cells_coco
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    cells = write_membrane_cells_coco(shared_data / "membrane", tmp_path / "cells")
    args = ["--config", str(REPO / "configs" / "maskrcnn_membrane_cells.yaml"), "--data.root", str(cells),
            "--data.steps_per_epoch", "1", "--data.batch_size", "1", "--model.min_size", "128",
            "--model.max_size", "128", "--model.log_images", "0", "--model.rpn_kwargs", '{"post_nms_top_n_test": 50}',
            "--model.roi_heads_kwargs", '{"score_thresh": 0.0, "detections_per_img": 3}',
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    ckpt = _fit(args)
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(shared_data / "membrane" / "image" / "12.png", folder / "slice12.png")
    cli = cli_main(["predict", *args, *QUIET, "--ckpt_path", str(ckpt), "--data.predict_root", str(folder)])
    out = Path(cli.trainer.log_dir) / "predictions"
    results = COCO(str(out / "images.json")).loadRes(str(out / "results.json"))
    annotations = sorted(results.dataset["annotations"], key=lambda a: -a["score"])
    detected = _flat(cli.trainer.predict_loop.predictions)[0]
    assert len(annotations) == len(detected["masks"]) == 3
    for annotation, mask in zip(annotations, detected["masks"]):
        assert annotation["segmentation"]["size"] == [512, 512]
        assert np.array_equal(coco_mask.decode(annotation["segmentation"]).astype(bool), mask.numpy())
        assert annotation["category_id"] == cli.datamodule.category_ids[1]

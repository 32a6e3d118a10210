"""Write what ``predict`` returns to files: on by default in ``train.py predict``.

    python train.py predict --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt \
        --data.predict_root my_digits/
    # -> runs/quickstart/lightning_logs/version_N/predictions/predictions.csv

The format follows the task (:mod:`callbacks.prediction_formats`): a CSV of classes and
probabilities, mask PNGs (and overlays), or COCO results JSON. Everything is written into a hidden
staging folder beside ``output_dir`` and moved into place when the whole set is written, so
``output_dir`` never holds half a prediction set (a failed run leaves it as it was).

Under DDP each rank predicts its share of the images (Lightning's predict sampler does not repeat
images to even the shares); mask PNGs are written by the rank that predicted them (several nodes
then need ``output_dir`` on a shared file system), and CSV rows and COCO results are gathered to
rank 0, which merges them once, keyed by image (a repeated image is written once), in image order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.prediction_formats import (classification_rows, coco_results, mask_image, overlay_image, png_name,
                                          save_png, task_of, write_csv)
from lightning_modules.core.atomic import write_json_atomically


class PredictionWriter(BasePredictionWriter):
    """Write each predict batch's results (``write_interval="batch"``) and merge them at the end.

    Args:
        output_dir: where the predictions go; default ``predictions/`` in the run's log folder
            (``trainer.log_dir``). An existing folder is replaced once the new set is complete.
        overlays: segmentation: also write ``overlays/<image>.png``, the image with its predicted
            classes tinted.

    What it reads from the DataModule, when there: ``class_names`` (classification; else class
    ids), ``mask_pixel_values()`` (segmentation; else class ids), ``label_to_category_id``,
    ``category_ids`` with ``class_names`` and ``predict_image_records()`` (detection). Predict
    batches name their images with ``"file"`` (folders) or ``index``/``image_id``.
    """

    def __init__(self, output_dir: str | None = None, overlays: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.overlays = output_dir, overlays
        self.path: Path | None = None  # where the last predict run's files went
        self._task: str | None = None
        self._rows: dict[Any, Any] = {}
        self._staging: Path | None = None

    # --- the run ------------------------------------------------------------------------------
    def on_predict_start(self, trainer, pl_module) -> None:
        root = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is broadcast: every rank calls it
        self.path = Path(self.output_dir).expanduser() if self.output_dir else root / "predictions"
        self._staging = self.path.parent / f".{self.path.name}.partial"
        if trainer.is_global_zero:
            shutil.rmtree(self._staging, ignore_errors=True)  # left by a run that failed
            self._staging.mkdir(parents=True)
        trainer.strategy.barrier("PredictionWriter staging")
        self._task, self._rows, self._warned = None, {}, False

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        task = task_of(prediction)
        if task is None:
            if not self._warned:
                rank_zero_warn(f"PredictionWriter: predict_step returned {type(prediction).__name__}, not a "
                               f"classification, segmentation or detection output; nothing is written (add your "
                               f"own BasePredictionWriter to --trainer.callbacks for it)")
                self._warned = True
            return
        self._task = task
        data = trainer.datamodule
        if task == "classification":
            names = getattr(data, "class_names", None) or [str(c) for c in range(prediction["probs"].shape[1])]
            self._rows.update(classification_rows(prediction, batch, names))
        elif task == "segmentation":
            self._write_masks(prediction, batch, data)
        else:
            self._collect_detections(prediction, batch_indices, data)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        gathered = _gather((self._task, self._rows), trainer)
        if trainer.is_global_zero:
            rows, task = {}, next((task for task, _ in gathered if task), None)
            for _, part in gathered:
                rows.update(part)  # keyed by image: an image predicted twice is written once
            summary = self._write_merged(task, rows, trainer.datamodule)
            if self.path.exists():
                old = self.path.parent / f".{self.path.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                self.path.rename(old)
                self._staging.rename(self.path)
                shutil.rmtree(old)
            else:
                self._staging.rename(self.path)
            print(f"Predictions written: {summary}")
        trainer.strategy.barrier("PredictionWriter merged")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.is_global_zero and self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    # --- per task -----------------------------------------------------------------------------
    def _write_masks(self, prediction: dict, batch: dict, data: Any) -> None:
        classes = prediction["prediction"]
        values = data.mask_pixel_values() if hasattr(data, "mask_pixel_values") else range(prediction["probs"].shape[1])
        names = batch.get("file") or [f"{int(i)}.png" for i in prediction["index"]]
        for k, name in enumerate(names):
            target = png_name(name)
            save_png(mask_image(classes[k], values), self._staging / "masks" / target)
            if self.overlays:
                save_png(overlay_image(batch["image"][k], classes[k]), self._staging / "overlays" / target)
            self._rows[name] = target

    def _collect_detections(self, prediction: list[dict], batch_indices: Sequence[int] | None, data: Any) -> None:
        category_ids = torch.tensor(data.category_ids) if hasattr(data, "category_ids") else None
        for k, detection in enumerate(prediction):
            image_id = detection.get("image_id")
            if image_id is None:
                if batch_indices is None:
                    raise ValueError("PredictionWriter: detections without an image_id, and no batch indices")
                image_id = batch_indices[k]
            self._rows[int(image_id)] = coco_results(detection, int(image_id), category_ids)

    def _write_merged(self, task: str | None, rows: dict, data: Any) -> str:
        if task == "classification":
            ordered = [rows[key] for key in sorted(rows)]
            write_csv(self._staging / "predictions.csv", ordered)
            return f"{len(ordered)} images classified: {self.path / 'predictions.csv'}"
        if task == "segmentation":
            return f"{len(rows)} masks: {self.path / 'masks'}" + (f" (overlays: {self.path / 'overlays'})"
                                                                  if self.overlays else "")
        if task == "detection":
            results = [entry for image_id in sorted(rows) for entry in sorted(rows[image_id], key=lambda e: -e["score"])]
            write_json_atomically(self._staging / "results.json", results)
            images = {"images": data.predict_image_records() if hasattr(data, "predict_image_records") else
                      [{"id": i} for i in sorted(rows)]}
            if hasattr(data, "category_ids") and hasattr(data, "class_names"):
                images["categories"] = [{"id": c, "name": n}
                                        for c, n in zip(data.category_ids[1:], data.class_names[1:])]
            write_json_atomically(self._staging / "images.json", images, indent=1)
            return (f"{len(results)} detections on {len(rows)} images: {self.path / 'results.json'} (COCO results; "
                    f"images.json lists the images and categories)")
        return f"nothing (no predict output of a known kind) in {self.path}"


def _gather(value: Any, trainer) -> list:
    """Every rank's ``value`` on rank 0 (``[value]`` in one process); other ranks get an empty list."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * trainer.world_size if trainer.is_global_zero else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered or []


def use_prediction_writer(trainer) -> None:
    """Give ``trainer`` a default :class:`PredictionWriter` unless it has a prediction writer already
    (e.g. one configured with ``--trainer.callbacks+=PredictionWriter --trainer.callbacks.output_dir=DIR``)."""
    if not any(isinstance(callback, BasePredictionWriter) for callback in trainer.callbacks):
        trainer.callbacks.append(PredictionWriter())

"""Images with true and predicted boxes drawn, for W&B and TensorBoard, for any detection module.

True boxes are green, predicted boxes red with ``label:score`` captions; predictions under
``score_threshold`` are left out so that a barely trained model's hundred low-score boxes do not
hide the image.
"""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torchvision.utils import draw_bounding_boxes


def draw_detections(image: torch.Tensor, detections: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                    score_threshold: float = 0.5) -> torch.Tensor:
    """``(3, H, W)`` uint8: ``image`` (floats in [0, 1]) with true boxes in green and predictions in red."""
    canvas = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
    canvas = draw_bounding_boxes(canvas, target["boxes"].detach().cpu(), colors="lime", width=2)
    keep = detections["scores"] >= score_threshold
    captions = [f"{label}:{score:.2f}" for label, score in
                zip(detections["labels"][keep].tolist(), detections["scores"][keep].tolist())]
    return draw_bounding_boxes(canvas, detections["boxes"][keep].detach().cpu(), labels=captions, colors="red", width=2)


def log_detections(logger: Logger | None, images: list[torch.Tensor], detections: list[dict[str, torch.Tensor]],
                   targets: list[dict[str, torch.Tensor]], count: int, key: str, step: int,
                   score_threshold: float = 0.5) -> None:
    """Log the first ``count`` images with their boxes to a W&B or TensorBoard logger; others have no image API."""
    if logger is None or count <= 0:
        return
    drawn = [draw_detections(*item, score_threshold=score_threshold)
             for item in zip(images[:count], detections[:count], targets[:count])]
    if isinstance(logger, WandbLogger):  # uint8: wandb.Image casts floats unscaled, [0, 1] came out black
        logger.log_image(key=key, images=drawn, step=step, caption=["truth green, prediction red"] * len(drawn))
    elif isinstance(logger, TensorBoardLogger):
        for i, picture in enumerate(drawn):  # sizes differ between images: one entry each
            logger.experiment.add_image(f"{key}/{i}", picture.float() / 255, global_step=step)

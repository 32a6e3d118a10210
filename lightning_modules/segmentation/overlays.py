"""Input / ground truth / prediction overlays for W&B and TensorBoard, for any segmentation module.

Each overlay is the input image in grey (min-max scaled per image) with the ground-truth
foreground tinted green and the predicted foreground tinted red (yellow where they agree), so a
reviewer sees misses (green), false alarms (red) and hits (yellow) at a glance.
"""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

TINT = 0.45  # weight of the colour over the grey image


def overlays(images: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` floats in [0, 1]: grey input, truth in green, prediction in red (class > 0 = foreground)."""
    grey = images.float().mean(dim=1, keepdim=True)
    low = grey.amin(dim=(2, 3), keepdim=True)
    high = grey.amax(dim=(2, 3), keepdim=True)
    rgb = ((grey - low) / (high - low).clamp_min(1e-6)).repeat(1, 3, 1, 1)
    truth, predicted = (targets > 0).unsqueeze(1).float(), (predictions > 0).unsqueeze(1).float()
    colour = torch.cat([predicted, truth, torch.zeros_like(truth)], dim=1)  # red = predicted, green = truth
    tinted = truth.bool() | predicted.bool()
    return torch.where(tinted, (1 - TINT) * rgb + TINT * colour, rgb).clamp(0, 1)


def log_overlays(logger: Logger | None, images: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor,
                 count: int, key: str, step: int) -> None:
    """Log the first ``count`` overlays to a W&B or TensorBoard logger; other loggers have no image API."""
    if logger is None or count <= 0:
        return
    batch = overlays(images[:count], targets[:count], predictions[:count]).detach().cpu()
    if isinstance(logger, WandbLogger):  # uint8: wandb.Image casts floats unscaled, [0, 1] came out black
        pictures = (batch * 255).round().to(torch.uint8)
        logger.log_image(key=key, images=list(pictures), step=step,
                         caption=["input grey, truth green, prediction red"] * len(batch))
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_images(key, batch, global_step=step)

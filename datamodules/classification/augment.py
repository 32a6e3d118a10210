"""Batched FixMatch augmentations with per-sample randomness.

Every function takes a uint8 batch ``(N, C, H, W)`` (C = 1 or 3) on any device
and returns a uint8 batch of the same shape on that device. Randomness is drawn
per sample from torch's RNG (pass a ``generator`` on the batch's device for
reproducibility), and nothing reads tensor values back to the host, so the
augmentations can run on the GPU inside a training step without synchronising.
Images stay uint8 between steps: the crop and flip copy pixels by one gather, and each RandAugment
round is rounded to whole grey levels as PIL's ops are (``randaugment_ops.py`` holds the ops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from datamodules.classification.randaugment_ops import (FIRST_GEOMETRIC, RANDAUGMENT_OPS, apply_round, as_mask, choose,
                                                           chunk_length)

__all__ = ["RANDAUGMENT_OPS", "apply_ops", "cutout", "normalize", "rand_augment", "strong_augment", "weak_augment"]


def _reflect(index: Tensor, size: int) -> Tensor:
    """Map integer coordinates onto ``[0, size)`` by mirroring without repeating the edge."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def weak_augment(
    images: Tensor, hflip: bool = True, pad_fraction: float = 0.125, generator: torch.Generator | None = None
) -> Tensor:
    """Random horizontal flip (p=0.5) and random reflect-padded translation, per sample.

    The image is padded by ``round(pad_fraction * H)`` rows and ``round(pad_fraction * W)``
    columns on each side (reflect mode) and cropped back to ``H x W`` at a random integer
    offset; pixels are copied exactly: one gather of each output pixel's source pixel, the same
    for every channel (a single index per pixel, 30x cheaper on the CPU than indexing by
    sample, channel, row and column), chunk by chunk (:func:`chunk_length`).
    """
    n, c, h, w = images.shape
    dev = images.device
    pad_h, pad_w = round(pad_fraction * h), round(pad_fraction * w)
    off_y = torch.randint(0, 2 * pad_h + 1, (n, 1), generator=generator, device=dev)
    off_x = torch.randint(0, 2 * pad_w + 1, (n, 1), generator=generator, device=dev)
    cols = torch.arange(w, device=dev).expand(n, w)
    if hflip:
        flip = torch.rand(n, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(flip, w - 1 - cols, cols)
    rows = _reflect(torch.arange(h, device=dev) + off_y - pad_h, h)  # (N, H)
    cols = _reflect(cols + off_x - pad_w, w)  # (N, W)
    flat, out = images.reshape(n, c, h * w), torch.empty((n, c, h, w), dtype=images.dtype, device=dev)
    step = chunk_length(images)
    for i in range(0, n, step):
        source = (rows[i:i + step, :, None] * w + cols[i:i + step, None, :]).view(-1, 1, h * w)
        torch.gather(flat[i:i + step], 2, source.expand(-1, c, h * w), out=out[i:i + step].view(-1, c, h * w))
    return out


def apply_ops(images: Tensor, op_ids: Tensor, magnitudes: Tensor) -> Tensor:
    """Apply to sample ``i`` the op ``RANDAUGMENT_OPS[op_ids[i]]`` at magnitude ``magnitudes[i]``.

    Magnitudes lie in [0, 1] (FixMatch ranges: enhance factor 0.05 + 0.9 m, posterize
    4 + round(4 m) bits, solarize threshold m, rotate 30 m degrees, shear 0.3 m,
    translate 0.3 m of the size); geometric ops also accept [-1, 0) for the opposite
    direction, colour ops clamp to [0, 1]. Deterministic.
    """
    return apply_round(images, op_ids, magnitudes)


def rand_augment(
    images: Tensor,
    num_ops: int = 2,
    apply_probability: float = 0.5,
    generator: torch.Generator | None = None,
    return_ops: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """FixMatch RandAugment: ``num_ops`` rounds of a random op at a random magnitude per sample.

    Each round draws per sample an op uniformly from :data:`RANDAUGMENT_OPS`, a magnitude
    uniform in [0, 1] (random sign for geometric ops) and applies it with probability
    ``apply_probability``. With ``return_ops`` also returns the ``(N, num_ops)`` op ids
    (0 = identity where the op was not applied).
    """
    n, dev = images.shape[0], images.device
    x = images
    drawn = []
    for _ in range(num_ops):
        ops = torch.randint(0, len(RANDAUGMENT_OPS), (n,), generator=generator, device=dev)
        mags = torch.rand(n, generator=generator, device=dev)
        negative = torch.rand(n, generator=generator, device=dev) < 0.5
        applied = torch.rand(n, generator=generator, device=dev) < apply_probability
        mags = torch.where(negative & (ops >= FIRST_GEOMETRIC), -mags, mags)
        ops = torch.where(applied, ops, torch.zeros_like(ops))
        x = apply_round(x, ops, mags)
        drawn.append(ops)
    if return_ops:
        ops = torch.stack(drawn, dim=1) if drawn else torch.zeros(n, 0, dtype=torch.long, device=dev)
        return x, ops
    return x


def cutout(
    images: Tensor, max_fraction: float = 0.5, fill: int = 127, generator: torch.Generator | None = None
) -> Tensor:
    """Fill a square per sample, side ``round(U(0, max_fraction) * min(H, W))`` at a uniformly
    random centre (clipped at the border), with ``fill``."""
    if not 0 <= fill <= 255:
        raise ValueError(f"cutout fill must be a grey level in 0..255 (uint8 images), got {fill}")
    n, _, h, w = images.shape
    dev = images.device
    side = torch.round(torch.rand(n, generator=generator, device=dev) * (max_fraction * min(h, w))).long()
    cy = torch.randint(0, h, (n,), generator=generator, device=dev)
    cx = torch.randint(0, w, (n,), generator=generator, device=dev)
    y0, x0 = cy - side // 2, cx - side // 2
    rows = torch.arange(h, device=dev).view(1, h)
    cols = torch.arange(w, device=dev).view(1, w)
    inside_y = (rows >= y0[:, None]) & (rows < (y0 + side)[:, None])
    inside_x = (cols >= x0[:, None]) & (cols < (x0 + side)[:, None])
    mask = (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1)  # (N, 1, H, W)
    return choose(as_mask(mask), images, fill)


def strong_augment(
    images: Tensor,
    hflip: bool = True,
    pad_fraction: float = 0.125,
    num_ops: int = 2,
    cutout_fraction: float = 0.5,
    generator: torch.Generator | None = None,
    return_ops: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """FixMatch's strong view: :func:`weak_augment`, then :func:`rand_augment`, then :func:`cutout`."""
    x = weak_augment(images, hflip=hflip, pad_fraction=pad_fraction, generator=generator)
    x, ops = rand_augment(x, num_ops=num_ops, generator=generator, return_ops=True)
    x = cutout(x, max_fraction=cutout_fraction, generator=generator)
    return (x, ops) if return_ops else x


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images / 255 - mean) / std`` per channel, float32; mean and std on the [0, 1] scale."""
    if len(mean) != images.shape[-3] or len(std) != images.shape[-3]:
        raise ValueError(f"need one mean and std per channel, got {len(mean)}, {len(std)} for {images.shape[-3]}")
    # In place on the result, chunk by chunk for a batch (temporaries at batch size cost page faults on
    # the CPU); Python scalars per channel: no host-to-device copy of a mean/std tensor.
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    step = chunk_length(images) if images.dim() == 4 and len(images) else max(len(images), 1)
    for i in range(0, max(len(images), 1), step):
        part = x[i:i + step].copy_(images[i:i + step]).div_(255.0)
        for channel, (mu, sd) in enumerate(zip(mean, std)):
            part[..., channel, :, :].sub_(mu).div_(sd)
    return x

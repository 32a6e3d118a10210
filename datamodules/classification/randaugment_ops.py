"""The RandAugment ops of :mod:`datamodules.classification.augment`, one round on a uint8 batch.

An op is chosen per sample; the round costs the same whatever the mix, with no host synchronization:

- seven ops map each grey level through a table of the sample and channel (identity, autocontrast,
  equalize, brightness, contrast, posterize, solarize): their tables (``(N, C, 256)``) are computed
  with the float formulas on the 256 levels, rounded to uint8, and applied by one gather over the batch;
- colour and sharpness blend every pixel with a grey or smoothed image: one float blend serves both;
- the geometric ops warp with one ``grid_sample`` (bilinear, grey outside the image);
- on the CPU the per-pixel float work goes through the batch in cache-sized chunks.

Each op's result equals the float formula applied to the pixels and rounded once (``tests/datamodules/
test_augment_fast.py`` compares it with the float path it replaced, bit for bit except sharpness, whose
smoothing sums exact integers instead of convolving float values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RANDAUGMENT_OPS: tuple[str, ...] = (
    "identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness",
    "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
OP = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
FIRST_GEOMETRIC = OP["rotate"]  # ops from here on are geometric and take a signed magnitude
CPU_CHUNK_PIXELS = 1 << 16


def chunk_length(images: Tensor) -> int:
    """Images per chunk for a batch ``(N, C, H, W)``: about :data:`CPU_CHUNK_PIXELS` pixels on the CPU, so a
    chunk's temporaries stay in cache and are reused instead of allocated (and faulted in) at batch size;
    the whole batch on other devices, where one launch per step matters more."""
    n, _, h, w = images.shape
    return max(1, CPU_CHUNK_PIXELS // (h * w)) if images.device.type == "cpu" else max(n, 1)


def to_float(images: Tensor) -> Tensor:
    return images.float() / 255.0


def to_uint8(x: Tensor) -> Tensor:
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, ``(N, 1, H, W)``; the image itself for one channel."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def smooth(levels: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH on [0, 1]: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13, border pixels kept.

    ``levels`` holds whole grey levels (float): the weighted sums are exact integers, divided once."""
    h, w = levels.shape[2:]
    out = levels / 255.0
    if h < 3 or w < 3:
        return out
    rows = levels[..., :, :-2] + levels[..., :, 1:-1] + levels[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    out[..., 1:-1, 1:-1] = box.add_(levels[..., 1:-1, 1:-1], alpha=4.0).div_(13.0 * 255.0)
    return out


def choose(take: Tensor, a: Tensor, b: Tensor | int) -> Tensor:
    """uint8 ``b`` where ``take`` is 255, ``a`` where it is 0: bitwise, 8 to 10 times faster than ``torch.where``
    on uint8 with a broadcast condition (CPU, torch 2.14)."""
    return a ^ ((a ^ b) & take)


def as_mask(condition: Tensor) -> Tensor:
    """A boolean condition as :func:`choose`'s uint8 mask (255 where true)."""
    return condition.to(torch.uint8) * 255


def equalize_tables(images: Tensor, codes: Tensor, top: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize`` lookup table per image and channel, ``(N, C, 256)`` float64 of whole
    levels; ``codes`` is ``images`` as ``(N * C, H * W)`` int64, ``top`` its highest level per image and
    channel. The histogram counts in int32 and the sums and quotients run in float64, exact for any image
    and several times faster on the CPU than int64 counts and integer division."""
    n, c, h, w = images.shape
    hist = torch.zeros(n * c, 256, dtype=torch.int32, device=images.device)
    hist.scatter_add_(1, codes, torch.ones(1, 1, dtype=torch.int32, device=images.device).expand_as(codes))
    hist = hist.double()
    step = torch.floor((h * w - hist.gather(1, top.reshape(n * c, 1).long())) / 255.0)
    before = hist.cumsum(dim=1) - hist
    lut = torch.floor((before + torch.floor(step / 2.0)) / step.clamp_min(1.0)).clamp_max_(255.0)
    grey = torch.arange(256, device=images.device, dtype=torch.float64)
    return torch.where(step > 0, lut, grey).view(n, c, 256)


def lookup_tables(images: Tensor, codes: Tensor, x_gray: Tensor, op_ids: Tensor, m: Tensor) -> Tensor:
    """``(N, C, 256)`` uint8: per sample and channel, the table of its op (identity for the other ops).

    The float formulas act on each value alone, so evaluating them on the 256 levels and rounding gives
    what evaluating them on the pixels gives. Autocontrast's range and contrast's mean come from the image;
    only autocontrast and equalize differ between channels."""
    n = images.shape[0]
    grey = to_float(torch.arange(256, device=images.device)).expand(n, 1, 256)
    ids = op_ids.view(n, 1, 1)
    # Brightness and contrast blend towards black or the mean grey level (PIL rounds the mean);
    # factor 1 towards black is the identity.
    mean = (x_gray.mean(dim=(1, 2, 3)) * 255.0).round().view(n, 1, 1) / 255.0
    degenerate = torch.where(ids == OP["contrast"], mean, torch.zeros_like(mean))
    enhance = (ids == OP["brightness"]) | (ids == OP["contrast"])
    factor = torch.where(enhance, (0.05 + 0.9 * m).view(n, 1, 1), torch.ones_like(mean))
    table = (degenerate + factor * (grey - degenerate)).clamp(0, 1)
    quantum = torch.exp2(4.0 - torch.round(4.0 * m)).view(n, 1, 1)
    posterized = torch.div((grey * 255.0).round(), quantum, rounding_mode="floor") * quantum / 255.0
    table = torch.where(ids == OP["posterize"], posterized, table)
    table = torch.where((ids == OP["solarize"]) & (grey >= m.view(n, 1, 1)), 1.0 - grey, table)
    table = to_uint8(table)
    lo, hi = images.amin(dim=(2, 3)).unsqueeze(-1), images.amax(dim=(2, 3)).unsqueeze(-1)
    span = to_float(hi) - to_float(lo)
    autocontrast = to_uint8(torch.where(span > 0, (grey - to_float(lo)) / span.clamp_min(1e-12), grey))
    table = choose(as_mask(ids == OP["autocontrast"]), table, autocontrast)
    return choose(as_mask(ids == OP["equalize"]), table, equalize_tables(images, codes, hi).to(torch.uint8))


def affine_coefficients(op_ids: Tensor, m: Tensor, h: int, w: int) -> tuple[Tensor, ...]:
    """Per sample ``(a, b, d, tx, ty)``, each ``(N, 1, 1)``: output pixel at centred coordinates ``p``
    (pixels, y down) samples the input at ``[[a, b], [d, a]] p + t``. Rotate turns the content
    counter-clockwise by ``30 m`` degrees, shear_x uses ``x + 0.3 m y``, shear_y ``y + 0.3 m x``,
    translate moves the content by ``0.3 m`` of the width/height towards +x/+y; other ops the identity."""
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    angle = torch.deg2rad(30.0 * m)
    rotate = op_ids == OP["rotate"]
    a = torch.where(rotate, torch.cos(angle), one)
    b = torch.where(rotate, -torch.sin(angle), torch.where(op_ids == OP["shear_x"], 0.3 * m, zero))
    d = torch.where(rotate, torch.sin(angle), torch.where(op_ids == OP["shear_y"], 0.3 * m, zero))
    tx = torch.where(op_ids == OP["translate_x"], -0.3 * w * m, zero)
    ty = torch.where(op_ids == OP["translate_y"], -0.3 * h * m, zero)
    return tuple(v.view(-1, 1, 1) for v in (a, b, d, tx, ty))


def warp(x: Tensor, a: Tensor, b: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """``x`` resampled (bilinear) at ``[[a, b], [d, a]] p + t`` about the centre; grey 0.5 outside."""
    h, w = x.shape[2:]
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2).view(1, 1, w)
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2).view(1, h, 1)
    src_x = a * xs + b * ys + tx
    src_y = d * xs + a * ys + ty
    # With align_corners=False, centred pixel coordinate u maps to normalised 2u/size. Stacked in
    # front and viewed as (N, H, W, 2): an interleaving stack costs more than the sampling.
    grid = torch.stack((2.0 * src_x / w, 2.0 * src_y / h), dim=1).permute(0, 2, 3, 1)
    out = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 0.5


def round_chunk(result: Tensor, images: Tensor, op_ids: Tensor, m: Tensor, is_color: Tensor, factor: Tensor,
                is_geometric: Tensor, pixel_op: Tensor, *coefficients: Tensor) -> None:
    """:func:`apply_round` on a few images into ``result``, given their per-sample parameters (``m`` clamped
    to [0, 1])."""
    n, c, h, w = images.shape
    codes = images.reshape(n * c, h * w).long()  # the levels as indices, for the histograms and tables
    levels = images.float()
    x = levels / 255.0
    x_gray = gray(x)
    out = lookup_tables(images, codes, x_gray, op_ids, m).reshape(n * c, 256).gather(1, codes).view(n, c, h, w)
    # Colour and sharpness: one blend, towards the grey image or the smoothed one. A 0/1 weight makes
    # lerp an exact choice; the blend needs no clamp, to_uint8 clamps.
    degenerate = torch.lerp(smooth(levels), x_gray.expand_as(x), is_color)
    pixelwise = torch.lerp(degenerate + factor * (x - degenerate), warp(x, *coefficients), is_geometric)
    torch.bitwise_xor(out, (out ^ to_uint8(pixelwise)) & pixel_op, out=result)  # choose(), written in place


def apply_round(images: Tensor, op_ids: Tensor, magnitudes: Tensor) -> Tensor:
    """Sample ``i`` through ``RANDAUGMENT_OPS[op_ids[i]]`` at ``magnitudes[i]``; uint8 in, uint8 out.

    The batch goes through in chunks (:func:`chunk_length`; 1.3 to 1.9 times faster than whole batches
    of 448 to 1024 on one CPU thread). Samples do not interact, so the result does not depend on them."""
    n, c, h, w = images.shape
    if n == 0:
        return images.clone()
    images = images.contiguous()  # channels_last or strided batches: one copy, then plain views
    op_ids = op_ids.to(images.device)
    m = magnitudes.to(device=images.device, dtype=torch.float32)
    m_colour = m.clamp(0, 1)
    ids = op_ids.view(n, 1, 1, 1)
    by_pixel = (ids == OP["color"]) | (ids == OP["sharpness"]) | (ids >= FIRST_GEOMETRIC)
    result = torch.empty_like(images)
    per_sample = (result, images, op_ids, m_colour, (ids == OP["color"]).float(),
                  (0.05 + 0.9 * m_colour).view(n, 1, 1, 1), (ids >= FIRST_GEOMETRIC).float(), as_mask(by_pixel),
                  *affine_coefficients(op_ids, m, h, w))
    chunk = chunk_length(images)
    for i in range(0, n, chunk):
        round_chunk(*(v[i:i + chunk] for v in per_sample))
    return result

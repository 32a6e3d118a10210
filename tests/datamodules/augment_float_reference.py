"""The float path of the batched augmentations as it was before the uint8 rewrite (commit c186ba3's
``datamodules/classification/augment.py``), kept as the reference the new code is compared with on the
same random draws (``test_augment_fast.py``). Every op is computed in float on [0, 1] for the whole
batch, two RandAugment rounds are chained in float and rounded once, and the weak view indexes by
sample, channel, row and column. Not used by the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RANDAUGMENT_OPS: tuple[str, ...] = (
    "identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness",
    "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
)  # fmt: skip
_OP = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
_FIRST_GEOMETRIC = _OP["rotate"]  # ops from here on are geometric and take a signed magnitude


def _to_float(images: Tensor) -> Tensor:
    return images.float() / 255.0


def _to_uint8(x: Tensor) -> Tensor:
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _reflect(index: Tensor, size: int) -> Tensor:
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def weak_augment(images, hflip=True, pad_fraction=0.125, generator=None):
    n, c, h, w = images.shape
    dev = images.device
    pad_h, pad_w = round(pad_fraction * h), round(pad_fraction * w)
    # off_y, then off_x, then the flip coin: the order the package draws them in
    off_y, off_x = (torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=dev) for pad in (pad_h, pad_w))
    cols = torch.arange(w, device=dev).expand(n, w)
    if hflip:
        flip = torch.rand(n, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(flip, w - 1 - cols, cols)
    rows = _reflect(torch.arange(h, device=dev) + off_y - pad_h, h)  # (N, H)
    cols = _reflect(cols + off_x - pad_w, w)  # (N, W)
    batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
    channel = torch.arange(c, device=dev).view(1, c, 1, 1)
    return images[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def _smooth(x: Tensor) -> Tensor:
    c, h, w = x.shape[1:]
    if h < 3 or w < 3:
        return x
    kernel = x.new_full((c, 1, 3, 3), 1.0 / 13.0)
    kernel[:, :, 1, 1].fill_(5.0 / 13.0)  # fill_ with a Python number: no host-to-device copy
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return out


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def _equalize(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    levels = (x * 255.0).round().clamp(0, 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    grey = torch.arange(256, device=x.device)
    last = (grey * (hist > 0)).amax(dim=1, keepdim=True)  # highest occupied level
    step = torch.div(h * w - hist.gather(1, last), 255, rounding_mode="floor")
    before = hist.cumsum(dim=1) - hist
    lut = torch.div(before + step // 2, step.clamp_min(1), rounding_mode="floor").clamp_max(255)
    lut = torch.where(step > 0, lut, grey.expand_as(lut))
    return (lut.gather(1, levels).float() / 255.0).reshape(n, c, h, w)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    quantum = torch.exp2(4.0 - torch.round(4.0 * m)).view(-1, 1, 1, 1)
    levels = (x * 255.0).round()
    return torch.div(levels, quantum, rounding_mode="floor") * quantum / 255.0


def _affine(x: Tensor, op_ids: Tensor, m: Tensor) -> Tensor:
    h, w = x.shape[2:]
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    angle = torch.deg2rad(30.0 * m)
    rotate = op_ids == _OP["rotate"]
    a = torch.where(rotate, torch.cos(angle), one)
    b = torch.where(rotate, -torch.sin(angle), torch.where(op_ids == _OP["shear_x"], 0.3 * m, zero))
    d = torch.where(rotate, torch.sin(angle), torch.where(op_ids == _OP["shear_y"], 0.3 * m, zero))
    tx = torch.where(op_ids == _OP["translate_x"], -0.3 * w * m, zero)
    ty = torch.where(op_ids == _OP["translate_y"], -0.3 * h * m, zero)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2).view(1, 1, w)
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2).view(1, h, 1)
    a, b, d, tx, ty = (v.view(-1, 1, 1) for v in (a, b, d, tx, ty))
    src_x = a * xs + b * ys + tx
    src_y = d * xs + a * ys + ty
    # With align_corners=False, centred pixel coordinate u maps to normalised 2u/size.
    grid = torch.stack((2.0 * src_x / w, 2.0 * src_y / h), dim=-1)
    out = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 0.5


def _apply_ops(x: Tensor, op_ids: Tensor, magnitudes: Tensor) -> Tensor:
    m = magnitudes.to(device=x.device, dtype=x.dtype)
    m_colour = m.clamp(0, 1)
    factor = 0.05 + 0.9 * m_colour
    gray = _gray(x)
    contrast_mean = (gray.mean(dim=(1, 2, 3), keepdim=True) * 255.0).round() / 255.0  # PIL rounds it
    threshold = m_colour.view(-1, 1, 1, 1)
    colour_ops = {
        "autocontrast": lambda: _autocontrast(x),
        "equalize": lambda: _equalize(x),
        "brightness": lambda: _blend(torch.zeros_like(x), x, factor),
        "color": lambda: _blend(gray.expand_as(x), x, factor),
        "contrast": lambda: _blend(contrast_mean.expand_as(x), x, factor),
        "sharpness": lambda: _blend(_smooth(x), x, factor),
        "posterize": lambda: _posterize(x, m_colour),
        "solarize": lambda: torch.where(x >= threshold, 1.0 - x, x),
    }
    ids = op_ids.to(x.device).view(-1, 1, 1, 1)
    out = x
    for name, op in colour_ops.items():
        out = torch.where(ids == _OP[name], op(), out)
    warped = _affine(x, op_ids.to(x.device), m)
    return torch.where(ids >= _FIRST_GEOMETRIC, warped, out)


def apply_ops(images: Tensor, op_ids: Tensor, magnitudes: Tensor) -> Tensor:
    return _to_uint8(_apply_ops(_to_float(images), op_ids, magnitudes))


def rand_augment(images, num_ops=2, apply_probability=0.5, generator=None, return_ops=False):
    n, dev = images.shape[0], images.device
    x = _to_float(images)
    drawn = []
    for _ in range(num_ops):
        ops = torch.randint(0, len(RANDAUGMENT_OPS), (n,), generator=generator, device=dev)
        mags = torch.rand(n, generator=generator, device=dev)
        negative = torch.rand(n, generator=generator, device=dev) < 0.5
        applied = torch.rand(n, generator=generator, device=dev) < apply_probability
        mags = torch.where(negative & (ops >= _FIRST_GEOMETRIC), -mags, mags)
        ops = torch.where(applied, ops, torch.zeros_like(ops))
        x = _apply_ops(x, ops, mags)
        drawn.append(ops)
    out = _to_uint8(x)
    if return_ops:
        ops = torch.stack(drawn, dim=1) if drawn else torch.zeros(n, 0, dtype=torch.long, device=dev)
        return out, ops
    return out


def cutout(images, max_fraction=0.5, fill=127, generator=None):
    n, _, h, w = images.shape
    dev = images.device
    side = torch.round(torch.rand(n, generator=generator, device=dev) * (max_fraction * min(h, w))).long()
    # the centre's row, then its column: the order the package draws them in
    y0, x0 = (torch.randint(0, size, (n,), generator=generator, device=dev) - side // 2 for size in (h, w))
    inside_y, inside_x = ((lo[:, None] <= torch.arange(size, device=dev))
                          & (torch.arange(size, device=dev) < (lo + side)[:, None]) for lo, size in ((y0, h), (x0, w)))
    return torch.where((inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1), fill, images)


def strong_augment(images, hflip=True, pad_fraction=0.125, num_ops=2, cutout_fraction=0.5, generator=None,
                   return_ops=False):
    x = weak_augment(images, hflip=hflip, pad_fraction=pad_fraction, generator=generator)
    x, ops = rand_augment(x, num_ops=num_ops, generator=generator, return_ops=True)
    x = cutout(x, max_fraction=cutout_fraction, generator=generator)
    return (x, ops) if return_ops else x

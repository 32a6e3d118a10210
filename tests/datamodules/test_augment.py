"""Behaviour of the batched FixMatch augmentations in datamodules/classification/augment.py.

Colour ops are checked against PIL (what the FixMatch reference implementation uses)
on real images: 8x8 grayscale scikit-learn digits and 32x32 CIFAR-10 photos.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ImageEnhance, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.functional import to_pil_image

from datamodules.classification.augment import (
    RANDAUGMENT_OPS,
    apply_ops,
    cutout,
    normalize,
    rand_augment,
    strong_augment,
    weak_augment,
)

OP = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The batches are tiny: with a busy second core, a 2-thread intra-op pool spends
    more time waiting than computing (measured 77 s vs 7 s for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    """64 scikit-learn digits as uint8 (64, 1, 8, 8), 0..16 rescaled to 0..255."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:64]).float()
    return (images * 255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)


@pytest.fixture(params=["digits", "cifar"])
def images(request) -> torch.Tensor:
    name = {"digits": "digit_images", "cifar": "cifar_images"}[request.param]
    return request.getfixturevalue(name)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_ops(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randint(0, len(RANDAUGMENT_OPS), (n,), generator=g), torch.rand(n, generator=g) * 2 - 1


def test_randaugment_ops_are_the_fixmatch_list():
    assert len(RANDAUGMENT_OPS) == 14 and len(set(RANDAUGMENT_OPS)) == 14
    assert RANDAUGMENT_OPS[0] == "identity"
    assert {"equalize", "solarize", "posterize", "shear_x", "translate_y"} <= set(RANDAUGMENT_OPS)


# --------------------------------------------------------------------------- shapes, layouts

AUGMENTS = {
    "weak": lambda x, g: weak_augment(x, generator=g),
    "rand": lambda x, g: rand_augment(x, generator=g),
    "cutout": lambda x, g: cutout(x, generator=g),
    "strong": lambda x, g: strong_augment(x, generator=g),
    "apply_ops": lambda x, g: apply_ops(x, *random_ops(x.shape[0])),
}


@pytest.mark.parametrize("name", AUGMENTS)
def test_shape_dtype_and_memory_layout(images, name):
    fn = AUGMENTS[name]
    out = fn(images, gen(0))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    # Same values stored differently give the same result with the same seed.
    channels_last = images.contiguous(memory_format=torch.channels_last)
    transposed_view = images.transpose(2, 3).contiguous().transpose(2, 3)
    assert not transposed_view.is_contiguous() and channels_last.is_contiguous(memory_format=torch.channels_last)
    for variant in (channels_last, transposed_view):
        other = fn(variant, gen(0))
        assert other.shape == images.shape and other.dtype == torch.uint8
        # Float reductions may be ordered differently; allow a rare off-by-one level.
        assert (other.int() - out.int()).abs().max() <= 1


def test_normalize(images):
    c = images.shape[1]
    mean, std = [0.4, 0.5, 0.6][:c], [0.2, 0.25, 0.5][:c]
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    expected = (images.float() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize(images.contiguous(memory_format=torch.channels_last), mean, std), expected)
    with pytest.raises(ValueError):
        normalize(images, [0.5] * (c + 1), [0.5] * (c + 1))


# --------------------------------------------------------------------------- weak view


def test_weak_identity_without_flip_or_padding(images):
    assert torch.equal(weak_augment(images, hflip=False, pad_fraction=0.0, generator=gen(0)), images)


def test_weak_flip_only(cifar_images):
    out = weak_augment(cifar_images, hflip=True, pad_fraction=0.0, generator=gen(1))
    same = (out == cifar_images).flatten(1).all(1)
    flipped = (out == cifar_images.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 <= int(same.sum()) <= 54 and 10 <= int(flipped.sum()) <= 54


def matching_offsets(out: torch.Tensor, images: torch.Tensor, pad: int) -> list[set[tuple[int, int]]]:
    """Per sample, the (dy, dx) crops of the reflect-padded input that equal the output."""
    h, w = images.shape[-2:]
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    found = []
    for x, p in zip(out.float(), padded):
        found.append({(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                      if torch.equal(p[:, dy:dy + h, dx:dx + w], x)})  # fmt: skip
    return found


def test_weak_translation_is_a_reflect_pad_crop(images):
    pad = round(0.125 * images.shape[-1])
    out = weak_augment(images, hflip=False, pad_fraction=0.125, generator=gen(2))
    offsets = matching_offsets(out, images, pad)
    assert all(offsets), "every output must be an exact crop of its reflect-padded input"
    # Offsets are drawn per sample: many different ones in one batch (not all samples alike).
    unambiguous = [next(iter(o)) for o in offsets if len(o) == 1]
    assert len(set(unambiguous)) >= min(5, (2 * pad + 1) ** 2 - 1)


def test_weak_flip_and_translation_combined(cifar_images):
    out = weak_augment(cifar_images, generator=gen(3))
    plain = matching_offsets(out, cifar_images, 4)
    mirrored = matching_offsets(out.flip(-1), cifar_images, 4)
    assert all(a or b for a, b in zip(plain, mirrored))
    assert sum(bool(b) for b in mirrored) >= 10 and sum(bool(a) for a in plain) >= 10


def test_weak_and_strong_views_differ_per_sample(cifar_images):
    weak = weak_augment(cifar_images, generator=gen(4))
    strong = strong_augment(cifar_images, generator=gen(5))

    def differs(a, b):
        return (a != b).flatten(1).any(1).float().mean().item()

    assert differs(weak, cifar_images) >= 0.9
    assert differs(strong, cifar_images) >= 0.9
    assert differs(weak, strong) >= 0.9
    # Strong changes pixels far more than weak does.
    assert (strong.float() - weak.float()).abs().mean() > 10


# --------------------------------------------------------------------------- RandAugment


def test_rand_augment_draws_ops_per_sample(cifar_images):
    out, ops = rand_augment(cifar_images, num_ops=2, apply_probability=1.0, generator=gen(6), return_ops=True)
    assert out.shape == cifar_images.shape and ops.shape == (64, 2) and ops.dtype == torch.long
    assert len(torch.unique(ops[:, 0])) >= 10 and len(torch.unique(ops[:, 1])) >= 10
    assert int(ops.min()) >= 0 and int(ops.max()) < len(RANDAUGMENT_OPS)
    _, half = rand_augment(cifar_images, num_ops=3, generator=gen(7), return_ops=True)
    identity_share = (half == 0).float().mean().item()  # 0.5 not applied + 0.5/14 identity drawn
    assert 0.35 <= identity_share <= 0.7


def test_rand_augment_never_applied_is_identity(images):
    out, ops = rand_augment(images, apply_probability=0.0, generator=gen(8), return_ops=True)
    assert torch.equal(out, images) and bool((ops == 0).all())


def test_rand_augment_determinism(cifar_images):
    a = rand_augment(cifar_images, generator=gen(9))
    assert torch.equal(a, rand_augment(cifar_images, generator=gen(9)))
    assert not torch.equal(a, rand_augment(cifar_images, generator=gen(10)))


# --------------------------------------------------------------------------- apply_ops vs PIL


def pil_reference(image: torch.Tensor, op: str, m: float) -> torch.Tensor:
    """The FixMatch op on one uint8 (C, H, W) image through PIL."""
    pil = to_pil_image(image)
    factor = 0.05 + 0.9 * m
    if op == "autocontrast":
        out = ImageOps.autocontrast(pil)
    elif op == "equalize":
        out = ImageOps.equalize(pil)
    elif op == "posterize":
        out = ImageOps.posterize(pil, 4 + round(4 * m))
    elif op == "solarize":  # x >= m on [0, 1] <=> level >= ceil(255 m)
        out = ImageOps.solarize(pil, math.ceil(255 * m))
    else:
        enhancer = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
                    "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}[op]  # fmt: skip
        out = enhancer(pil).enhance(factor)
    array = torch.from_numpy(np.array(out))
    return array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)


# PIL truncates where we round (Image.blend, autocontrast's lut) and rounds intermediate
# images (grayscale, smoothed image) to uint8, so the enhance ops and autocontrast differ
# by up to one grey level per pixel: we allow a mean absolute difference of 1 level per
# batch (measured with Pillow 13: <= 0.53, and at most 1 level for any pixel) and 2 levels
# for any single pixel. The lookup-table ops (equalize, posterize, solarize) must be exact.
TOLERANCE = {"posterize": 0.0, "solarize": 0.0, "equalize": 0.0}
COLOUR_OPS = ("autocontrast", "equalize", "brightness", "color", "contrast", "sharpness", "posterize", "solarize")


@pytest.mark.parametrize("op", COLOUR_OPS)
def test_colour_op_matches_pil(images, op):
    n = images.shape[0]
    for m in (0.0, 0.3, 0.7, 1.0):
        ours = apply_ops(images, torch.full((n,), OP[op]), torch.full((n,), m)).int()
        ref = torch.stack([pil_reference(img, op, m) for img in images]).int()
        diff = (ours - ref).abs()
        assert diff.float().mean().item() <= TOLERANCE.get(op, 1.0), (op, m)
        assert diff.max().item() <= (0 if op in TOLERANCE else 2), (op, m)


def test_ops_are_applied_per_sample(cifar_images):
    """A mixed batch equals, sample by sample, batches of a single op."""
    ops, mags = random_ops(64, seed=11)
    mixed = apply_ops(cifar_images, ops, mags)
    for k in range(len(RANDAUGMENT_OPS)):
        alone = apply_ops(cifar_images, torch.full((64,), k), mags)
        chosen = ops == k
        assert torch.equal(mixed[chosen], alone[chosen]), RANDAUGMENT_OPS[k]


# --------------------------------------------------------------------------- geometric ops


def test_geometric_identity_leaves_image_unchanged(images):
    n = images.shape[0]
    for name in ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        out = apply_ops(images, torch.full((n,), OP[name]), torch.zeros(n))
        assert (out.int() - images.int()).abs().max() <= 1, name


@pytest.mark.parametrize("axis", ["x", "y"])
def test_translate_by_whole_pixels(images, axis):
    n, _, h, w = images.shape
    size = w if axis == "x" else h
    shift = size // 8  # 0.3 m size = shift
    dim = -1 if axis == "x" else -2
    for sign in (1, -1):
        out = apply_ops(images, torch.full((n,), OP[f"translate_{axis}"]), torch.full((n,), sign * shift / (0.3 * size)))
        moved = images.narrow(dim, 0, size - shift) if sign > 0 else images.narrow(dim, shift, size - shift)
        kept = out.narrow(dim, shift, size - shift) if sign > 0 else out.narrow(dim, 0, size - shift)
        assert (kept.int() - moved.int()).abs().max() <= 1
        uncovered = out.narrow(dim, 0, shift) if sign > 0 else out.narrow(dim, size - shift, shift)
        assert bool(((uncovered.int() - 127).abs() <= 1).all()), "outside the image is grey"


def test_rotation_and_shear_direction_and_fill():
    h = w = 32
    image = torch.zeros(1, 1, h, w, dtype=torch.uint8)
    image[..., 14:18, 24:28] = 255  # a bright block right of the centre
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")

    def centroid(x):
        weight = x[0, 0].float().clamp_min(0)
        return (weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum()

    rotated = apply_ops(image, torch.tensor([OP["rotate"]]), torch.tensor([1.0]))
    # Corners come from outside the image: grey fill; the centre stays black.
    assert abs(int(rotated[0, 0, 0, 0]) - 127) <= 1 and int(rotated[0, 0, 16, 16]) == 0
    bright = rotated.clone()
    bright[bright < 200] = 0
    cy, cx = centroid(bright)
    # Counter-clockwise by 30 degrees about (15.5, 15.5): the block at radius 10 moves up.
    assert abs(cy - (15.5 - 10 * math.sin(math.pi / 6))) < 1 and abs(cx - (15.5 + 10 * math.cos(math.pi / 6))) < 1
    rotated_back = apply_ops(image, torch.tensor([OP["rotate"]]), torch.tensor([-1.0]))
    bright = rotated_back.clone()
    bright[bright < 200] = 0
    assert centroid(bright)[0] > 15.5 + 4

    sheared = apply_ops(image, torch.tensor([OP["shear_y"]]), torch.tensor([1.0]))
    bright = sheared.clone()
    bright[bright < 200] = 0
    # Output (x, y) samples input (x, y + 0.3 x): content at x = +10 moves up by 3 pixels.
    assert abs(centroid(bright)[0] - (15.5 - 3)) < 0.5


# --------------------------------------------------------------------------- cutout


def test_cutout_fills_a_square(cifar_images):
    images = torch.where(cifar_images == 127, 128, cifar_images)  # so only cutout writes 127
    out = cutout(images, max_fraction=0.5, fill=127, generator=gen(12))
    sides = []
    for x in out:
        filled = (x == 127).all(0)
        rows, cols = filled.any(1).nonzero().flatten(), filled.any(0).nonzero().flatten()
        if len(rows) == 0:
            sides.append(0)
            continue
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert bool(filled[top:bottom, left:right].all()) and int(filled.sum()) == (bottom - top) * (right - left)
        height, width = int(bottom - top), int(right - left)
        assert max(height, width) <= 16
        if 0 < top and bottom < 32 and 0 < left and right < 32:  # not clipped: a square
            assert height == width
        sides.append(max(height, width))
    # Changed pixels are exactly the filled region, in every channel.
    assert torch.equal((out != images).any(1), (out == 127).all(1))
    assert len(set(sides)) >= 6


def test_cutout_zero_fraction_is_identity(images):
    assert torch.equal(cutout(images, max_fraction=0.0, generator=gen(13)), images)


# --------------------------------------------------------------------------- reproducibility, devices


def test_strong_augment_determinism(images):
    a, ops_a = strong_augment(images, generator=gen(14), return_ops=True)
    b, ops_b = strong_augment(images, generator=gen(14), return_ops=True)
    assert torch.equal(a, b) and torch.equal(ops_a, ops_b)
    assert not torch.equal(a, strong_augment(images, generator=gen(15)))
    assert torch.equal(weak_augment(images, generator=gen(16)), weak_augment(images, generator=gen(16)))


class RecordOps(TorchDispatchMode):
    """Records the aten ops that would read device values back to the host."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "is_nonzero", "equal", "lift_fresh"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            # lift_fresh: a tensor made from Python data (torch.tensor, x[i] = 1.0): a host-to-device copy.
            self.bad.append(name)
        if name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.bad.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_ops_on_cpu(images):
    """CPU stand-in for the CUDA check below: no op that needs the values on the host."""
    mean, std = [0.5] * images.shape[1], [0.25] * images.shape[1]
    ops, mags = random_ops(images.shape[0])
    with RecordOps() as recorder:
        strong_augment(images, generator=gen(18), return_ops=True)
        apply_ops(images, ops, mags)
        normalize(images, mean, std)
    assert recorder.bad == []
    with RecordOps() as recorder:  # the recorder does see them
        images[images > 3].sum().item()
    assert "_local_scalar_dense" in recorder.bad and "index with a boolean mask" in recorder.bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_no_host_sync_on_cuda(cifar_images):
    images = cifar_images.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    strong_augment(images, generator=g)  # warm up lazy CUDA/cuDNN initialisation
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, ops = strong_augment(images, generator=g, return_ops=True)
        weak = weak_augment(images, generator=g)
        applied = apply_ops(images, ops[:, 0], torch.rand(64, generator=g, device="cuda"))
        normalized = normalize(out, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert out.is_cuda and weak.is_cuda and applied.is_cuda and normalized.is_cuda
    # Same per-sample ops give the same colour results on the GPU as on the CPU.
    cpu_ops, cpu_mags = random_ops(64, seed=17)
    on_gpu = apply_ops(images, cpu_ops.cuda(), cpu_mags.cuda()).cpu()
    assert (on_gpu.int() - apply_ops(cifar_images, cpu_ops, cpu_mags).int()).abs().float().mean() < 0.05

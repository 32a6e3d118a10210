"""Segmentation losses against their formulas on hand-checked tensors and against smp's losses on the
real membrane masks, and the dataset-level metrics against a confusion matrix computed here with
plain torch."""

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import sigmoid_focal_loss

from lightning_modules.segmentation.losses import (
    LOSSES, SegmentationLoss, deep_supervision_loss, dice_loss, focal_loss, iou_loss, ms_ssim, ms_ssim_loss,
)  # fmt: skip
from lightning_modules.segmentation.metrics import SegmentationMetrics


def _masks() -> torch.Tensor:
    """Two 32x32 masks with a rectangle of class 1 and one of class 2."""
    t = torch.zeros(2, 32, 32, dtype=torch.long)
    t[0, 4:20, 3:25] = 1
    t[1, 10:30, 12:28] = 1
    t[:, 22:30, 2:10] = 2
    return t


def _predictions(num_classes: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Targets and logits (+-20) that are perfect, wrong on the right half, and wrong everywhere."""
    t = _masks() if num_classes > 1 else (_masks() == 1).long()
    channels = max(num_classes, 2)
    one_hot = F.one_hot(t, channels).permute(0, 3, 1, 2).float()
    wrong = torch.roll(one_hot, 1, dims=1)  # every pixel gets another class
    if num_classes == 1:
        one_hot, wrong = one_hot[:, 1:], wrong[:, 1:]
    perfect, all_wrong = 40 * one_hot - 20, 40 * wrong - 20
    half = perfect.clone()
    half[..., 16:] = all_wrong[..., 16:]
    return t, [perfect, half, all_wrong]


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_vanish_for_a_perfect_prediction_and_grow_with_errors(name, num_classes):
    targets, (perfect, half, wrong) = _predictions(num_classes)
    loss = LOSSES[name]()
    values = [float(loss(x, targets)) for x in (perfect, half, wrong)]
    assert values[0] < 1e-3, values
    assert values[0] < values[1] < values[2], values
    logits = half.clone().requires_grad_()
    loss(logits * 0.1, targets).backward()  # soft logits: gradients everywhere
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_and_iou_by_hand_on_2x2():
    p = torch.tensor([[0.9, 0.2], [0.6, 0.1]])
    targets = torch.tensor([[[1, 0], [1, 0]]])
    binary = torch.logit(p).view(1, 1, 2, 2)
    # sum p t = 1.5, sum p = 1.8, sum t = 2
    assert math.isclose(dice_loss(binary, targets, smooth=1.0), 1 - 4 / 4.8, rel_tol=1e-5)
    assert math.isclose(iou_loss(binary, targets, smooth=1.0), 1 - 2.5 / 3.3, rel_tol=1e-5)
    assert math.isclose(dice_loss(binary, targets, smooth=0.0), 1 - 3 / 3.8, rel_tol=1e-5)
    assert math.isclose(iou_loss(binary, targets, smooth=0.0), 1 - 1.5 / 2.3, rel_tol=1e-5)
    # the same probabilities as two softmax channels: background is averaged in
    two = torch.stack([torch.zeros(2, 2), torch.logit(p)]).unsqueeze(0)
    dice_background = 2 * 1.7 / (2.2 + 2)  # p0 = 0.1 0.8 0.4 0.9, t0 = 0 1 0 1
    iou_background = 1.7 / (2.2 + 2 - 1.7)
    assert math.isclose(dice_loss(two, targets, smooth=0.0), 1 - (dice_background + 3 / 3.8) / 2, rel_tol=1e-5)
    assert math.isclose(iou_loss(two, targets, smooth=0.0), 1 - (iou_background + 1.5 / 2.3) / 2, rel_tol=1e-5)


def test_focal_formula_and_cross_entropy_at_gamma_zero():
    targets, (_, half, _) = _predictions(3)
    logits = half * 0.05 + torch.randn_like(half)
    assert torch.allclose(focal_loss(logits, targets, gamma=0.0), F.cross_entropy(logits, targets), atol=1e-6)
    binary = logits[:, :1]
    fg = (targets == 1).long()
    bce = F.binary_cross_entropy_with_logits(binary[:, 0], fg.float())
    assert torch.allclose(focal_loss(binary, fg, gamma=0.0), bce, atol=1e-6)
    one = torch.logit(torch.tensor([0.9, 0.2])).view(1, 1, 1, 2)
    t = torch.tensor([[[1, 1]]])
    by_hand = (-(0.1**2) * math.log(0.9) * 0.25 - (0.8**2) * math.log(0.2) * 0.25) / 2
    assert math.isclose(focal_loss(one, t, gamma=2.0, alpha=0.25), by_hand, rel_tol=1e-5)
    with pytest.raises(ValueError, match="float alpha is for binary"):
        focal_loss(logits, targets, alpha=0.25)


def test_ms_ssim_properties_and_small_images():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2, 3), atol=1e-5)
    noisy = [ms_ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1)).mean() for s in (0.05, 0.2, 0.5)]
    assert noisy[0] > noisy[1] > noisy[2]
    assert torch.allclose(ms_ssim(x, 1 - x).clamp_max(1), ms_ssim(1 - x, x), atol=1e-6)
    # anti-correlated maps: clamped, never NaN; sizes below the window get one shrunk window
    for size in (64, 16, 8, 3):
        y = torch.rand(1, 1, size, size, requires_grad=True)
        value = ms_ssim(y, 1 - y.detach())
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(y.grad).all() and 0 < value.item() < 0.5
    targets, (perfect, _, _) = _predictions(1)
    assert ms_ssim_loss(perfect[..., :8, :8], targets[..., :8, :8]) < 1e-3


def test_combined_and_deep_supervision_losses():
    targets, (_, half, _) = _predictions(3)
    logits = half * 0.1
    combined = SegmentationLoss({"ce": 0.5, "dice": 2.0})
    expected = 0.5 * F.cross_entropy(logits, targets) + 2.0 * dice_loss(logits, targets)
    assert torch.allclose(combined(logits, targets), expected)
    assert set(combined.terms(logits, targets)) == {"ce", "dice"}
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['lovasz'\]: choose from"):
        SegmentationLoss({"ce": 1.0, "lovasz": 1.0})
    small = F.avg_pool2d(logits, 2)
    upsampled = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    value = deep_supervision_loss([logits, small], targets, F.cross_entropy, weights=[3.0, 1.0])
    assert torch.allclose(value, (3 * F.cross_entropy(logits, targets) + F.cross_entropy(upsampled, targets)) / 4)
    assert torch.allclose(deep_supervision_loss([logits, logits], targets, dice_loss), dice_loss(logits, targets))


@pytest.fixture(scope="module")
def membrane(shared_data):
    """Four real membrane slices: binary logits from the grey level (membranes are dark), the same
    probabilities as two softmax logits, and the cell masks, (4, 512, 512)."""
    root = shared_data / "membrane"
    if not (root / "label").is_dir():
        pytest.skip(f"{root} not found")
    grey, label = (torch.from_numpy(np.stack([np.asarray(Image.open(root / kind / f"{i}.png").convert("L"))
                                              for i in range(4)])) for kind in ("image", "label"))
    grey, targets = grey.double() / 255, (label > 127).long()
    binary = (8 * (grey - 0.5)).unsqueeze(1)
    return binary, torch.cat([-binary, binary], dim=1) / 2, targets


@pytest.mark.parametrize("smooth", [1.0, 0.0])
def test_dice_iou_and_binary_focal_equal_smp_on_membrane_masks(membrane, smooth):
    """Ours (float32) against smp's classes in float64. smp's Dice smooths numerator and denominator
    by the same s (``(I + s) / ((P + T) / 2 + s)``), so our ``smooth`` is smp's ``2 * smooth``."""
    binary, two, targets = membrane
    for logits, mode in ((binary, "binary"), (two, "multiclass")):
        dice = smp.losses.DiceLoss(mode, smooth=smooth / 2)(logits, targets)
        jaccard = smp.losses.JaccardLoss(mode, smooth=smooth)(logits, targets)
        assert dice_loss(logits.float(), targets, smooth) == pytest.approx(float(dice), abs=2e-6)
        assert LOSSES["dice"](smooth=smooth)(logits.float(), targets) == pytest.approx(float(dice), abs=2e-6)
        assert iou_loss(logits.float(), targets, smooth) == pytest.approx(float(jaccard), abs=2e-6)
        assert LOSSES["iou"](smooth=smooth)(logits.float(), targets) == pytest.approx(float(jaccard), abs=2e-6)
        # per image: smp has no such reduction; the mean of smp on one-image batches (all slices hold both classes)
        per_image = torch.stack([smp.losses.JaccardLoss(mode, smooth=smooth)(logits[i:i + 1], targets[i:i + 1])
                                 for i in range(len(targets))]).mean()
        assert iou_loss(logits.float(), targets, smooth, per_image=True) == pytest.approx(float(per_image), abs=2e-6)
    for alpha in (None, 0.25):
        reference = smp.losses.FocalLoss("binary", alpha=alpha, gamma=2.0)(binary, targets)
        assert focal_loss(binary.float(), targets, 2.0, alpha) == pytest.approx(float(reference), rel=1e-5)
        assert LOSSES["focal"](alpha=alpha)(binary.float(), targets) == pytest.approx(float(reference), rel=1e-5)


def test_where_smp_differs_absent_classes_and_multiclass_focal(membrane):
    """The two definitions we keep (docs/segmentation.md): smp zeroes Dice and IoU for a class with no
    true pixel, so a slice without foreground gets no loss for the foreground it predicts, where ours
    gives ``P / (P + s)`` and a gradient that lowers it; smp's multiclass focal is a one-vs-rest
    sigmoid focal per channel, ours the softmax one (cross-entropy at gamma 0, like the binary case)."""
    binary, two, targets = membrane
    empty = torch.zeros_like(targets)
    for loss, reference in ((dice_loss, smp.losses.DiceLoss("binary", smooth=0.5)),
                            (iou_loss, smp.losses.JaccardLoss("binary", smooth=1.0))):
        logits = binary.float().requires_grad_()
        assert reference(logits, empty).item() == 0.0
        foreground = torch.sigmoid(logits).sum().detach()
        ours = loss(logits, empty)
        assert ours.item() == pytest.approx(float(foreground / (foreground + 1)), rel=1e-5)
        ours.backward()
        assert (logits.grad > 0).all()  # gradient descent lowers every foreground logit
    focal_two = focal_loss(two.float(), targets)
    assert float(focal_two) == pytest.approx(float(focal_loss(binary.float(), targets)), rel=1e-5)
    one_vs_rest = torch.stack([sigmoid_focal_loss(two[:, c], (targets == c).double(), alpha=-1, reduction="mean")
                               for c in range(2)]).mean()
    assert float(smp.losses.FocalLoss("multiclass")(two, targets)) == pytest.approx(float(one_vs_rest), rel=1e-9)
    assert abs(float(focal_two) - float(one_vs_rest)) > 0.05


# --- metrics ------------------------------------------------------------------------------------
def _confusion(preds: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(targets.flatten() * k + preds.flatten(), minlength=k * k).view(k, k).double()


def test_metrics_equal_the_confusion_matrix_values():
    targets = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 2, 0]],
                            [[0, 1, 1, 1], [0, 0, 1, 2], [0, 0, 2, 2], [0, 0, 0, 0]]])
    preds = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 1], [2, 0, 1, 2], [2, 2, 0, 0]],
                          [[1, 1, 1, 0], [2, 0, 2, 2], [1, 1, 2, 2], [0, 2, 0, 1]]])
    m = _confusion(preds, targets, 3)
    tp = m.diag()
    rows, cols = m.sum(1), m.sum(0)
    iou = tp / (rows + cols - tp)
    expected = {
        "miou": iou.mean(), "fwiou": (rows / m.sum() * iou).sum(), "pixel_acc": tp.sum() / m.sum(),
        "recall": (tp / rows).mean(), "dice": (2 * tp / (rows + cols)).mean(),
        **{f"iou_class{c}": iou[c] for c in range(3)},
    }
    metrics = SegmentationMetrics(3)
    metrics.update(preds[:1], targets[:1])  # two updates: counts accumulate over the whole set
    metrics.update(preds[1:], targets[1:])
    result = metrics.compute()
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert torch.isclose(result[name].double(), value, atol=1e-6), name
    # dataset-level, not the mean of per-image mIoU
    per_image = []
    for i in range(2):
        single = SegmentationMetrics(3)
        single.update(preds[i:i + 1], targets[i:i + 1])
        per_image.append(single.compute()["miou"])
    assert abs(float(sum(per_image) / 2) - float(result["miou"])) > 1e-3


def test_binary_metrics_report_the_foreground():
    targets = torch.tensor([[[0, 1, 1, 0], [0, 1, 1, 0]]])
    preds = torch.tensor([[[0, 1, 0, 0], [1, 1, 1, 0]]])
    m = _confusion(preds, targets, 2)
    metrics = SegmentationMetrics(1)
    metrics.update(preds, targets)
    result = metrics.compute()
    tp, fp, fn = m[1, 1], m[0, 1], m[1, 0]
    assert torch.isclose(result["fg_dice"].double(), 2 * tp / (2 * tp + fp + fn))
    assert torch.isclose(result["fg_iou"].double(), tp / (tp + fp + fn))
    assert set(result) >= {"iou_class0", "iou_class1", "miou", "dice"}

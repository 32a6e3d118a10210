"""CPS (cross pseudo supervision) on the ISBI membrane slices.

The references follow the authors' training loop, charlesCXK/TorchSemiSeg (commit 5e0c29c)
``exp.voc/voc8.res50v3+.CPS/train.py``: lines 185-194 (the CPS loss on labeled and unlabeled
predictions concatenated, ``torch.max`` pseudo-labels, mean cross-entropy, times ``cps_weight``) and
197-220 (each branch's supervised CE, ``loss = loss_sup + loss_sup_r + cps_loss``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import SegmentationFolders
from lightning_modules import CPS
from lightning_modules.segmentation.cps import box_masks, cross_pseudo_supervision_loss
from tests.ssl_helpers import make_trainer
from train import cli_main

REPO = Path(__file__).resolve().parents[3]
SMALL = dict(network="Unet", network_kwargs={"encoder_name": "resnet18"}, log_images=0)


@pytest.fixture()
def membrane(shared_data) -> Path:
    return shared_data / "membrane"


def one_batch(model: CPS, root: Path) -> dict:
    dm = SegmentationFolders(root=str(root), num_labeled=6, num_test=2, crop_size=64, batch_size=2, uratio=1,
                             steps_per_epoch=2, unlabeled_views=list(model.unlabeled_views))
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    return dm.on_after_batch_transfer(raw, 0)


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """nn.CrossEntropyLoss(reduction="mean") in plain arithmetic: -log softmax at the label, mean over pixels."""
    log_probs = logits - logits.exp().sum(dim=1, keepdim=True).log()
    return -log_probs.gather(1, labels.unsqueeze(1)).mean()


def test_cps_matches_reference_on_fixed_logits():
    torch.manual_seed(0)
    pred_l = torch.randn(3, 4, 5, 6, requires_grad=True)  # (N, C, H, W), the two branches' logits
    pred_r = torch.randn(3, 4, 5, 6, requires_grad=True)
    _, max_l = torch.max(pred_l.detach(), dim=1)  # train.py lines 187-190
    _, max_r = torch.max(pred_r.detach(), dim=1)
    expected = mean_cross_entropy(pred_l, max_r) + mean_cross_entropy(pred_r, max_l)  # line 191
    loss = cross_pseudo_supervision_loss(pred_l, pred_r)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # d/d pred_l of the mean CE against the constant max_r: (softmax - one-hot) / pixels; nothing through max_l
    pixels = 3 * 5 * 6
    one_hot_r = torch.zeros_like(pred_l).scatter_(1, max_r.unsqueeze(1), 1.0)
    torch.testing.assert_close(pred_l.grad, (pred_l.detach().softmax(dim=1) - one_hot_r) / pixels)
    one_hot_l = torch.zeros_like(pred_r).scatter_(1, max_l.unsqueeze(1), 1.0)
    torch.testing.assert_close(pred_r.grad, (pred_r.detach().softmax(dim=1) - one_hot_l) / pixels)


def test_cps_matches_reference_training_loss(membrane):
    """The module's total loss is the authors' ``loss_sup + loss_sup_r + cps_weight * cps_loss`` (line 220),
    with their CE as the labeled loss and the CPS term over labeled and unlabeled images together."""
    torch.manual_seed(0)
    model = CPS(loss_terms={"ce": 1.0}, **SMALL)
    assert model.hparams.unlabeled_loss_weight == 1.5 and model.hparams.ema_decay is None  # config.py line 74
    batch = one_batch(model, membrane)
    images, gts = batch["labeled"]["image"], batch["labeled"]["target"]
    model.train()  # one forward per network over labeled and unlabeled images, BatchNorm on their batch
    losses = model.compute_losses(batch)
    with torch.no_grad():
        both = torch.cat([images, batch["unlabeled"]["weak"]])
        pred_l, pred_r = model.net(both), model.second_net(both)
        _, max_l = torch.max(pred_l, dim=1)
        _, max_r = torch.max(pred_r, dim=1)
        cps_loss = (mean_cross_entropy(pred_l, max_r) + mean_cross_entropy(pred_r, max_l)) * 1.5
        loss_sup = mean_cross_entropy(pred_l[: len(gts)], gts)
        loss_sup_r = mean_cross_entropy(pred_r[: len(gts)], gts)
        expected = loss_sup + loss_sup_r + cps_loss
    torch.testing.assert_close(losses["labeled_loss_first"], loss_sup)
    torch.testing.assert_close(losses["labeled_loss_second"], loss_sup_r)
    torch.testing.assert_close(model.total_loss(losses).detach(), expected)
    agreement = (max_l == max_r).float().mean()
    torch.testing.assert_close(losses["pseudo_label_agreement"], agreement)


def test_cps_pseudo_labels_carry_no_gradient(membrane):
    """Each network learns from the CPS term only through its own prediction: the first network's gradient of
    the term equals that of CE(p_1, argmax p_2) with the second network's argmax as a constant."""
    torch.manual_seed(0)
    model = CPS(**SMALL)
    batch = one_batch(model, membrane)
    model.train()
    model.compute_losses(batch)["unlabeled_loss"].backward()
    cps_grads = [p.grad.clone() for p in model.net.parameters()]
    model.zero_grad()
    both = torch.cat([batch["labeled"]["image"], batch["unlabeled"]["weak"]])
    with torch.no_grad():
        target = model.second_net(both).argmax(dim=1)
    mean_cross_entropy(model.net(both), target).backward()
    for cps_grad, p in zip(cps_grads, model.net.parameters()):
        torch.testing.assert_close(cps_grad, p.grad)


class RecordGradients(L.Callback):
    """Gradient norm of each network at every optimizer step of the real training step."""

    def __init__(self) -> None:
        self.norms: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = lambda net: sum(p.grad.norm() ** 2 for p in net.parameters() if p.grad is not None) ** 0.5  # noqa: E731
        self.norms.append((float(norm(pl_module.net)), float(norm(pl_module.second_net))))


@pytest.mark.parametrize("cutmix", [False, True])
def test_cps_trains_both_differently_initialized_networks(membrane, cutmix, one_thread):
    torch.manual_seed(0)
    model = CPS(cutmix=cutmix, **SMALL)
    first, second = (torch.nn.utils.parameters_to_vector(n.parameters()).detach().clone()
                     for n in (model.net, model.second_net))
    assert not torch.equal(first, second)  # two initializations
    record = RecordGradients()
    dm = SegmentationFolders(root=str(membrane), num_labeled=6, num_test=2, crop_size=64, batch_size=2, uratio=1,
                             steps_per_epoch=2)
    trainer = make_trainer(max_steps=2, limit_test_batches=1, callbacks=[record])
    trainer.fit(model, dm)
    assert len(record.norms) == 2 and all(a > 0 and b > 0 for a, b in record.norms)
    assert not torch.equal(torch.nn.utils.parameters_to_vector(model.second_net.parameters()), second)
    assert not torch.equal(torch.nn.utils.parameters_to_vector(model.net.parameters()), first)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in model.second_net.parameters()} <= optimized
    assert model.eval_net is model.net  # no EMA by default: the first network's raw weights are evaluated


def test_cps_fits_tests_and_predicts_from_the_cli(membrane, tmp_path, one_thread):
    quick = ["--config", str(REPO / "configs" / "cps_membrane.yaml"), "--data.root", str(membrane),
             "--data.num_test", "2", "--data.crop_size", "64", "--data.batch_size", "2",
             "--data.steps_per_epoch", "2", "--model.network_kwargs", "{encoder_name: resnet18}",
             "--model.log_images", "0", "--trainer.default_root_dir", str(tmp_path),
             "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
             "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false"]
    cli = cli_main(["fit", *quick, "--trainer.max_epochs", "1"])
    assert type(cli.model) is CPS and cli.model.hparams.unlabeled_loss_weight == 1.5
    fitted = float(cli.trainer.callback_metrics["test/miou"])
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(k.startswith("second_net.") for k in state) and any(k.startswith("net.") for k in state)
    cli = cli_main(["test", *quick, "--ckpt_path", str(ckpt)])
    assert float(cli.trainer.callback_metrics["test/miou"]) == pytest.approx(fitted)  # the same first network
    cli = cli_main(["predict", *quick, "--ckpt_path", str(ckpt)])
    predictions = cli.trainer.predict_loop.predictions
    assert predictions and all(p["probs"].shape[1:] == (2, 512, 512) for p in predictions)


# --- CPS + CutMix: TorchSemiSeg exp.voc/voc8.res50v3+.CPS+CutMix (commit 5e0c29c) ---------------------------
class Draws:
    """A stand-in for the numpy RandomState the authors' mask generator takes: ``uniform`` returns our draws."""

    def __init__(self, *uniforms: np.ndarray) -> None:
        self.uniforms = list(uniforms)

    def uniform(self, low=0.0, high=1.0, size=None) -> np.ndarray:
        u = self.uniforms.pop(0)
        assert u.shape == tuple(size)
        return low + (high - low) * u


def authors_box_masks(draws: torch.Tensor, prop_range=(0.25, 0.5), mask_shape=(64, 64)) -> torch.Tensor:
    """mask_gen.py ``BoxMaskGenerator.generate_params`` lines 49-92 with the CPS+CutMix settings (config.py lines
    75-80: n_boxes 3, random aspect ratio, proportion by area, within bounds, inverted), fed ``draws``."""
    d = draws.numpy()
    rng = Draws(d[..., 0], d[..., 1], d[..., 2:])
    n_masks, n_boxes = d.shape[:2]
    mask_props = rng.uniform(prop_range[0], prop_range[1], size=(n_masks, n_boxes))
    y_props = np.exp(rng.uniform(low=0.0, high=1.0, size=(n_masks, n_boxes)) * np.log(mask_props))
    x_props = mask_props / y_props
    fac = np.sqrt(1.0 / n_boxes)
    y_props *= fac
    x_props *= fac
    sizes = np.round(np.stack([y_props, x_props], axis=2) * np.array(mask_shape)[None, None, :])
    positions = np.round((np.array(mask_shape) - sizes) * rng.uniform(low=0.0, high=1.0, size=sizes.shape))
    rectangles = np.append(positions, positions + sizes, axis=2)
    masks = np.zeros((n_masks, 1) + mask_shape)
    for i, sample_rectangles in enumerate(rectangles):
        for y0, x0, y1, x1 in sample_rectangles:
            masks[i, 0, int(y0):int(y1), int(x0):int(x1)] = 1 - masks[i, 0, int(y0):int(y1), int(x0):int(x1)]
    return torch.from_numpy(masks).float()


def test_cps_box_masks_match_reference():
    torch.manual_seed(0)
    draws = torch.rand(64, 3, 4, dtype=torch.float64)
    masks = box_masks(draws, (0.25, 0.5), (64, 64))
    torch.testing.assert_close(masks, authors_box_masks(draws), rtol=0, atol=0)
    assert 0.05 < float(masks.mean()) < 0.5  # boxes of 25-50 % of the area in all, overlaps cancelling


def test_cps_cutmix_matches_reference_training_loss(membrane):
    """train.py lines 206-250: pseudo-labels from the unmixed images' predictions mixed by the mask, CPS on the
    mixed images only, ``loss_sup + loss_sup_r + cps_weight * cps_loss``; the partner image is the batch rolled."""
    torch.manual_seed(0)
    model = CPS(loss_terms={"ce": 1.0}, cutmix=True, **SMALL)
    batch = one_batch(model, membrane)
    imgs, gts, unsup_imgs_0 = batch["labeled"]["image"], batch["labeled"]["target"], batch["unlabeled"]["weak"]
    model.train()
    torch.manual_seed(7)
    losses = model.compute_losses(batch)
    torch.manual_seed(7)
    batch_mix_masks = authors_box_masks(torch.rand(len(unsup_imgs_0), 3, 4, dtype=torch.float64))
    unsup_imgs_1 = unsup_imgs_0.roll(1, dims=0)
    with torch.no_grad():
        unsup_imgs_mixed = unsup_imgs_0 * (1 - batch_mix_masks) + unsup_imgs_1 * batch_mix_masks
        pseudo = []
        for net in (model.net, model.second_net):
            logits_u0, logits_u1 = net(unsup_imgs_0), net(unsup_imgs_1)
            _, ps_label = torch.max(logits_u0 * (1 - batch_mix_masks) + logits_u1 * batch_mix_masks, dim=1)
            pseudo.append(ps_label)
        student_1 = model.net(torch.cat([imgs, unsup_imgs_mixed]))
        student_2 = model.second_net(torch.cat([imgs, unsup_imgs_mixed]))
        n = len(gts)
        cps_loss = (mean_cross_entropy(student_1[n:], pseudo[1]) + mean_cross_entropy(student_2[n:], pseudo[0])) * 1.5
        expected = mean_cross_entropy(student_1[:n], gts) + mean_cross_entropy(student_2[:n], gts) + cps_loss
    assert 0 < float(batch_mix_masks.mean()) < 1
    torch.testing.assert_close(model.total_loss(losses).detach(), expected)
    agreement = (pseudo[0] == pseudo[1]).float().mean()
    torch.testing.assert_close(losses["pseudo_label_agreement"], agreement)

"""UniMatch on the ISBI membrane slices.

The references follow the authors' code, LiheYoung/UniMatch (commit 0324f3d): ``unimatch.py`` lines 135-188
(the step: the partner batch's eval-mode pseudo-labels, CutMix of the strong views and of their pseudo-labels,
the masked CE of each stream divided by the valid pixels, ``(loss_x + 0.25 loss_u_s1 + 0.25 loss_u_s2 +
0.5 loss_u_w_fp) / 2``), ``model/semseg/deeplabv3plus.py`` lines 41-50 and ``more-scenarios/medical/model/unet.py``
lines 168-173 (the decoder on ``cat(f, nn.Dropout2d(0.5)(f))``), ``dataset/transform.py`` lines 66-84
(``obtain_cutmix_box``) and ``dataset/semi.py`` lines 49-71 (two strong views, each with its own draws).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datamodules import SegmentationFolders
from lightning_modules import UniMatch
from lightning_modules.segmentation.unimatch import cutmix_box, unimatch_losses
from train import cli_main

REPO = Path(__file__).resolve().parents[3]
SMALL = dict(network="Unet", network_kwargs={"encoder_name": "resnet18"}, log_images=0)


@pytest.fixture()
def membrane(shared_data) -> Path:
    return shared_data / "membrane"


def one_batch(model: UniMatch, root: Path, crop: int = 64, **data) -> dict:
    dm = SegmentationFolders(root=str(root), num_labeled=6, num_test=2, crop_size=crop, batch_size=2, uratio=1,
                             steps_per_epoch=2, unlabeled_views=list(model.unlabeled_views), **data)
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    return dm.on_after_batch_transfer(raw, 0)


def authors_step_losses(pred_x, mask_x, pred_u_w, pred_u_w_fp, pred_u_s1, pred_u_s2, pred_u_w_mix,
                        cutmix_box1, cutmix_box2, conf_thresh):
    """unimatch.py lines 138-140 and 157-188, with ``ignore_mask`` all 0 (no padding) and their in-place masking."""
    criterion_l, criterion_u = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none")
    ignore_mask = ignore_mask_mix = torch.zeros_like(mask_x[:1]).expand(len(pred_u_w), *mask_x.shape[1:])
    conf_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)[0]
    mask_u_w_mix = pred_u_w_mix.argmax(dim=1)
    pred_u_w = pred_u_w.detach()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
    mask1, conf1, ignore1 = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
    mask2, conf2, ignore2 = mask_u_w.clone(), conf_u_w.clone(), ignore_mask.clone()
    mask1[cutmix_box1 == 1] = mask_u_w_mix[cutmix_box1 == 1]
    conf1[cutmix_box1 == 1] = conf_u_w_mix[cutmix_box1 == 1]
    ignore1[cutmix_box1 == 1] = ignore_mask_mix[cutmix_box1 == 1]
    mask2[cutmix_box2 == 1] = mask_u_w_mix[cutmix_box2 == 1]
    conf2[cutmix_box2 == 1] = conf_u_w_mix[cutmix_box2 == 1]
    ignore2[cutmix_box2 == 1] = ignore_mask_mix[cutmix_box2 == 1]
    loss_x = criterion_l(pred_x, mask_x)
    loss_u_s1 = criterion_u(pred_u_s1, mask1) * ((conf1 >= conf_thresh) & (ignore1 != 255))
    loss_u_s1 = loss_u_s1.sum() / (ignore1 != 255).sum().item()
    loss_u_s2 = criterion_u(pred_u_s2, mask2) * ((conf2 >= conf_thresh) & (ignore2 != 255))
    loss_u_s2 = loss_u_s2.sum() / (ignore2 != 255).sum().item()
    loss_u_w_fp = criterion_u(pred_u_w_fp, mask_u_w) * ((conf_u_w >= conf_thresh) & (ignore_mask != 255))
    loss_u_w_fp = loss_u_w_fp.sum() / (ignore_mask != 255).sum().item()
    loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0
    mask_ratio = ((conf_u_w >= conf_thresh) & (ignore_mask != 255)).sum().item() / (ignore_mask != 255).sum()
    return {"loss_x": loss_x, "loss_strong1": loss_u_s1, "loss_strong2": loss_u_s2, "loss_fp": loss_u_w_fp,
            "loss": loss, "mask_ratio": mask_ratio}


def authors_cutmix_box(img_size, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3):
    """transform.py lines 66-84, with ``random.random``/``np.random.uniform``/``np.random.randint`` drawn from torch."""
    uniform = lambda low, high: low + (high - low) * float(torch.rand((), dtype=torch.float64))  # noqa: E731
    mask = torch.zeros(img_size, img_size)
    if float(torch.rand((), dtype=torch.float64)) > p:
        return mask
    size = uniform(size_min, size_max) * img_size * img_size
    while True:
        ratio = uniform(ratio_1, ratio_2)
        cutmix_w = int(np.sqrt(size / ratio))
        cutmix_h = int(np.sqrt(size * ratio))
        x = int(torch.randint(0, img_size, ()))
        y = int(torch.randint(0, img_size, ()))
        if x + cutmix_w <= img_size and y + cutmix_h <= img_size:
            break
    mask[y:y + cutmix_h, x:x + cutmix_w] = 1
    return mask


def test_unimatch_losses_match_reference_on_fixed_logits():
    torch.manual_seed(0)
    n, c, h, w = 3, 4, 5, 6
    pred_x, pred_u_w, pred_u_w_fp, pred_u_s1, pred_u_s2, pred_u_w_mix = (torch.randn(n, c, h, w) * 3 for _ in range(6))
    mask_x = torch.randint(0, c, (n, h, w))
    box1, box2 = (torch.rand(n, h, w) < 0.4).float(), (torch.rand(n, h, w) < 0.4).float()
    expected = authors_step_losses(pred_x, mask_x, pred_u_w, pred_u_w_fp, pred_u_s1, pred_u_s2, pred_u_w_mix,
                                   box1, box2, 0.7)
    assert 0.1 < float(expected["mask_ratio"]) < 0.9  # the threshold cuts
    ours = unimatch_losses((pred_u_s1, pred_u_s2), pred_u_w_fp, pred_u_w, pred_u_w_mix, (box1, box2), 0.7)
    for name in ("loss_strong1", "loss_strong2", "loss_fp", "mask_ratio"):
        torch.testing.assert_close(ours[name], torch.as_tensor(expected[name]).float(), msg=name)


def test_unimatch_cutmix_box_matches_reference():
    torch.manual_seed(0)
    ours = torch.stack([cutmix_box(64, 64) for _ in range(300)])
    torch.manual_seed(0)
    theirs = torch.stack([authors_cutmix_box(64) for _ in range(300)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    has_box = ours.flatten(1).any(dim=1).float().mean()
    assert 0.4 < float(has_box) < 0.6  # p = 0.5


def test_unimatch_matches_reference_training_loss(membrane):
    """The module's step, network included, against the authors' loop run on a copy of the same model from the
    same random state: boxes per image (view 1, then view 2), the partner's eval-mode forward, the perturbed
    forward of labeled and weak images, the forward of both mixed strong views."""
    torch.manual_seed(0)
    model = UniMatch(loss_terms={"ce": 1.0}, threshold=0.6, cutmix_probability=1.0, **SMALL)
    batch = one_batch(model, membrane)
    img_x, mask_x = batch["labeled"]["image"], batch["labeled"]["target"]
    unlabeled = batch["unlabeled"]
    img_u_w, img_u_s1, img_u_s2 = unlabeled["weak"], unlabeled["strong"].clone(), unlabeled["strong2"].clone()
    net = copy.deepcopy(model.net)
    model.train()
    torch.manual_seed(1)
    losses = model.compute_losses(batch)
    loss = model.total_loss(losses)

    torch.manual_seed(1)
    boxes = [(authors_cutmix_box(64, p=1.0), authors_cutmix_box(64, p=1.0)) for _ in range(len(img_u_w))]
    cutmix_box1, cutmix_box2 = (torch.stack([b[k] for b in boxes]) for k in range(2))
    img_u_w_mix, img_u_s1_mix, img_u_s2_mix = (x.roll(1, dims=0) for x in (img_u_w, img_u_s1, img_u_s2))
    with torch.no_grad():
        net.eval()
        pred_u_w_mix = net(img_u_w_mix).detach()
        img_u_s1[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1] = \
            img_u_s1_mix[cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1]
        img_u_s2[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1] = \
            img_u_s2_mix[cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1]
        net.train()
        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        feature = net.encoder(torch.cat((img_x, img_u_w)))  # unet.py lines 169-173 on smp's encoder/decoder/head
        outs = net.segmentation_head(net.decoder([torch.cat((feat, nn.Dropout2d(0.5)(feat))) for feat in feature]))
        preds, preds_fp = outs.chunk(2)
        pred_x, pred_u_w = preds.split([num_lb, num_ulb])
        pred_u_w_fp = preds_fp[num_lb:]
        pred_u_s1, pred_u_s2 = net(torch.cat((img_u_s1, img_u_s2))).chunk(2)
    expected = authors_step_losses(pred_x, mask_x, pred_u_w, pred_u_w_fp, pred_u_s1, pred_u_s2, pred_u_w_mix,
                                   cutmix_box1, cutmix_box2, 0.6)
    assert 0.0 < float(expected["mask_ratio"]) < 1.0 and cutmix_box1.any() and cutmix_box2.any()
    torch.testing.assert_close(losses["labeled_loss"], expected["loss_x"])
    for name in ("loss_strong1", "loss_strong2", "loss_fp"):
        torch.testing.assert_close(losses[name], expected[name], msg=name)
    torch.testing.assert_close(loss.detach(), expected["loss"])


def test_unimatch_gradients_reach_the_network_through_every_stream(membrane):
    torch.manual_seed(0)
    model = UniMatch(threshold=0.0, **SMALL)  # every pixel supervises: no stream is masked out
    batch = one_batch(model, membrane)
    model.train()
    parts = {"encoder": model.net.encoder, "decoder": model.net.decoder, "head": model.net.segmentation_head}
    for stream in ("loss_strong1", "loss_strong2", "loss_fp"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        losses = model.compute_losses(batch)
        assert losses[stream] > 0
        losses[stream].backward()
        for name, part in parts.items():
            norm = sum(float(p.grad.norm()) for p in part.parameters() if p.grad is not None)
            assert norm > 0, f"{stream} leaves the {name} without gradient"
    # the perturbed stream is random (channel dropout); without dropout the step is deterministic
    for dropout, differs in ((0.5, True), (0.0, False)):
        model = UniMatch(threshold=0.0, cutmix_probability=0.0, fp_dropout=dropout, **SMALL).train()
        with torch.no_grad():
            first, second = (model.compute_losses(batch)["loss_fp"] for _ in range(2))
        assert (not torch.equal(first, second)) == differs


def test_segmentation_folders_give_two_independent_strong_views(membrane):
    """UniMatch's views: one geometry for weak, strong and strong2 (equal without photometric changes), and an
    independent photometric draw per strong view (they differ with them)."""
    model = UniMatch(**SMALL)
    plain = one_batch(model, membrane, color_jitter=0.0, blur_probability=0.0, noise_std=0.0)["unlabeled"]
    torch.testing.assert_close(plain["strong"], plain["weak"])
    torch.testing.assert_close(plain["strong2"], plain["weak"])
    torch.manual_seed(0)
    views = one_batch(model, membrane)["unlabeled"]
    assert not torch.equal(views["strong"], views["strong2"])
    assert not torch.equal(views["strong"], views["weak"])


@pytest.mark.parametrize("network,kwargs", [("unet3plus", {"cgm": True}), ("lw_refinenet", {}),
                                            ("DeepLabV3Plus", {}), ("FPN", {})])
def test_unimatch_runs_on_every_supported_family(membrane, network, kwargs, one_thread):
    torch.manual_seed(0)
    model = UniMatch(network=network, network_kwargs={"encoder_name": "resnet18", **kwargs}, threshold=0.0,
                     log_images=0)
    batch = one_batch(model, membrane)
    model.train()
    losses = model.compute_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_fp"] > 0 and losses["loss_strong1"] > 0
    if network == "unet3plus":  # deep supervision on the labeled images, the CGM's presence loss
        assert "presence_loss" in losses
    model.total_loss(losses).backward()


def test_unimatch_refuses_networks_without_feature_list():
    with pytest.raises(ValueError, match="DPT"):
        UniMatch(network="DPT", network_kwargs={"encoder_name": "tu-resnet18"}, log_images=0)
    with pytest.raises(ValueError, match="concat_forward"):
        UniMatch(concat_forward=True, **SMALL)
    with pytest.raises(ValueError, match="threshold"):
        UniMatch(threshold=1.5, **SMALL)


def test_unimatch_fits_and_tests_from_the_cli(membrane, tmp_path, one_thread):
    quick = ["--config", str(REPO / "configs" / "unimatch_membrane.yaml"), "--data.root", str(membrane),
             "--data.num_test", "2", "--data.crop_size", "64", "--data.batch_size", "2",
             "--data.steps_per_epoch", "2", "--model.network_kwargs", "{encoder_name: resnet18}",
             "--model.log_images", "0", "--trainer.default_root_dir", str(tmp_path),
             "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
             "--trainer.enable_progress_bar", "false"]
    cli = cli_main(["fit", *quick, "--trainer.max_epochs", "1"])
    assert type(cli.model) is UniMatch and cli.model.hparams.threshold == 0.95
    fitted = float(cli.trainer.callback_metrics["test/miou"])
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    cli = cli_main(["test", *quick, "--ckpt_path", str(ckpt)])
    assert float(cli.trainer.callback_metrics["test/miou"]) == pytest.approx(fitted)

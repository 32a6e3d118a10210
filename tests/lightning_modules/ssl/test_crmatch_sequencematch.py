"""CRMatch and SequenceMatch against the authors' code (USB), in training, and the rotated views CRMatch asks for.

The reference tests feed the same real digits through a copy of the same network to the method's real loss and to
a plain re-implementation of USB's ``train_step`` (cited per line), and compare the losses and gradients. Nothing
from ``lightning_modules`` computes an expected value.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import CRMatch, SequenceMatch
from tests.ssl_helpers import SMALL_NET, make_trainer


def _ce(logits, targets):  # USB core/criterions/cross_entropy.py lines 21-31, reduction='none'
    return F.nll_loss(F.log_softmax(logits, dim=-1), targets, reduction="none")


def _digits_step_batch(model, batch_size=8, uratio=2):
    """One training batch of real digits made as a Trainer would make it for ``model``."""
    dm = DigitsSSL(num_labeled=50, batch_size=batch_size, uratio=uratio, steps_per_epoch=1,
                   unlabeled_views=list(model.unlabeled_views))
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(lightning_module=model)
    return dm.on_after_batch_transfer(raw, 0)


def _rotate_img(img, rot):  # USB algorithms/crmatch/crmatch.py lines 17-27, on one CHW image
    if rot == 0:
        return img
    if rot == 90:
        return img.rot90(1, [1, 2])
    if rot == 180:
        return img.rot90(2, [1, 2])
    return img.rot90(1, [2, 1])


def _crmatch_heads(net, x):
    """USB ``CRMatch_Net.forward`` (lines 88-112) over a copy of the module's backbone and heads, written out:
    flattened maps -> ds linear, pooled maps -> fc and the rotation MLP."""
    maps = net.backbone.forward_feature_maps(x)
    grid = F.adaptive_avg_pool2d(maps, 8)  # digits' 2x2 maps at USB's 8x8 CIFAR grid: each cell repeated
    assert torch.equal(grid[:, :, :4, :4].amax(dim=(2, 3)), maps[:, :, :1, :1].amax(dim=(2, 3)))
    ds_w, ds_b = net.feature_head.weight, net.feature_head.bias
    logits_ds = grid.reshape(len(x), -1) @ ds_w.T + ds_b
    feat = maps.mean(dim=(2, 3))
    logits = feat @ net.backbone.fc.weight.T + net.backbone.fc.bias
    r1, r2 = net.rotation_head[0], net.rotation_head[2]
    logits_rot = torch.relu(feat @ r1.weight.T + r1.bias) @ r2.weight.T + r2.bias
    return logits, logits_ds, logits_rot


# --- CRMatch --------------------------------------------------------------------------------
def test_the_datamodule_turns_the_same_weak_draw_for_the_rotated_views():
    model = CRMatch(**SMALL_NET)
    batch = _digits_step_batch(model)
    weak = batch["unlabeled"]["weak"]
    for name, rot in (("weak_rot90", 90), ("weak_rot180", 180), ("weak_rot270", 270)):
        expected = torch.stack([_rotate_img(img, rot) for img in weak])
        assert torch.equal(batch["unlabeled"][name], expected), name
    assert not torch.equal(batch["unlabeled"]["weak_rot90"], weak)


def test_crmatch_matches_reference_train_step_on_digits():
    """Fan et al. 2021; USB ``algorithms/crmatch/crmatch.py`` lines 209-210 (the rotated batch: B images, then
    their 90, 180, 270 turns; labels ``rot_v.transpose(1, 0).view(-1)``), 233-242 (``use_cat``: one forward over
    x_lb, x_ulb_w, x_ulb_s, x_ulb_rot), 258-259 (hard labels, fixed-threshold mask), 261-265 (CE, masked CE,
    ``cosine_embedding_loss(ds_s, ds_w, -1)`` masked), 267-275 (``Lx + Lu + Ld + Lrot``)."""
    torch.manual_seed(0)
    p_cutoff = 0.7
    model = CRMatch(threshold=p_cutoff, **SMALL_NET)
    with torch.no_grad():
        model.net.backbone.fc.weight.mul_(10.0)  # spread the confidences across the threshold
    batch = _digits_step_batch(model)
    net = copy.deepcopy(model.net)
    losses = model.compute_losses(batch)
    total = model.total_loss(losses)

    x_lb, y_lb = batch["labeled"]["image"], batch["labeled"]["target"]
    x_ulb_w, x_ulb_s = batch["unlabeled"]["weak"], batch["unlabeled"]["strong"]
    num_lb, num_ulb = len(x_lb), len(x_ulb_w)
    img = x_ulb_w[:num_lb]  # B rotated images, as USB's RotNet loader of batch_size
    x_ulb_rot = torch.cat([torch.stack([_rotate_img(i, r) for i in img]) for r in (0, 90, 180, 270)])
    rot_v = torch.LongTensor([0, 1, 2, 3]).repeat(num_lb, 1).transpose(1, 0).contiguous().view(-1)
    logits, logits_ds, logits_rot = _crmatch_heads(net, torch.cat((x_lb, x_ulb_w, x_ulb_s, x_ulb_rot)))
    logits_x_lb = logits[:num_lb]
    logits_x_ulb_w, logits_x_ulb_s = logits[num_lb:num_lb + 2 * num_ulb].chunk(2)
    logits_ds_w, logits_ds_s = logits_ds[num_lb:num_lb + 2 * num_ulb].chunk(2)
    y_ulb = torch.argmax(logits_x_ulb_w.detach(), dim=-1)
    mask = torch.softmax(logits_x_ulb_w.detach(), dim=-1).max(dim=-1).values.ge(p_cutoff).float()
    Lx = _ce(logits_x_lb, y_lb).mean()
    Lu = (_ce(logits_x_ulb_s, y_ulb) * mask).mean()
    cos = (logits_ds_s * logits_ds_w).sum(-1) / (logits_ds_s.norm(dim=-1) * logits_ds_w.norm(dim=-1))
    Ld = (cos.clamp_min(0) * mask).mean()  # cosine_embedding_loss with y = -1, margin 0: max(0, cos)
    Lrot = _ce(logits_rot[num_lb + 2 * num_ulb:], rot_v).mean()
    expected = Lx + Lu + Ld + Lrot
    assert 0 < mask.mean() < 1 and Ld > 0

    torch.testing.assert_close(losses["feature_distance_loss"], Ld)
    torch.testing.assert_close(losses["rotation_loss"], Lrot)
    torch.testing.assert_close(losses["consistency_loss"], Lu)
    torch.testing.assert_close(total, expected)
    total.backward()
    expected.backward()
    for name in ("backbone.fc.weight", "feature_head.weight", "rotation_head.0.weight", "backbone.stem.weight"):
        torch.testing.assert_close(model.net.get_parameter(name).grad, net.get_parameter(name).grad, msg=name)


def test_crmatch_trains_on_digits_and_evaluates_with_its_backbone(tmp_path):
    torch.manual_seed(0)
    model = CRMatch(**SMALL_NET)
    dm = DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path, limit_val_batches=1.0)
    trainer.fit(model, dm)
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    assert trainer.global_step == 3 and all(torch.isfinite(v) for v in logged.values())
    assert logged["train/rotation_loss"] > 0 and "val/acc" in logged
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = CRMatch.load_from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(restored.net.feature_head.weight, model.net.feature_head.weight)


def test_crmatch_without_rotation_asks_for_no_rotated_views():
    model = CRMatch(rotation_loss_weight=0.0, **SMALL_NET)
    assert model.unlabeled_views == ("weak", "strong") and model.net.rotation_head is None
    losses = model.compute_losses(_digits_step_batch(model))
    assert "rotation_loss" not in losses and torch.isfinite(losses["unlabeled_loss"])


@pytest.mark.parametrize("make, message", [
    (lambda: CRMatch(threshold=1.5, **SMALL_NET), "threshold must lie in"),
    (lambda: CRMatch(rotation_batch_size=0, **SMALL_NET), "rotation_batch_size >= 1"),
    (lambda: CRMatch(rdrop_weight=1.0, **SMALL_NET), "R-Drop"),
    (lambda: CRMatch(num_classes=10, network="resnet18"), "forward_feature_maps"),
])
def test_crmatch_bad_arguments_are_refused_with_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- SequenceMatch --------------------------------------------------------------------------
class _FlexMatchThresholdingHook:
    """USB ``algorithms/flexmatch/utils.py`` lines 15-61 (thresh_warmup, convex mapping), as plain tensors."""

    def __init__(self, ulb_dest_len, num_classes, p_cutoff):
        self.selected_label = torch.full((ulb_dest_len,), -1, dtype=torch.long)
        self.classwise_acc = torch.zeros(num_classes)
        self.num_classes, self.p_cutoff, self.ulb_dest_len = num_classes, p_cutoff, ulb_dest_len

    def update(self):  # lines 24-29
        counts = {int(k): int(v) for k, v in zip(*torch.unique(self.selected_label, return_counts=True))}
        if max(counts.values()) < self.ulb_dest_len:
            for i in range(self.num_classes):
                self.classwise_acc[i] = counts.get(i, 0) / max(counts.values())

    def masking(self, probs_x_ulb, idx_ulb):  # lines 50-61
        max_probs, max_idx = torch.max(probs_x_ulb, dim=-1)
        acc = self.classwise_acc[max_idx]
        mask = max_probs.ge(self.p_cutoff * (acc / (2.0 - acc))).float()
        select = max_probs.ge(self.p_cutoff)
        self.selected_label[idx_ulb[select]] = max_idx[select]
        self.update()
        return mask


def _usb_sequence_kl(logits, targets_probs, mask, T=0.5):  # USB sequencematch.py lines 107-110 (and 112-120)
    loss = F.kl_div(F.softmax(logits, dim=-1).log(), F.softmax(targets_probs / T, dim=-1), reduction="none").sum(dim=1)
    return (loss * mask).mean()


@pytest.mark.parametrize("kl_target", ["usb", "sharpened"])
def test_sequencematch_matches_reference_over_steps_of_fixed_logits(kl_target):
    """Nguyen 2024; USB ``algorithms/sequencematch/sequencematch.py`` lines 83-84 (softmax of the detached weak
    and medium logits), 93 (FlexMatch's mask, memory updated in the same call), 96-105 (hard labels, masked CE),
    107-122 (three masked KLs, ``unsup + mw + sm + sw``). ``usb`` hands the KL the probabilities as USB does;
    ``sharpened`` (the default) hands it the logits, so its target is ``softmax(logits / T)``."""
    g = torch.Generator().manual_seed(0)
    num_classes, num_ulb, p_cutoff = 4, 20, 0.7
    model = SequenceMatch(num_classes=num_classes, threshold=p_cutoff, kl_target=kl_target, num_unlabeled=num_ulb,
                          in_channels=1, network="wrn10_1")
    hook = _FlexMatchThresholdingHook(num_ulb, num_classes, p_cutoff)
    partial = 0
    for _ in range(8):
        idx_ulb = torch.randperm(num_ulb, generator=g)[:16]
        w, m, s = (torch.randn(16, num_classes, generator=g) * 3 for _ in range(3))
        out = model.unlabeled_loss({"weak": w, "medium": m, "strong": s}, {"index": idx_ulb, "target": w.argmax(-1)})
        model.step_state.commit()
        probs_x_ulb_w, probs_x_ulb_m = torch.softmax(w, dim=-1), torch.softmax(m, dim=-1)
        mask = hook.masking(probs_x_ulb_w, idx_ulb)
        unsup_loss = (_ce(s, probs_x_ulb_w.argmax(-1)) * mask).mean()
        target_w, target_m = (probs_x_ulb_w, probs_x_ulb_m) if kl_target == "usb" else (w, m)
        mw = _usb_sequence_kl(m, target_w, mask)
        sm = _usb_sequence_kl(s, target_m, mask)
        sw = _usb_sequence_kl(s, target_w, mask)
        partial += int(0 < mask.mean() < 1)
        torch.testing.assert_close(out["mask_ratio"], mask.mean())
        torch.testing.assert_close(out["kl_medium_weak"], mw)
        torch.testing.assert_close(out["kl_strong_medium"], sm)
        torch.testing.assert_close(out["unlabeled_loss"], unsup_loss + mw + sm + sw)
        assert torch.equal(model.memory, hook.selected_label)
    assert partial >= 2 and (hook.classwise_acc > 0).any()  # the thresholds moved and masks were partial


def test_sequencematch_default_target_is_the_sharpened_prediction():
    model = SequenceMatch(num_classes=3, num_unlabeled=4, in_channels=1, network="wrn10_1")
    logits = torch.tensor([[4.0, 0.0, -2.0]])
    q = torch.softmax(logits, dim=-1)
    sharpened = q ** 2 / (q ** 2).sum()
    kl = (sharpened * (sharpened.log() - torch.log_softmax(logits, dim=-1))).sum()
    assert model.kl_target == "sharpened"
    torch.testing.assert_close(model.sequence_kl(logits, logits, torch.ones(1)), kl)


def test_sequencematch_trains_on_digits_with_a_medium_view(tmp_path):
    """Through a Trainer: the DataModule draws weak, medium and strong views that all differ, the memory fills."""
    seen = []

    class Record(SequenceMatch):
        def compute_losses(self, batch):
            seen.append({k: v.clone() for k, v in batch["unlabeled"].items()})
            return super().compute_losses(batch)

    torch.manual_seed(0)
    model = Record(threshold=0.3, **SMALL_NET)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(model, DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3))
    views = seen[0]
    assert not torch.equal(views["medium"], views["weak"]) and not torch.equal(views["medium"], views["strong"])
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert trainer.global_step == 3 and all(torch.isfinite(v) for v in logged.values())
    assert "train/kl_strong_medium" in logged and (model.memory >= 0).any()


@pytest.mark.parametrize("make, message", [
    (lambda: SequenceMatch(kl_temperature=0.0, **SMALL_NET), "kl_temperature must be positive"),
    (lambda: SequenceMatch(kl_target="logits", **SMALL_NET), "kl_target must be 'sharpened'"),
])
def test_sequencematch_bad_arguments_are_refused_with_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()

"""SimMatch and CoMatch against the authors' code (USB), their memories stepped over several batches, one real
digits step against USB's forward, and training through the Lightning Trainer.

The reference tests feed the same logits and embeddings to the method's real loss and to a plain
re-implementation of USB's ``train_step`` (cited per line; USB commit 1ef4cbe), and compare losses, masks and
memories after every step. Nothing from ``lightning_modules`` computes an expected value.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import CoMatch, SimMatch
from tests.ssl_helpers import SMALL_NET, digits_batch, make_trainer

TOL = dict(atol=1e-5, rtol=1e-5)


def _soft_ce(logits, targets):  # USB core/criterions/cross_entropy.py lines 21-31 (soft targets), reduction='none'
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=1)


class _DistAlignQueue:
    """USB ``algorithms/hooks/dist_align.py`` lines 77-137, ``p_target_type='uniform'``, one process."""

    def __init__(self, num_classes, length):
        self.p_target = torch.ones(length, num_classes) / num_classes
        self.p_model, self.ptr = torch.zeros(length, num_classes), 0

    def dist_align(self, probs):
        self.p_model[self.ptr] = probs.mean(dim=0)
        self.ptr = (self.ptr + 1) % len(self.p_model)
        aligned = probs * (self.p_target.mean(dim=0) + 1e-6) / (self.p_model.mean(dim=0) + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# --- SimMatch -------------------------------------------------------------------------------
class _USBSimMatch:
    """USB ``algorithms/simmatch/simmatch.py``, CIFAR branch (``use_ema_teacher=False``, ``ema_bank=0.7``)."""

    def __init__(self, bank, num_classes, T, p_cutoff, alpha, da_len):
        self.mem_bank = bank.t().clone()  # (proj_size, K), lines 110-111 (random unit columns)
        self.labels_bank = torch.zeros(bank.shape[0], dtype=torch.long)  # line 112
        self.T, self.p_cutoff, self.alpha, self.C = T, p_cutoff, alpha, num_classes
        self.da = _DistAlignQueue(num_classes, da_len)

    def update_bank(self, k, labels, index):  # lines 133-143
        self.mem_bank[:, index] = F.normalize(0.7 * self.mem_bank[:, index] + 0.3 * k.t(), dim=0)
        self.labels_bank[index] = labels

    def train_step(self, epoch, logits_w, logits_s, feats_lb, feats_w, feats_s, y_lb, idx_lb):
        bank = self.mem_bank.clone()  # line 152
        probs_w = self.da.dist_align(F.softmax(logits_w, dim=-1))  # lines 186-187
        teacher_logits = feats_w @ bank  # lines 192-196
        teacher_prob_orig = F.softmax(teacher_logits / self.T, dim=1)
        factor = probs_w.gather(1, self.labels_bank.expand([len(feats_w), -1]))
        teacher_prob = teacher_prob_orig * factor
        teacher_prob /= torch.sum(teacher_prob, dim=1, keepdim=True)
        aggregated = torch.zeros(len(feats_w), self.C).scatter_add(  # lines 198-202
            1, self.labels_bank.expand([len(feats_w), -1]), teacher_prob_orig)
        probs = probs_w * self.alpha + aggregated * (1 - self.alpha)
        student_prob = F.softmax(feats_s @ bank / self.T, dim=1)  # lines 206-208
        in_loss = torch.sum(-teacher_prob * torch.log(student_prob), dim=1).mean()
        if epoch == 0:  # lines 209-211
            in_loss, probs = in_loss * 0.0, probs_w
        mask = (probs.max(dim=1).values >= self.p_cutoff).float()  # FixedThresholdingHook, softmax_x_ulb=False
        unsup = (_soft_ce(logits_s, probs) * mask).mean()  # consistency_loss 'ce', lines 216-219
        self.update_bank(feats_lb, y_lb, idx_lb)  # line 223
        return unsup, in_loss, mask


def test_simmatch_matches_reference_over_four_steps():
    """Zheng et al. 2022 (similarity distributions over the labeled bank, unfolding and aggregation, the
    in-distribution loss); USB ``algorithms/simmatch/simmatch.py`` lines 133-143, 186-223. Step 0 is USB's
    epoch 0 (no propagation, no in_loss); the labeled indices are spread over the index space to test the
    bank's slots; the last step's labeled batch repeats a sample (its last row wins)."""
    C, K, d, n_lb, n_ulb = 4, 6, 8, 4, 12
    g = torch.Generator().manual_seed(0)
    model = SimMatch(temperature=0.1, threshold=0.6, smoothing_alpha=0.9, dist_align_length=3, proj_size=d,
                     num_classes=C, **{k: v for k, v in SMALL_NET.items() if k != "num_classes"})
    labeled_index = torch.tensor([3, 8, 20, 21, 40, 77])  # the DataModule's index space
    model.bank.resize_(labeled_index)
    usb = _USBSimMatch(model.bank.features, C, T=0.1, p_cutoff=0.6, alpha=0.9, da_len=3)
    masks = []
    for step in range(4):
        slot = torch.tensor([0, 5, 2, 2]) if step == 3 else torch.randperm(K, generator=g)[:n_lb]
        y_lb = torch.randint(0, C, (n_lb,), generator=g)
        logits = {"labeled": torch.randn(n_lb, C, generator=g),
                  "weak": torch.randn(n_ulb, C, generator=g) * 3, "strong": torch.randn(n_ulb, C, generator=g)}
        feats = {"labeled": _unit(g, n_lb, d), "weak": _unit(g, n_ulb, d), "strong": _unit(g, n_ulb, d)}
        model.bank_warmup_epochs = 1 if step == 0 else 0  # current_epoch is 0 outside a Trainer
        labeled = {"index": labeled_index[slot], "target": y_lb}
        unlabeled = {"target": torch.full((n_ulb,), -1)}
        losses = model.embedding_loss(logits, feats, labeled, unlabeled)
        model.step_state.commit()
        unsup, in_loss, mask = usb.train_step(0 if step == 0 else 1, logits["weak"], logits["strong"],
                                              feats["labeled"], feats["weak"], feats["strong"], y_lb, slot)
        torch.testing.assert_close(losses["unlabeled_loss"], unsup, **TOL)
        torch.testing.assert_close(losses["in_loss"], in_loss, **TOL)
        torch.testing.assert_close(losses["mask_ratio"], mask.mean(), **TOL)
        torch.testing.assert_close(model.bank.features, usb.mem_bank.t(), **TOL)
        assert torch.equal(model.bank.labels, usb.labels_bank)
        torch.testing.assert_close(model.dist_align.means, usb.da.p_model, **TOL)
        masks.append(mask)
    assert float(in_loss) > 0 and 0 < float(torch.cat(masks).mean()) < 1, "a vacuous comparison"


# --- CoMatch --------------------------------------------------------------------------------
class _USBCoMatch:
    """USB ``algorithms/comatch/comatch.py``, one process."""

    def __init__(self, queue_size, d, num_classes, T, p_cutoff, contrast_p_cutoff, alpha, queue_batch, da_len):
        self.queue_feats, self.queue_probs, self.queue_ptr = torch.zeros(queue_size, d), torch.zeros(queue_size, num_classes), 0
        self.T, self.p_cutoff, self.cp, self.alpha, self.qb, self.C = T, p_cutoff, contrast_p_cutoff, alpha, queue_batch, num_classes
        self.da = _DistAlignQueue(num_classes, da_len)

    def update_bank(self, feats, probs):  # lines 147-160
        length = feats.shape[0]
        if self.queue_ptr + length > len(self.queue_feats):
            feats, probs = feats[:len(self.queue_feats) - self.queue_ptr], probs[:len(self.queue_feats) - self.queue_ptr]
        self.queue_feats[self.queue_ptr:self.queue_ptr + length] = feats
        self.queue_probs[self.queue_ptr:self.queue_ptr + length] = probs
        self.queue_ptr = (self.queue_ptr + length) % len(self.queue_feats)

    def train_step(self, epoch, it, logits_w, logits_s0, feats_lb, feats_w, feats_s0, feats_s1, y_lb):
        probs = self.da.dist_align(torch.softmax(logits_w, dim=1))  # lines 196-198
        probs_orig = probs.clone()
        if epoch > 0 and it > self.qb:  # lines 202-205
            A = torch.exp(torch.mm(feats_w, self.queue_feats.t()) / self.T)
            A = A / A.sum(1, keepdim=True)
            probs = self.alpha * probs + (1 - self.alpha) * torch.mm(A, self.queue_probs)
        mask = (probs.max(dim=1).values >= self.p_cutoff).float()  # line 207
        self.update_bank(torch.cat([feats_w, feats_lb]), torch.cat([probs_orig, F.one_hot(y_lb, self.C)]))
        unsup = (_soft_ce(logits_s0, probs) * mask).mean()  # lines 214-217
        Q = torch.mm(probs, probs.t())  # lines 220-224
        Q.fill_diagonal_(1)
        Q = Q * (Q >= self.cp).float()
        Q = Q / Q.sum(1, keepdim=True)
        sim = torch.exp(torch.mm(feats_s0, feats_s1.t()) / self.T)  # lines 62-69
        contrast = (-(torch.log(sim / sim.sum(1, keepdim=True) + 1e-7) * Q).sum(1)).mean()
        return unsup, contrast, mask


def test_comatch_matches_reference_over_five_steps():
    """Li et al. 2021 (memory-smoothed pseudo-labels, pseudo-label graph, graph contrastive loss); USB
    ``algorithms/comatch/comatch.py`` lines 61-69, 147-160, 190-228. The queue holds two steps' rows
    (``queue_batch`` 2): smoothing starts at step 3, USB's ``epoch > 0 and it > queue_batch``."""
    C, d, n_lb, n_ulb = 4, 8, 3, 9
    g = torch.Generator().manual_seed(1)
    rows = n_lb + n_ulb
    model = CoMatch(temperature=0.2, threshold=0.6, contrast_threshold=0.5, smoothing_alpha=0.9, queue_size=2 * rows,
                    dist_align_length=4, proj_size=d, num_classes=C,
                    **{k: v for k, v in SMALL_NET.items() if k != "num_classes"})
    usb = _USBCoMatch(2 * rows, d, C, T=0.2, p_cutoff=0.6, contrast_p_cutoff=0.5, alpha=0.9, queue_batch=2, da_len=4)
    masks, contrasts = [], []
    for it in range(5):
        y_lb = torch.randint(0, C, (n_lb,), generator=g)
        logits = {"labeled": torch.randn(n_lb, C, generator=g), "weak": torch.randn(n_ulb, C, generator=g) * 3,
                  "strong": torch.randn(n_ulb, C, generator=g), "strong2": torch.randn(n_ulb, C, generator=g)}
        feats = {k: _unit(g, len(v), d) for k, v in logits.items()}
        model.bank_warmup_epochs = 1 if it == 0 else 0
        losses = model.embedding_loss(logits, feats, {"target": y_lb, "index": torch.arange(n_lb)},
                                      {"target": torch.full((n_ulb,), -1)})
        model.step_state.commit()
        unsup, contrast, mask = usb.train_step(0 if it == 0 else 1, it, logits["weak"], logits["strong"],
                                               feats["labeled"], feats["weak"], feats["strong"], feats["strong2"], y_lb)
        torch.testing.assert_close(losses["unlabeled_loss"], unsup, **TOL)
        torch.testing.assert_close(losses["contrast_loss"], contrast, **TOL)
        torch.testing.assert_close(losses["mask_ratio"], mask.mean(), **TOL)
        torch.testing.assert_close(model.queue.features, usb.queue_feats, **TOL)
        torch.testing.assert_close(model.queue.probs, usb.queue_probs, **TOL)
        assert int(model.queue.ptr) == usb.queue_ptr
        masks.append(mask)
        contrasts.append(contrast)
    assert 0 < float(torch.cat(masks).mean()) < 1, "a vacuous comparison"


# --- a real step ----------------------------------------------------------------------------
def _usb_net_forward(net, head, images):
    """USB ``SimMatch_Net``/``CoMatch_Net.forward`` with ``use_epass`` (simmatch.py lines 44-51): the backbone's
    features, its classifier, and the mean of the three MLPs, divided by its L2 norm."""
    feat = net.forward_features(images)
    mlps = [lambda h, m=m: m[2](torch.relu(m[0](h))) for m in head.heads]
    proj = sum(mlp(feat) for mlp in mlps) / len(mlps)
    return net.fc(feat), proj / proj.pow(2).sum(1, keepdim=True).pow(0.5)


@pytest.mark.parametrize("method", ["SimMatch", "CoMatch"])
def test_real_digits_step_matches_reference_forward(method):
    """One step on a real augmented digits batch: the module's losses equal USB's on a pre-step copy of the
    network and head through USB's ``use_cat`` forward (labeled, weak, strong(s) in one pass)."""
    torch.manual_seed(0)
    cls = SimMatch if method == "SimMatch" else CoMatch
    model = cls(projection_heads=3, bank_warmup_epochs=0, threshold=0.1, **SMALL_NET)
    with torch.no_grad():
        model.net.fc.weight.mul_(10.0)  # spread the confidences across the threshold
    batch, dm = digits_batch(model, return_datamodule=True)
    model.data_facts = dm.data_facts()
    if method == "SimMatch":
        model.bank.resize_(model.data_facts.labeled_indices)
    net, head = copy.deepcopy(model.net), copy.deepcopy(model.projection)
    losses = model.compute_losses(batch)
    lb, ulb = batch["labeled"], batch["unlabeled"]
    views = [ulb[v] for v in cls.unlabeled_views]
    with torch.no_grad():
        logits, feats = _usb_net_forward(net, head, torch.cat([lb["image"], *views]))
    n = len(lb["image"])
    logits_u, feats_u = logits[n:].chunk(len(views)), feats[n:].chunk(len(views))
    torch.testing.assert_close(losses["labeled_loss"], F.cross_entropy(logits[:n], lb["target"]), **TOL)
    if method == "SimMatch":
        usb = _USBSimMatch(model.bank.features, 10, T=0.1, p_cutoff=0.1, alpha=0.9, da_len=32)
        labeled_order = model.data_facts.labeled_indices.sort().values
        idx_lb = torch.searchsorted(labeled_order, lb["index"])
        assert torch.equal(labeled_order[idx_lb], lb["index"])
        unsup, extra, mask = usb.train_step(1, logits_u[0], logits_u[1], feats[:n], feats_u[0], feats_u[1],
                                            lb["target"], idx_lb)
        name = "in_loss"
    else:
        usb = _USBCoMatch(2560, 64, 10, T=0.2, p_cutoff=0.1, contrast_p_cutoff=0.8, alpha=0.9, queue_batch=5, da_len=32)
        unsup, extra, mask = usb.train_step(1, 0, logits_u[0], logits_u[1], feats[:n], feats_u[0], feats_u[1],
                                            feats_u[2], lb["target"])
        name = "contrast_loss"
    torch.testing.assert_close(losses["unlabeled_loss"], unsup, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(losses[name], extra, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(losses["mask_ratio"], mask.mean(), atol=1e-4, rtol=1e-4)
    # USB's total: sup_loss + lambda_u unsup_loss + lambda_in in_loss / lambda_c contrast_loss (all 1)
    total = F.cross_entropy(logits[:n], lb["target"]) + unsup + extra
    torch.testing.assert_close(model.total_loss(losses), total, atol=1e-4, rtol=1e-4)
    assert 0 < float(mask.mean()) and float(extra) > 0


@pytest.mark.parametrize("method", ["SimMatch", "CoMatch"])
def test_trains_on_digits_and_moves_its_memories(method, one_thread):
    """Two epochs of three steps through the Trainer: the memory terms start in epoch 2 (``bank_warmup_epochs``),
    the memories move once per optimizer step, the projection head is trained."""
    torch.manual_seed(0)
    extra = dict(queue_size=48) if method == "CoMatch" else {}
    model = (SimMatch if method == "SimMatch" else CoMatch)(bank_warmup_epochs=1, **extra, **SMALL_NET)
    head_before = copy.deepcopy(model.projection.state_dict())
    trainer = make_trainer(max_epochs=2, accelerator="cpu")
    trainer.fit(model, datamodule=DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3))
    assert trainer.global_step == 6
    assert int(model.dist_align.ptr) == 6
    assert any(not torch.equal(a, model.projection.state_dict()[k]) for k, a in head_before.items())
    name = "train/in_loss" if method == "SimMatch" else "train/contrast_loss"
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and float(trainer.callback_metrics[name]) > 0
    if method == "SimMatch":
        assert len(model.bank) == 50 and int(model.bank.labels.bincount(minlength=10).min()) >= 1  # rows were written
    else:
        assert int(model.queue.count) == 6 * (8 + 16) and int(model.queue.ptr) == 6 * 24 % 48

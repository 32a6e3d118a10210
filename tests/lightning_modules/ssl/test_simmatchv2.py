"""SimMatchV2 against the authors' code (mingkai-zheng/SimMatchV2 at f0e054c), stepped over several batches, its
label propagation with rows not yet written, and training through the Lightning Trainer.

The reference re-implements, in plain tensors, the authors' ``SimMatchV2.forward`` (``models/simmatchv2.py``)
and the loss of ``main.py`` for one process (no all-gather, no batch shuffle) on the same logits and
embeddings; nothing from ``lightning_modules`` computes an expected value.
"""

import copy

import torch
import torch.nn.functional as F

from datamodules import DigitsSSL
from lightning_modules import SimMatchV2
from tests.ssl_helpers import SMALL_NET, make_trainer

TOL = dict(atol=1e-5, rtol=1e-4)


class _AuthorsSimMatchV2:
    """The authors' banks, DA and losses (``models/simmatchv2.py`` lines 54-71, 90-117, 168-248; ``main.py``
    lines 341-345), with the teacher's outputs given."""

    def __init__(self, l_bank, l_labels, u_bank, num_classes, t, alpha, topn, da_m, threshold, lambdas):
        self.l_bank, self.l_labels, self.u_bank = l_bank.clone(), l_labels.clone(), u_bank.clone()
        self.u_labels = torch.zeros(len(u_bank), num_classes) / num_classes  # line 68
        self.ptr, self.da = 0, torch.ones([1, num_classes]) / num_classes  # lines 61, 71
        self.t, self.alpha, self.topn, self.da_m, self.threshold, self.lambdas = t, alpha, topn, da_m, threshold, lambdas

    def distribution_alignment(self, probs):  # lines 90-98, one process
        da_prob = probs / self.da
        da_prob = da_prob / da_prob.sum(dim=1, keepdim=True)
        self.da = self.da * self.da_m + probs.mean(dim=0, keepdim=True) * (1 - self.da_m)
        return da_prob

    def step(self, logits_x, logits_k_u, logits_q_u, feat_kx, feat_ku, feat_qu, targets_x, index):
        l_bank, l_labels, u_bank, u_labels = self.l_bank.clone(), self.l_labels.clone(), self.u_bank.clone(), self.u_labels.clone()
        batch_u = len(feat_ku)
        prob_ku = self.distribution_alignment(F.softmax(logits_k_u, dim=1))
        relation_ku = F.softmax(feat_ku @ u_bank.T / self.t, dim=-1)
        l_sim_index = torch.topk(feat_ku @ l_bank.T, k=self.topn, largest=True, sorted=False, dim=-1)[1].flatten()
        nn_feat = l_bank[l_sim_index].reshape(batch_u, self.topn, -1)
        nn_label = l_labels[l_sim_index].reshape(batch_u, self.topn, -1)
        cat_feat = torch.cat([feat_ku.unsqueeze(1), nn_feat], dim=1)
        cat_label = torch.cat([prob_ku.unsqueeze(1), nn_label], dim=1)
        masks = torch.eye(self.topn + 1)
        A = F.softmax(cat_feat @ cat_feat.transpose(-2, -1) / self.t - masks * 1e9, dim=-1)
        A = (1 - self.alpha) * torch.inverse(masks - self.alpha * A)
        pseudo_label = (A @ cat_label)[:, 0]
        relation_qu = F.softmax(feat_qu @ u_bank.T / self.t, dim=1)
        loss_ee = torch.sum(-relation_qu.log() * relation_ku, dim=1).mean()
        loss_ne = torch.sum(-(relation_qu @ u_labels).log() * prob_ku, dim=1).mean()
        if torch.isnan(loss_ne) or torch.isinf(loss_ne):
            loss_ne = torch.zeros(())
        self.l_bank[index] = feat_kx  # _update_label_bank
        size = len(feat_ku)  # _update_unlabel_bank
        self.u_bank[self.ptr:self.ptr + size], self.u_labels[self.ptr:self.ptr + size] = feat_ku, prob_ku
        self.ptr = (self.ptr + size) % len(self.u_bank)
        mask = prob_ku.max(dim=-1).values.ge(self.threshold).float()  # main.py 341-345
        loss_sup = F.cross_entropy(logits_x, targets_x)
        loss_nn = (torch.sum(-F.log_softmax(logits_q_u, dim=1) * pseudo_label, dim=1) * mask).mean()
        total = loss_sup + self.lambdas[0] * loss_nn + self.lambdas[1] * loss_ee + self.lambdas[2] * loss_ne
        return dict(loss_nn=loss_nn, loss_ee=loss_ee, loss_ne=loss_ne, mask=mask, total=total)


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_simmatchv2_matches_reference_over_four_steps():
    """Zheng et al. 2023 (node-node propagation over the labeled neighbours, edge-edge and node-edge
    consistency over the unlabeled queue, the authors' DA); the queue wraps after two steps."""
    C, K, d, n_lb, n_ulb, topn = 4, 10, 8, 3, 6, 5
    g = torch.Generator().manual_seed(0)
    model = SimMatchV2(temperature=0.1, alpha=0.1, topn=topn, threshold=0.5, queue_size=2 * n_ulb, proj_size=d,
                       num_labeled=K, num_classes=C, **{k: v for k, v in SMALL_NET.items() if k != "num_classes"})
    # the authors' bank knows every label from the start: write every row once before the first step
    labels = torch.randint(0, C, (K,), generator=g)
    model.bank.update_(torch.arange(K), _unit(g, K, d), labels)
    authors = _AuthorsSimMatchV2(model.bank.features, F.one_hot(labels, C).float(), model.queue.features, C, t=0.1,
                                 alpha=0.1, topn=topn, da_m=0.9, threshold=0.5, lambdas=(10.0, 5.0, 5.0))
    masks = []
    for step in range(4):
        index = torch.randperm(K, generator=g)[:n_lb]
        targets = labels[index]
        logits = {"labeled": torch.randn(n_lb, C, generator=g), "weak": torch.randn(n_ulb, C, generator=g) * 2,
                  "strong": torch.randn(n_ulb, C, generator=g)}
        feats = {k: _unit(g, len(v), d) for k, v in logits.items()}
        losses = model.embedding_loss(logits, feats, {"index": index, "target": targets},
                                      {"target": torch.full((n_ulb,), -1)})
        total = model.total_loss({"labeled_loss": F.cross_entropy(logits["labeled"], targets), **losses})
        model.step_state.commit()
        expected = authors.step(logits["labeled"], logits["weak"], logits["strong"], feats["labeled"], feats["weak"],
                                feats["strong"], targets, index)
        torch.testing.assert_close(losses["unlabeled_loss"], expected["loss_nn"], **TOL)
        torch.testing.assert_close(losses["edge_loss"], expected["loss_ee"], **TOL)
        torch.testing.assert_close(losses["node_edge_loss"], expected["loss_ne"], **TOL)
        torch.testing.assert_close(losses["mask_ratio"], expected["mask"].mean(), **TOL)
        torch.testing.assert_close(total, expected["total"], **TOL)
        torch.testing.assert_close(model.bank.features, authors.l_bank, **TOL)
        torch.testing.assert_close(model.queue.features, authors.u_bank, **TOL)
        torch.testing.assert_close(model.queue.probs, authors.u_labels, **TOL)
        torch.testing.assert_close(model.da_marginal, authors.da[0], **TOL)
        masks.append(expected["mask"])
    assert float(expected["loss_ne"]) > 0 and 0 < float(torch.cat(masks).mean()) < 1, "a vacuous comparison"


def test_label_propagation_ignores_rows_not_yet_written():
    """A bank row never written is no neighbour: the pseudo-labels equal those of a bank holding only the
    written rows; with none written a sample keeps its prediction."""
    from lightning_modules.ssl.simmatchv2 import propagate_labels

    g = torch.Generator().manual_seed(3)
    features, probs = _unit(g, 5, 6), torch.softmax(torch.randn(5, 3, generator=g), dim=1)
    bank, labels = _unit(g, 8, 6), F.one_hot(torch.randint(0, 3, (8,), generator=g), 3).float()
    usable = torch.tensor([True, False, True, True, False, True, False, False])
    partial = propagate_labels(features, probs, bank, labels, usable, topn=8, temperature=0.1, alpha=0.2)
    written_only = propagate_labels(features, probs, bank[usable], labels[usable], torch.ones(4, dtype=torch.bool),
                                    topn=8, temperature=0.1, alpha=0.2)
    torch.testing.assert_close(partial, written_only, atol=1e-5, rtol=1e-5)
    none = propagate_labels(features, probs, bank, labels, torch.zeros(8, dtype=torch.bool), 8, 0.1, 0.2)
    assert torch.equal(none, probs)


def test_trains_on_digits_and_moves_its_memories(one_thread):
    torch.manual_seed(0)
    model = SimMatchV2(queue_size=48, topn=16, **SMALL_NET)
    head_before = copy.deepcopy(model.projection.state_dict())
    trainer = make_trainer(max_epochs=2, accelerator="cpu")
    trainer.fit(model, datamodule=DigitsSSL(num_labeled=50, batch_size=8, uratio=2, steps_per_epoch=3))
    assert trainer.global_step == 6 and int(model.queue.count) == 6 * 16 and int(model.bank.seen.sum()) >= 8
    assert any(not torch.equal(a, model.projection.state_dict()[k]) for k, a in head_before.items())
    assert not torch.allclose(model.da_marginal, torch.full((10,), 0.1))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and float(metrics["train/edge_loss"]) > 0
    assert float(metrics["train/node_edge_loss"]) > 0

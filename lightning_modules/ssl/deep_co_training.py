"""Deep Co-Training (Qiao, Shen, Zhang, Wang & Yuille, ECCV 2018, "Deep Co-Training for Semi-Supervised Image
Recognition"), two views as two differently initialized networks.

With ``p1``, ``p2`` the networks' softmax outputs, ``H`` entropy and cross-entropy, and ``g_i(x)`` FGSM
adversarial examples of network i, ``g_i(x) = x + eps sign(grad_x CE(p_i(x), y))`` (y the label on labeled
images, ``argmax p_i(x)`` on unlabeled ones)::

    L = L_sup + w(t) (lambda_cot L_cot + lambda_dif L_dif)
    L_sup = CE(p1(x_l), y) + CE(p2(x_l), y)                                              (Eq. 2)
    L_cot = 1/N_u sum_u H(1/2 (p1(u) + p2(u))) - 1/2 (H(p1(u)) + H(p2(u)))              (Eq. 3, Jensen-Shannon)
    L_dif = 1/(N_l + N_u) sum_{x in l, u} H(p1(x), p2(g1(x))) + H(p2(x), p1(g2(x)))      (Eq. 6)

As the authors' code (AlanChou/Deep-Co-Training-for-Semi-Supervised-Image-Recognition, ``main.py``): the
adversarial examples are made with BatchNorm in evaluation mode (lines 359-369), as advertorch's
``GradientSignAttack`` with summed CE and no clipping (lines 263-269), and detached, so no gradient reaches
the network that produced them; gradients do flow into both the targets ``p_i(x)`` and the predictions of
L_dif (lines 120-136, no detach), L_cot is averaged over the unlabeled batch (line 117) and L_dif over labeled
plus unlabeled (line 136). Deviation: both networks see the same labeled batch (the authors draw one per
network, lines 259-260).

One optimizer (SGD) over both networks' parameters, as the authors (lines 288-289), on the base's 7/16-cosine
schedule per step (the authors': ``lr0 (1 + cos(pi e / E))`` per epoch, lines 80-85). Validation and
prediction use the first network (``net``, through the evaluation EMA when ``ema_decay`` is set); test also
logs each network's accuracy (raw weights) and that of their averaged probabilities.

Defaults reproduce the paper's CIFAR-10 recipe (``main.py`` lines 24-38): lambda_cot = 10, lambda_dif = 0.5,
both ramped up by ``exp(-5 (1 - t)^2)`` over the first 80 of 600 epochs (40,000 of 300,000 steps), eps = 0.02 (in
the units of the network's input: the authors' images are in [0, 1], ours are normalized by the data's std),
SGD lr 0.05 momentum 0.9 weight decay 1e-4, no EMA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.classification.networks import build_network
from lightning_modules.classification.semi_supervised import SemiSupervisedModule
from lightning_modules.classification.task import refuse_criterion, refuse_rdrop

RAMPUP_STEPS_80_OF_600_EPOCHS = 80 * 500  # the authors' warm-up: 80 epochs of 50,000 images in batches of 100


def cotraining_loss(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of the two networks' predictions, averaged over the batch."""
    p1, p2 = torch.softmax(logits1.float(), dim=1), torch.softmax(logits2.float(), dim=1)
    mean = (p1 + p2) / 2
    entropy = lambda p, log_p: -(p * log_p).sum(dim=1)  # noqa: E731
    mixed = entropy(mean, torch.log(mean))
    own = (entropy(p1, F.log_softmax(logits1.float(), dim=1)) + entropy(p2, F.log_softmax(logits2.float(), dim=1))) / 2
    return (mixed - own).mean()


def view_difference_loss(logits1: torch.Tensor, logits2: torch.Tensor, logits1_on_adv2: torch.Tensor,
                         logits2_on_adv1: torch.Tensor) -> torch.Tensor:
    """``H(p1(x), p2(g1(x))) + H(p2(x), p1(g2(x)))`` averaged over the batch: each network should keep the
    other's clean prediction on the other's adversarial examples."""
    p1, p2 = torch.softmax(logits1.float(), dim=1), torch.softmax(logits2.float(), dim=1)
    first = -(p1 * F.log_softmax(logits2_on_adv1.float(), dim=1)).sum(dim=1)
    second = -(p2 * F.log_softmax(logits1_on_adv2.float(), dim=1)).sum(dim=1)
    return (first + second).mean()


def fgsm(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``x + eps sign(grad_x sum CE(net(x), targets))`` with BatchNorm in evaluation mode, detached."""
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            inputs = images.detach().requires_grad_(True)
            loss = F.cross_entropy(net(inputs).float(), targets, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, inputs)  # the input's only: no weight receives it
    finally:
        net.train(was_training)
    return (images + epsilon * gradient.sign()).detach()


class DeepCoTraining(SemiSupervisedModule):
    """Deep Co-Training: two networks agree on unlabeled images and resist each other's adversarial examples
    (the module docstring has the equations and the recipe).

    Args:
        peer_network: the second network's architecture; default ``network``'s (a second random draw).
        cot_weight: lambda_cot, the weight of the Jensen-Shannon co-training loss.
        dif_weight: lambda_dif, the weight of the view-difference loss.
        epsilon: FGSM step size, in the units of the (normalized) input.
        unlabeled_loss_weight, rampup, rampup_steps: w(t), the ramp of both weights (1, sigmoid, 40,000 steps).
        **kwargs: :class:`SemiSupervisedModule` arguments.
    """

    unlabeled_views = ("weak",)
    progress_bar_terms = ("cot_loss", "dif_loss")

    def __init__(self, peer_network: str | None = None, cot_weight: float = 10.0, dif_weight: float = 0.5,
                 epsilon: float = 0.02, unlabeled_loss_weight: float = 1.0, rampup: str | None = "sigmoid",
                 rampup_steps: int = RAMPUP_STEPS_80_OF_600_EPOCHS, lr: float = 0.05, weight_decay: float = 1e-4,
                 nesterov: bool = False, ema_decay: float | None = None, **kwargs: Any) -> None:
        refuse_rdrop(type(self).__name__, kwargs.get("rdrop_weight", 0.0))  # its own forwards over two networks
        refuse_criterion(type(self).__name__, kwargs.get("criterion", "ce"))  # FGSM and L_sup are cross-entropy
        if epsilon < 0 or cot_weight < 0 or dif_weight < 0:
            raise ValueError(f"epsilon, cot_weight and dif_weight must be >= 0, got {epsilon}, {cot_weight}, {dif_weight}")
        super().__init__(unlabeled_loss_weight=unlabeled_loss_weight, rampup=rampup, rampup_steps=rampup_steps,
                         lr=lr, weight_decay=weight_decay, nesterov=nesterov, ema_decay=ema_decay, **kwargs)
        hp = self.hparams
        self.peer = build_network(peer_network or hp.network, num_classes=hp.num_classes, in_channels=hp.in_channels,
                                  **(hp.network_kwargs or {}))
        self.pair_test_acc = nn.ModuleDict({name: MulticlassAccuracy(hp.num_classes, average="micro")
                                            for name in ("net1", "net2", "average")})

    def trainable_modules(self) -> list[nn.Module]:
        return super().trainable_modules() + [self.peer]

    def _forward(self, net: nn.Module, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.hparams.concat_forward:
            return net(torch.cat(parts))
        return torch.cat([net(x) for x in parts])

    def compute_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        parts = [labeled["image"]] + ([unlabeled["weak"]] if unlabeled is not None else [])
        num_labeled, targets = len(labeled["target"]), labeled["target"]
        logits1, logits2 = self._forward(self.net, parts), self._forward(self.peer, parts)
        ce1, ce2 = self.labeled_loss(logits1[:num_labeled], targets), self.labeled_loss(logits2[:num_labeled], targets)
        losses = {"labeled_loss": ce1 + ce2, "net1_ce": ce1.detach(), "net2_ce": ce2.detach()}
        if unlabeled is None:
            return losses
        images = torch.cat(parts)
        adv1 = fgsm(self.net, images, torch.cat([targets, logits1[num_labeled:].detach().argmax(dim=1)]), self.hparams.epsilon)
        adv2 = fgsm(self.peer, images, torch.cat([targets, logits2[num_labeled:].detach().argmax(dim=1)]), self.hparams.epsilon)
        split = lambda x: [x[:num_labeled], x[num_labeled:]]  # noqa: E731  (forwarded as the clean images are)
        cot = cotraining_loss(logits1[num_labeled:], logits2[num_labeled:])
        dif = view_difference_loss(logits1, logits2, self._forward(self.net, split(adv2)), self._forward(self.peer, split(adv1)))
        losses.update(cot_loss=cot.detach(), dif_loss=dif.detach(),
                      unlabeled_loss=self.hparams.cot_weight * cot + self.hparams.dif_weight * dif)
        return losses

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        probs = [torch.softmax(net(batch["image"]).float(), dim=1) for net in (self.net, self.peer)]
        for name, p in zip(self.pair_test_acc, (*probs, (probs[0] + probs[1]) / 2)):
            self.pair_test_acc[name].update(p.argmax(dim=1), batch["target"])
            self.log(f"test/{name}_acc", self.pair_test_acc[name], on_epoch=True, batch_size=len(batch["target"]))

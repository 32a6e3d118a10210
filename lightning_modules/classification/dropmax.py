"""DropMax (Lee et al., ICLR 2018, "DropMax: Adaptive Variational Softmax") as a criterion. No Lightning.

Each sample drops non-target classes from its softmax with learned retain probabilities ``rho``. With class
logits ``o``, retain logits ``h_p`` and auxiliary logits ``h_r`` (one per class), ``p = sigmoid(h_p)``,
``r = sigmoid(h_r)`` and the posterior ``q = sigmoid(sg(h_p) + h_r)`` (``sg``: stop-gradient), training draws a
relaxed Bernoulli mask ``z_c = sigmoid((logit q_c + logit u_c) / tau)``, ``u ~ U(0, 1)``, with the target's
``z_y = 1``, and minimises (means over the batch, sums over classes)

    L = -log[(z_y + eps) e^{o_y} / sum_c (z_c + eps) e^{o_c}]                    (masked softmax CE)
        + sum_c [c = y] (-log p_c) + [c != y] KL(Bern(q_c) || Bern(p_c))          (KL to the prior p)
        + sum_c [c = y] (-log r_c) + [c != y] (-log(1 - r_c))                     (auxiliary: r finds the target)
        + sum_c p_c log p_c + (1 - p_c) log(1 - p_c)                               (negative entropy of p)

At test the mask is its expectation under the prior: the class scores are ``log((p + eps) e^{o})``, so their
softmax is the paper's test-time prediction and their cross-entropy the authors' test loss.
Reference: the authors' TensorFlow code, github.com/haebeom-lee/dropmax: ``lenet.py`` lines 34-58 (branches,
``qh = stop_gradient(ph) + rh``, the training and test CE), ``layers.py`` lines 10-11 and 46-65 (``tau = 0.1``,
``eps = 1e-20``, the mask, KL, auxiliary and entropy terms), ``run.py`` line 53 (the four terms summed with
weight 1). Defaults reproduce that recipe.

Where the retain logits come from: in the paper ``h_p`` and ``h_r`` are two more linear heads on the penultimate
features ``h``. A criterion sees only the class logits ``o = W h + b``, so this one owns the heads as a learnable
affine map of ``o`` (``retain_head``: C -> 2C, zero at start, so every ``p``, ``q``, ``r`` starts at 1/2). That is
an affine head on ``h`` whose weights lie in the row space of ``W``; like the paper's heads it sends gradient into
the shared network. It works with any backbone and leaves the network's output (N, C), so every method, KD and
the EMA copy keep their logits. The task evaluates and predicts with :meth:`DropMax.class_scores`; the head's
parameters are trained with the network (the criterion is one of the task's ``trainable_modules``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-20  # the authors' eps: a dropped class keeps weight 1e-20 in the softmax (layers.py line 11)


def dropmax_loss(logits: Tensor, retain_logits: Tensor, aux_logits: Tensor, targets: Tensor, uniform: Tensor,
                 temperature: float = 0.1, kl_weight: float = 1.0, aux_weight: float = 1.0,
                 entropy_weight: float = 1.0) -> dict[str, Tensor]:
    """The four DropMax terms (module docstring) for ``(N, C)`` inputs and the mask noise ``uniform`` in (0, 1)."""
    logits, retain_logits, aux_logits = logits.float(), retain_logits.float(), aux_logits.float()
    is_target = F.one_hot(targets, logits.shape[1]).bool()
    posterior_logits = retain_logits.detach() + aux_logits
    noise = uniform.float().clamp(1e-6, 1 - 1e-6)
    mask = torch.sigmoid((posterior_logits + torch.log(noise) - torch.log1p(-noise)) / temperature)
    mask = torch.where(is_target, torch.ones_like(mask), mask)
    masked_ce = F.cross_entropy(torch.log(mask + EPS) + logits, targets)

    log_p, log_not_p = F.logsigmoid(retain_logits), F.logsigmoid(-retain_logits)
    q, log_q, log_not_q = torch.sigmoid(posterior_logits), F.logsigmoid(posterior_logits), F.logsigmoid(-posterior_logits)
    kl = torch.where(is_target, -log_p, q * (log_q - log_p) + (1 - q) * (log_not_q - log_not_p))
    aux = torch.where(is_target, -F.logsigmoid(aux_logits), -F.logsigmoid(-aux_logits))
    p = torch.sigmoid(retain_logits)
    neg_entropy = p * log_p + (1 - p) * log_not_p
    terms = {"masked_ce": masked_ce, "kl": kl.mean(0).sum(), "aux": aux.mean(0).sum(),
             "neg_entropy": neg_entropy.mean(0).sum()}
    terms["loss"] = (masked_ce + kl_weight * terms["kl"] + aux_weight * terms["aux"]
                     + entropy_weight * terms["neg_entropy"])
    return terms


class DropMax(nn.Module):
    """DropMax criterion (module docstring): ``forward(logits, targets)`` is the training loss with a fresh mask.

    Args:
        num_classes: C.
        temperature: tau of the relaxed Bernoulli mask (0.1, the authors').
        kl_weight, aux_weight, entropy_weight: weights of the KL, auxiliary and negative-entropy terms (1 each).
    """

    multilabel: bool = False

    def __init__(self, num_classes: int, temperature: float = 0.1, kl_weight: float = 1.0, aux_weight: float = 1.0,
                 entropy_weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0; the authors use temperature=0.1")
        for name, weight in (("kl_weight", kl_weight), ("aux_weight", aux_weight), ("entropy_weight", entropy_weight)):
            if weight < 0:
                raise ValueError(f"{name}={weight} must be >= 0 (1.0 is the authors' recipe, 0 drops the term)")
        self.num_classes, self.temperature = num_classes, temperature
        self.weights = {"kl_weight": kl_weight, "aux_weight": aux_weight, "entropy_weight": entropy_weight}
        self.retain_head = nn.Linear(num_classes, 2 * num_classes)
        nn.init.zeros_(self.retain_head.weight)
        nn.init.zeros_(self.retain_head.bias)

    def branch_logits(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The retain logits ``h_p`` and auxiliary logits ``h_r``, each ``(N, C)``."""
        retain, aux = self.retain_head(logits.float()).chunk(2, dim=1)
        return retain, aux

    def terms(self, logits: Tensor, targets: Tensor, uniform: Tensor | None = None) -> dict[str, Tensor]:
        """Every term of the loss; ``uniform`` is the mask noise (drawn from the global generator if None)."""
        retain, aux = self.branch_logits(logits)
        noise = torch.rand_like(retain) if uniform is None else uniform
        return dropmax_loss(logits, retain, aux, targets, noise, self.temperature, **self.weights)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.terms(logits, targets)["loss"]

    def class_scores(self, logits: Tensor) -> Tensor:
        """Test-time class scores ``o + log(p + eps)``: softmax of them is the paper's expected-retain prediction."""
        retain, _ = self.branch_logits(logits)
        return logits.float() + torch.log(torch.sigmoid(retain) + EPS)

"""Adversarial weight-perturbation training: FGM (Miyato et al. 2017) and PGD (Madry et al. 2018).

Both callbacks hook into Lightning's automatic optimization right after the normal backward:
they move the chosen parameters (selected by name, e.g. the input stem ``net.stem`` of a CNN or
an embedding matrix of a text model) along their normalized gradient, run one more forward and
backward of the module's training loss at the perturbed point, add that gradient to the normal
one and put the parameters back bit for bit. The optimizer then steps on
``grad L(theta) + grad L(theta + r_adv)``.

The module exposes its loss for the extra passes through the ``training_loss(batch) -> Tensor``
protocol (see :class:`lightning_modules.core.training_module.TrainingModule`): the step's total
loss, computed from the batch exactly as ``training_step`` does, without logging and without
proposing running state, so a method's thresholds, memories and marginals move once per optimizer
step whatever the passes here (docs/design.md, "Running state"). See ``docs/callbacks_adversarial.md``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

__all__ = ["FGM", "PGD"]


class _AdversarialPerturbation(Callback):
    """Shared machinery: parameter selection, batch capture, the extra pass, exact restore.

    Args:
        param_names: a parameter is chosen when ``re.search(pattern, name)`` finds any of these
            patterns in its name from ``pl_module.named_parameters()``. A plain substring is a
            valid pattern, so ``["stem"]`` or ``["embedding"]`` work as-is (``.`` matches any
            character, which is harmless for dotted names); anchors and alternatives
            (``"^net\\.stem\\.weight$"``) give exact control.
        epsilon: radius of the perturbation, measured per parameter tensor in the L2 norm.
    """

    def __init__(self, param_names: list[str] | str, epsilon: float = 1.0) -> None:
        super().__init__()
        if isinstance(param_names, str):
            param_names = [param_names]
        if not param_names:
            raise ValueError(f"{type(self).__name__} needs at least one entry in param_names")
        if not epsilon > 0:
            raise ValueError(f"{type(self).__name__} needs epsilon > 0, got {epsilon}")
        self.param_names = list(param_names)
        self.epsilon = float(epsilon)
        self._patterns = [re.compile(p) for p in self.param_names]
        self._params: dict[str, nn.Parameter] = {}
        self._batch: Any = None
        self._grad_before: dict[str, Tensor | None] = {}
        self._in_extra_pass = False
        #: per perturbation step, ``{name: ||theta_adv - theta||}`` of the last training batch
        #: (one dict for FGM, ``steps`` dicts for PGD); for tests and diagnostics.
        self.last_perturbation_norms: list[dict[str, float]] = []

    # --- selection -------------------------------------------------------------------------
    def select_parameters(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters whose name matches any pattern; raises if there is none."""
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        chosen = {n: p for n, p in named if any(pat.search(n) for pat in self._patterns)}
        if not chosen:
            raise ValueError(
                f"{type(self).__name__}(param_names={self.param_names}) matches no trainable parameter"
                f" (rule: re.search(pattern, name)). Available: {[n for n, _ in named]}"
            )
        return chosen

    # --- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} supports automatic optimization only; with manual optimization"
                " add the adversarial pass inside training_step yourself."
            )
        if not callable(getattr(pl_module, "training_loss", None)):
            raise TypeError(
                f"{type(self).__name__} needs the module to implement the training_loss(batch) -> Tensor"
                f" protocol (the step's total loss without logging); {type(pl_module).__name__} does not."
            )
        self._params = self.select_parameters(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch = None
        self._grad_before = {}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._in_extra_pass:
            return
        # Under gradient accumulation .grad already holds earlier micro-batches: remember it so
        # the direction uses this batch's gradient only.
        self._grad_before = {
            n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in self._params.items()}

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Strategy.backward of our own extra pass fires this hook again: ignore it.
        if self._in_extra_pass or self._batch is None or not self._params:
            return
        self._in_extra_pass = True
        try:
            originals = {n: p.detach().clone() for n, p in self._params.items()}
            try:
                self.last_perturbation_norms = []
                self.attack(trainer, pl_module, originals)
            finally:
                with torch.no_grad():
                    for n, p in self._params.items():
                        p.copy_(originals[n])
        finally:
            self._in_extra_pass = False

    # --- building blocks -------------------------------------------------------------------
    def attack(self, trainer: Trainer, pl_module: LightningModule, originals: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def batch_gradient(self, name: str, param: Tensor) -> Tensor | None:
        """This micro-batch's gradient of ``param`` (the accumulated one minus what was there before)."""
        if param.grad is None:
            return None
        before = self._grad_before.get(name)
        return param.grad.detach() if before is None else param.grad.detach() - before

    @torch.no_grad()
    def step(self, directions: dict[str, Tensor | None], size: float, originals: dict[str, Tensor]) -> None:
        """``theta += size * g / ||g||`` per tensor, then project onto the epsilon ball around ``originals``."""
        norms: dict[str, float] = {}
        for n, p in self._params.items():
            g = directions.get(n)
            if g is not None:
                g_norm = torch.linalg.vector_norm(g.float())
                if torch.isfinite(g_norm) and g_norm > 0:  # skip zero or overflowed (fp16 scaler) grads
                    p.add_((size / g_norm) * g.float())
            delta = p.float() - originals[n].float()
            d_norm = torch.linalg.vector_norm(delta)
            if d_norm > self.epsilon:
                p.copy_(originals[n].float() + delta * (self.epsilon / d_norm))
                d_norm = torch.linalg.vector_norm(p.float() - originals[n].float())
            norms[n] = float(d_norm)
        self.last_perturbation_norms.append(norms)

    def adversarial_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forward ``training_loss`` at the current parameters and backward it the way Lightning does.

        The forward runs in the precision plugin's train-step context (autocast under mixed
        precision); the loss is divided by ``accumulate_grad_batches`` like the normal loss; the
        backward goes through ``trainer.strategy.backward`` so GradScaler scaling and the
        module's own ``backward`` apply.
        """
        strategy = trainer.strategy
        with torch.enable_grad(), strategy.precision_plugin.train_step_context():
            loss = pl_module.training_loss(self._batch)
        if not isinstance(loss, Tensor):
            raise TypeError(f"{type(pl_module).__name__}.training_loss(batch) must return a Tensor, got {type(loss)}")
        loss = loss / trainer.accumulate_grad_batches
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        strategy.backward(loss, optimizer)


class FGM(_AdversarialPerturbation):
    """Fast gradient method on weights: one step of norm epsilon along the normalized gradient.

    ``r = epsilon * g / ||g||`` per chosen tensor with ``g`` this batch's gradient; the step's
    gradient becomes ``grad L(theta) + grad L(theta + r)``; the parameters are restored exactly.

    Args:
        param_names: patterns; a parameter is chosen when ``re.search(pattern, name)`` matches.
        epsilon: L2 norm of the perturbation of each chosen tensor.
    """

    def attack(self, trainer: Trainer, pl_module: LightningModule, originals: dict[str, Tensor]) -> None:
        directions = {n: self.batch_gradient(n, p) for n, p in self._params.items()}
        self.step(directions, self.epsilon, originals)
        self.adversarial_backward(trainer, pl_module)


class PGD(_AdversarialPerturbation):
    """Projected gradient descent on weights: ``steps`` steps of size alpha inside the epsilon ball.

    Step k moves each chosen tensor by ``alpha * g_k / ||g_k||`` and projects it back onto the
    L2 ball of radius epsilon around the original value; ``g_0`` is this batch's normal gradient,
    ``g_k`` the gradient of the loss at the previous perturbed point. The normal gradients are
    backed up, the intermediate passes run on zeroed gradients, and the last pass accumulates into
    the backup: the step's gradient is ``grad L(theta) + grad L(theta + r_K)``.

    Args:
        param_names: patterns; a parameter is chosen when ``re.search(pattern, name)`` matches.
        epsilon: radius (L2, per chosen tensor) of the ball the perturbation stays in.
        alpha: size of each step.
        steps: number of perturbation steps K (K forward/backward passes).
    """

    def __init__(self, param_names: list[str] | str, epsilon: float = 1.0, alpha: float = 0.3,
                 steps: int = 3) -> None:
        super().__init__(param_names, epsilon)
        if not alpha > 0:
            raise ValueError(f"PGD needs alpha > 0, got {alpha}")
        if steps < 1:
            raise ValueError(f"PGD needs steps >= 1, got {steps}")
        self.alpha = float(alpha)
        self.steps = int(steps)

    def attack(self, trainer: Trainer, pl_module: LightningModule, originals: dict[str, Tensor]) -> None:
        all_params = [p for p in pl_module.parameters() if p.requires_grad]
        directions = {n: self.batch_gradient(n, p) for n, p in self._params.items()}
        backup = [p.grad for p in all_params]
        try:
            for k in range(self.steps):
                self.step(directions, self.alpha, originals)
                last = k == self.steps - 1
                for p, g in zip(all_params, backup):
                    # intermediate passes start from empty grads; the last accumulates into the backup
                    p.grad = g if last else None
                self.adversarial_backward(trainer, pl_module)
                if not last:
                    directions = {n: (p.grad.detach() if p.grad is not None else None)
                                  for n, p in self._params.items()}
        except BaseException:
            for p, g in zip(all_params, backup):
                p.grad = g
            raise

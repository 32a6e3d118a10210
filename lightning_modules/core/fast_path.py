"""The fast training path: options of the base that make a step cheaper on a GPU.

Each option is a constructor argument of the core, :class:`~lightning_modules.core.training_module.TrainingModule`
(so ``--model.channels_last true`` on the command line); together with ``--trainer.precision bf16-mixed``
they are the rows of ``benchmarks/speed_fixmatch.py`` (docs/performance.md).

* ``channels_last``: the network's weights, and every 4-D input it is called with (a forward pre-hook,
  so the views, evaluation batches and the EMA copy alike), use ``torch.channels_last``. Same numbers
  up to the summation order of the convolution kernels.
* ``compile``: the base's training forward (``forward_views``) runs ``torch.compile(net, mode=compile_mode,
  dynamic=False)``; evaluation, the EMA copy and a method's own extra forwards stay eager (other batch
  sizes would recompile). The compiled callable is not part of the module's state: a copy (the EMA
  callback's deep copy, a pickle) compiles its own on first use. Modes that capture CUDA graphs
  (``reduce-overhead``, ``max-autotune``) are refused: a graph replay overwrites the outputs of the
  previous replay, and this step forwards twice (target views, then the rest) and keeps tensors of earlier
  steps (the loss check's queue, the progress values); nobody has shown that safe on a GPU yet, so
  ``max-autotune-no-cudagraphs`` is the strongest mode offered.
* ``no_grad_target_views``: views a method uses only as targets (``target_views``: FixMatch's weak view,
  whose pseudo-labels are detached) are forwarded under ``torch.no_grad``: no activations kept for
  backward, about 30 % less work in a FixMatch step. Off by default because with ``concat_forward`` it
  changes results: BatchNorm then normalizes the target views by their own batch statistics instead of
  the whole step's (as ``concat_forward=False`` does); with ``concat_forward=False`` it changes nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

#: torch.compile modes offered; the ones that capture CUDA graphs are refused (module docstring)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: a 4-D tensor input goes in as ``channels_last`` (a copy only when it is not already)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


class FastForward:
    """Mixin of the base: the forward of a step's views, as the module's :class:`FastPath` says."""

    #: views a method uses only as targets (no gradient); ``no_grad_target_views`` forwards them under no_grad
    target_views: tuple[str, ...] = ()
    #: False where the training step never calls ``forward_views`` (a detector's torchvision losses), so that
    #: compile and no_grad_target_views, which act there, are refused instead of doing nothing
    trains_through_forward_views: bool = True

    def forward_views(self, images: list[torch.Tensor], no_grad: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """Logits of each batch in ``images``: one concatenated forward (``concat_forward``), or one forward each;
        ``no_grad[i]``: ``images[i]`` is forwarded apart, without gradient."""
        return self.fast_path.forward_views(self.net, images, self.hparams.concat_forward, no_grad)


class FastPath:
    """The fast-path options of one module (read from its hyper-parameters), and the forward of its views.

    Built in the base's ``__init__`` right after the network, so ``channels_last`` reaches the EMA copy too.
    """

    def __init__(self, module: Any) -> None:
        hp, owner = module.hparams, type(module)
        name, compile_mode = owner.__name__, hp.get("compile_mode", "default")
        if hp.get("concat_forward") and not getattr(owner, "supports_concat_forward", True):
            raise ValueError(f"{name} cannot use concat_forward=True (one forward over labeled and unlabeled views; "
                             "its docstring says why): pass concat_forward=False")
        if compile_mode in CUDA_GRAPH_MODES:
            raise ValueError(f"compile_mode={compile_mode!r} captures CUDA graphs, which are not shown safe with this "
                             f"step (two forwards per step, tensors kept across steps; core/fast_path.py): use one "
                             f"of {COMPILE_MODES}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.channels_last, self.compile = bool(hp.get("channels_last")), bool(hp.get("compile"))
        self.compile_mode, no_grad_views = compile_mode, bool(hp.get("no_grad_target_views"))
        if (owner.forward_views is not FastForward.forward_views or not owner.trains_through_forward_views) and (
                self.compile or no_grad_views):
            raise ValueError(f"{name} does not train through the base's forward_views (it forwards its views itself, "
                             f"or its network computes its own losses), so compile and no_grad_target_views, which "
                             f"act there, would do nothing: leave them false")
        if no_grad_views and not owner.target_views:
            raise ValueError(f"{name} has no view used only as a target (target_views is empty): every view it "
                             f"forwards needs a gradient; leave no_grad_target_views false")
        self.target_views: tuple[str, ...] = tuple(owner.target_views) if no_grad_views else ()
        self._compiled: tuple[nn.Module, Any] | None = None  # (network, its compiled callable)
        if self.channels_last:
            module.net.to(memory_format=torch.channels_last)
            module.net.register_forward_pre_hook(channels_last_input)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None}  # a copy compiles its own network on first use

    def network(self, net: nn.Module) -> Any:
        """``net``, or its compiled callable when ``compile`` is on (compiled once, at the first training forward)."""
        if not self.compile:
            return net
        if self._compiled is None or self._compiled[0] is not net:
            self._compiled = (net, torch.compile(net, mode=self.compile_mode, dynamic=False))
        return self._compiled[1]

    def no_grad_argument(self, num_labeled_passes: int, views: Sequence[str]) -> dict[str, list[bool]]:
        """``{"no_grad": flags}`` for ``forward_views([labeled] * passes + views)``, or ``{}`` when no view goes
        without gradient (so a subclass's own ``forward_views(images)`` is called as before)."""
        flags = [False] * num_labeled_passes + [view in self.target_views for view in views]
        return {"no_grad": flags} if any(flags) else {}

    def forward_views(self, net: nn.Module, images: list[torch.Tensor], concat: bool,
                      no_grad: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """Logits of each batch in ``images``, in order; ``no_grad[i]`` forwards ``images[i]`` without gradient.

        With ``concat`` the batches that need a gradient go through one forward together, after one
        forward per no-gradient batch; without it every batch is forwarded alone, in order.
        """
        call = self.network(net)
        no_grad = list(no_grad) if no_grad is not None else [False] * len(images)
        if len(no_grad) != len(images):
            raise ValueError(f"no_grad has {len(no_grad)} flags for {len(images)} batches of images")
        if not concat:
            return [_forward(call, x, off) for x, off in zip(images, no_grad)]
        logits: list[torch.Tensor | None] = [None] * len(images)
        for i in (i for i, off in enumerate(no_grad) if off):
            logits[i] = _forward(call, images[i], True)
        with_grad = [i for i, off in enumerate(no_grad) if not off]
        if with_grad:
            joint = call(torch.cat([images[i] for i in with_grad]))
            for i, piece in zip(with_grad, joint.split([len(images[i]) for i in with_grad])):
                logits[i] = piece
        return logits  # type: ignore[return-value]


def _forward(call: Any, images: torch.Tensor, without_grad: bool) -> torch.Tensor:
    if not without_grad:
        return call(images)
    with torch.no_grad():
        return call(images)

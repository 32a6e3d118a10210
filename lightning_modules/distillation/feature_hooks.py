"""Intermediate features by module path, through forward hooks, so distillation never edits ``forward``.

Usage::

    >>> import torch
    >>> from lightning_modules.classification.networks import build_network
    >>> net = build_network("wrn10_1", num_classes=10)
    >>> with FeatureHooks(net, ["groups.2", "fc:input"]) as hooks:
    ...     logits = net(torch.randn(2, 3, 32, 32))
    ...     features = hooks.pop()
    >>> features["groups.2"].shape, features["fc:input"].shape
    (torch.Size([2, 64, 8, 8]), torch.Size([2, 64]))

A path is a dotted name as in ``model.get_submodule`` (``"groups.2"``, ``"layer3"``; ``""`` is the
model itself) and captures that module's output; ``"<path>:input"`` captures its first positional
input instead (``"fc:input"``: the penultimate features).

Captured tensors are the live tensors of the forward pass: they carry gradient when the model
does (a student) and none under ``torch.no_grad()`` (a teacher). If the network later modifies a
captured output in place (an ``inplace=True`` activation applied to a BatchNorm output, say), the
capture changes with it. ``pop()`` detects that and raises; hook the next module's ``:input`` or a
module whose output is not overwritten, or pass ``clone=True`` (one extra copy per capture).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_INPUT_SUFFIX = ":input"
_MAX_LISTED_NAMES = 20


def _version(tensor: torch.Tensor) -> int | None:
    # Inference-mode tensors keep no version counter; for them the in-place check is skipped.
    return None if tensor.is_inference() else tensor._version


class FeatureHooks:
    """Records the features at ``paths`` on every forward call of ``model`` until ``pop()``.

    Hooks are registered on construction and removed by ``remove()`` or on leaving a ``with``
    block. Captures accumulate over calls (a batch run as sub-batches) and are held until
    ``pop()`` or ``clear()``: pop every step, or they keep the graph and activations alive.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], clone: bool = False) -> None:
        if isinstance(paths, str):  # a lone string would be iterated character by character
            paths = [paths]
        self.paths = list(dict.fromkeys(paths))
        self.clone = clone
        modules = dict(model.named_modules())
        # Resolve every path before registering anything, so a bad path leaves no hook behind.
        targets = [(path, *self._resolve(model, modules, path)) for path in self.paths]
        self._captures: dict[str, list[tuple[torch.Tensor, int | None]]] = {path: [] for path in self.paths}
        self._handles = []
        for path, module, is_input in targets:
            if is_input:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(path)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(path)))

    @staticmethod
    def _resolve(model: nn.Module, modules: dict[str, nn.Module], path: str) -> tuple[nn.Module, bool]:
        name = path.removesuffix(_INPUT_SUFFIX)
        if name in modules:
            return modules[name], path.endswith(_INPUT_SUFFIX)
        names = [n for n in modules if n]
        listed = ", ".join(repr(n) for n in names[:_MAX_LISTED_NAMES])
        more = f", ... ({len(names) - _MAX_LISTED_NAMES} more)" if len(names) > _MAX_LISTED_NAMES else ""
        raise ValueError(
            f"no module {name!r} in {type(model).__name__} (from feature path {path!r}). A path is a dotted "
            f"module name as in model.get_submodule, optionally followed by '{_INPUT_SUFFIX}' to capture the "
            f"module's first input instead of its output. Modules: {listed}{more}"
        )

    def _store(self, path: str, value: object) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0] if value else None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"feature path {path!r} produced {type(value).__name__}, not a tensor")
        if self.clone:
            value = value.clone()
        self._captures[path].append((value, _version(value)))

    def _output_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._store(path, output)

        return hook

    def _input_hook(self, path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args:
                raise TypeError(f"feature path {path!r}: the module was called without a positional input")
            self._store(path, args[0])

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """``{path: feature}`` over all forward calls since the last pop, concatenated on dim 0; then clears.

        Raises if a path captured nothing (its module did not run) or a capture was modified in place.
        """
        missing = [path for path, captured in self._captures.items() if not captured]
        if missing:
            self.clear()
            raise RuntimeError(f"no features captured at {missing}: did the model run, and does it use those modules?")
        modified = [
            path
            for path, captured in self._captures.items()
            if any(version is not None and tensor._version != version for tensor, version in captured)
        ]
        if modified:
            self.clear()
            raise RuntimeError(
                f"the features at {modified} were modified in place after capture (e.g. by an inplace activation). "
                f"Hook the next module's '{_INPUT_SUFFIX}', a module whose output is not overwritten, or use clone=True."
            )
        features = {}
        for path, captured in self._captures.items():
            tensors = [tensor for tensor, _ in captured]
            features[path] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        self.clear()
        return features

    def clear(self) -> None:
        """Drop every capture (and with them the references to the activations)."""
        for captured in self._captures.values():
            captured.clear()

    def remove(self) -> None:
        """Unregister the hooks and drop the captures. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


@torch.no_grad()
def probe_features(net: nn.Module, paths: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features at ``paths`` of ``net`` on ``images``, in eval mode (BatchNorm statistics untouched)."""
    was_training = net.training
    net.eval()
    with FeatureHooks(net, paths) as hooks:
        net(images)
        features = hooks.pop()
    net.train(was_training)
    return features


def probe_pairs(student: nn.Module, teacher: nn.Module, pairs: Sequence[tuple[str, str]], in_channels: int,
                image_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The student's and the teacher's features of ``pairs`` on a probe batch of two blank images (to size the
    modules that map one to the other: FitNets connectors, VID regressors, CRD heads, ReviewKD's fusions)."""
    probe = torch.zeros(2, in_channels, image_size, image_size)
    student_features = probe_features(student, [s for s, _ in pairs], probe)
    teacher_features = probe_features(teacher, [t for _, t in pairs], probe)
    return [student_features[s] for s, _ in pairs], [teacher_features[t] for _, t in pairs]


"""Cost of one EMA update: labelwise's EMAModel, Lightning's EMAWeightAveraging path, a Python loop.

    python benchmarks/ema_overhead.py --device cpu --threads 1
    python benchmarks/ema_overhead.py --device cuda --repeats 200

Three ways of moving an average one step towards a model's weights, timed on WRN-28-2 and
ResNet-50 (median of ``--repeats`` timed calls after ``--warmup`` untimed ones):

* ``EMAModel.update``: one ``torch._foreach_lerp_`` per dtype/device group (``lightning_modules/core/ema.py``),
  with floating buffers averaged (``buffers="average"``, as Lightning's ``use_buffers=True``) and
  with buffers copied (``buffers="copy"``, the default).
* Lightning: what ``lightning.pytorch.callbacks.EMAWeightAveraging`` runs after each optimizer step,
  ``AveragedModel.update_parameters`` of an ``AveragedModel(model, use_buffers=True,
  avg_fn=get_ema_avg_fn(decay))``; with ``avg_fn`` it takes torch's per-tensor path.
* a Python loop over parameters and buffers: ``e.mul_(d).add_(p, alpha=1 - d)``.

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.core.ema import EMAModel  # noqa: E402
from lightning_modules.classification.networks import build_network  # noqa: E402

DECAY = 0.999


def _models() -> dict[str, Callable[[], nn.Module]]:
    import torchvision

    return {
        "WRN-28-2": lambda: build_network("wrn28_2", 10),
        "ResNet-50": lambda: torchvision.models.resnet50(weights=None),
    }


def _time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _emamodel(model: nn.Module, buffers: str) -> Callable[[], None]:
    ema = EMAModel(model, decay=DECAY, buffers=buffers)
    return lambda: ema.update(model)


def _lightning(model: nn.Module, device: torch.device) -> Callable[[], None]:
    # EMAWeightAveraging(decay) -> WeightAveraging(avg_fn=get_ema_avg_fn(decay), use_buffers=True)
    # -> in on_train_batch_end: self._average_model.update_parameters(pl_module)
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    callback = EMAWeightAveraging(decay=DECAY)
    averaged = AveragedModel(model, device=device, use_buffers=callback._use_buffers, **callback._kwargs)
    averaged.update_parameters(model)  # the first call only copies (n_averaged == 0)
    assert callback._kwargs["avg_fn"].__qualname__ == get_ema_avg_fn(DECAY).__qualname__
    return lambda: averaged.update_parameters(model)


def _loop(model: nn.Module) -> Callable[[], None]:
    import copy

    ema = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update() -> None:
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(DECAY).add_(p, alpha=1 - DECAY)
        for e, b in zip(ema.buffers(), model.buffers()):
            if e.is_floating_point():
                e.mul_(DECAY).add_(b, alpha=1 - DECAY)
            else:
                e.copy_(b)

    return update


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a shared CPU, 1 avoids OpenMP contention.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats} calls after {args.warmup} warm-up\n")
    print("| model | params (M) | tensors | update | median ms | x foreach |")
    print("|---|---:|---:|---|---:|---:|")
    for model_name, build in _models().items():
        model = build().to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        tensors = len(list(model.parameters())) + len(list(model.buffers()))
        rows = [
            ("EMAModel.update, foreach (buffers averaged)", _emamodel(model, "average")),
            ("EMAModel.update, foreach (buffers copied)", _emamodel(model, "copy")),
            ("Lightning EMAWeightAveraging (AveragedModel.update_parameters)", _lightning(model, device)),
            ("Python loop, mul_/add_ per tensor", _loop(model)),
        ]
        reference = None
        for label, fn in rows:
            ms = _time(fn, device, args.warmup, args.repeats)
            reference = reference or ms
            print(f"| {model_name} | {params:.1f} | {tensors} | {label} | {ms:.2f} | {ms / reference:.2f} |")


if __name__ == "__main__":
    main()

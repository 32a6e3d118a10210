"""CRD's own cost per training step at the CIFAR-10 CPU-table size, on one thread.

    python benchmarks/crd_cost.py

N 50,000 memory rows, batch 64, K 16384 negatives, feat_dim 128, 64-d student and 128-d teacher features
(wrn10_1 / wrn16_2 pooled): ``CRDLoss`` forward + backward + memory update on random features, and, for
comparison, one memory's scores as RepDistiller computes them (``crd/memory.py:39-42``: the drawn rows copied
out, ``B x (K + 1) x feat_dim``, then ``bmm``) against ours (``v @ memory^T`` gathered at the drawn indices).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.distillation.crd import CRDLoss, draw_contrast_indices  # noqa: E402

N, B, K, D = 50_000, 64, 16_384, 128


def median_ms(step, repeats: int = 10, warmup: int = 2) -> tuple[float, float]:
    times = []
    for k in range(warmup + repeats):
        start = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - start)
    times = sorted(times[warmup:])
    return 1000 * times[len(times) // 2], 1000 * times[0]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    crd = CRDLoss(64, 128, num_samples=N, feat_dim=D, nce_k=K)

    def crd_step(k: int) -> None:
        loss, observation = crd(torch.randn(B, 64, requires_grad=True), torch.randn(B, 128), torch.randint(N, (B,)), k)
        loss.backward()
        crd.update_(*observation)

    memory, v = torch.randn(N, D), torch.randn(B, D, requires_grad=True)
    contrast = draw_contrast_indices(torch.randint(N, (B,)), N, K, step=0)

    def gathered_rows(k: int) -> None:  # RepDistiller's way
        torch.bmm(memory[contrast.view(-1)].view(B, K + 1, D), v.view(B, D, 1)).div(0.07).exp().sum().backward()

    def gathered_scores(k: int) -> None:  # ours
        (v @ memory.T).gather(1, contrast).div(0.07).exp().sum().backward()

    for name, step, repeats in [("CRDLoss forward + backward + memory update", crd_step, 10),
                                ("one memory's scores, RepDistiller's gathered rows + bmm, fwd + bwd", gathered_rows, 3),
                                ("one memory's scores, ours (v @ memory^T).gather, fwd + bwd", gathered_scores, 10)]:
        median, best = median_ms(step, repeats)
        print(f"{name}: median {median:.0f} ms, min {best:.0f} ms over {repeats} steps", flush=True)


if __name__ == "__main__":
    main()

"""Distribution alignment (Berthelot et al., ICLR 2020, ReMixMatch), the piece AdaMatch, ReMixMatch and
SoftMatch share. Plain functions, no Lightning, no state of their own.

Alignment rescales a batch of class probabilities ``p`` so that their marginal moves from the model's
running marginal ``p_model`` to a target marginal ``p_target``:

    ``p~ = Normalize(p * (p_target + 1e-6) / (p_model + 1e-6))``.

The methods differ only in where the two marginals come from, and keep them as buffers of their own,
stepped with :func:`marginal_step` once per optimizer step (docs/design.md, "Running state"):

| method | ``p_model`` | ``p_target`` |
|---|---|---|
| ReMixMatch | mean of the last 128 batch means (a ring) | labeled class frequencies, fixed |
| SoftMatch | EMA of the batch means, started at the first batch | uniform |
| AdaMatch | EMA of the unlabeled (weak) batch means, from the first batch | EMA of the labeled batch means, from uniform |

USB keeps the same two variants as hooks (``semilearn/algorithms/hooks/dist_align.py``: ``DistAlignEMAHook``
lines 10-72, ``DistAlignQueueHook`` lines 77-155).
"""

from __future__ import annotations

import torch


def distribution_alignment(probs: torch.Tensor, model_marginal: torch.Tensor, target_marginal: torch.Tensor) -> torch.Tensor:
    """``normalize(p * (target + 1e-6) / (model + 1e-6))`` over dimension 1.

    The 1e-6 on both marginals is the authors' guard (google-research/remixmatch
    ``remixmatch_no_cta.py`` line 52; USB ``semilearn/algorithms/hooks/dist_align.py`` lines 31, 105).
    Classes on dimension 1, so per-pixel probabilities ``(N, C, H, W)`` align alike.
    """
    shape = (1, -1) + (1,) * (probs.ndim - 2)
    aligned = probs * ((target_marginal + 1e-6) / (model_marginal + 1e-6)).view(shape)
    return aligned / aligned.sum(dim=1, keepdim=True)


@torch.no_grad()
def marginal_step(marginal: torch.Tensor, probs: torch.Tensor, momentum: float) -> torch.Tensor:
    """One moving-average step of a class marginal towards the mean of ``probs`` (rows = samples), as a new tensor.

    ``m * marginal + (1 - m) * mean(probs)``; a marginal of all zeros has not started and becomes the
    batch mean itself (USB ``dist_align.py`` lines 48-51). A marginal started at uniform (AdaMatch's
    target, lines 55, 65) is never all zeros, so it is a plain moving average from uniform. The
    condition is a tensor: no host synchronization.
    """
    batch_mean = probs.mean(dim=0).to(marginal.dtype)
    started = marginal.sum() > 0
    return torch.where(started, marginal * momentum + batch_mean * (1.0 - momentum), batch_mean)

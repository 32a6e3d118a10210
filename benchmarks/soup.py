"""Greedy model soup of checkpoints, selected on held-out validation images, reported on the test set.

    python benchmarks/soup.py --checkpoints a.ckpt b.ckpt c.ckpt --data DigitsSSL \
        --data_kwargs '{"num_labeled": 50, "val_labeled_per_class": 5}' --metric val/acc --output soup.ckpt

The same command as ``labelwise soup`` / ``python train.py soup`` (``train.soup_main``; the soup itself is
``lightning_modules/fusion/``), kept here under its documented path. ``--help`` lists the arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import soup_main as main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    main()

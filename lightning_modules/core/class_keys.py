"""Class names as metric-key suffixes: ``test/ap_traffic_light`` rather than ``test/ap_class10``.

Loggers differ in which characters a key may hold (TensorBoard tags, W&B panel names), so a name
keeps only ASCII letters and digits, lower-cased, with ``_`` for every other run of characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_OTHER = re.compile(r"[^0-9a-z]+")


def class_keys(names: Sequence[str]) -> list[str]:
    """One key per label, in label order: ``"Traffic light"`` -> ``"traffic_light"``.

    A name with nothing left (empty, or no ASCII letter or digit) becomes ``class<label>``; a key
    already taken by an earlier label gets ``_<label>`` appended, so every label has its own key.
    """
    keys: list[str] = []
    for label, name in enumerate(names):
        key = _OTHER.sub("_", str(name).lower()).strip("_") or f"class{label}"
        while key in keys:
            key = f"{key}_{label}"
        keys.append(key)
    return keys

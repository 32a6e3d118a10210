"""``DataRoot``: the type of the DataModules' ``root`` and ``predict_root`` arguments.

In Python it is a plain ``str`` (pass any path). On the command line it marks the argument as a data
folder (``train.py`` calls :func:`register_data_roots` before parsing): a relative ``root``/``predict_root``
written in a config file is relative to that file's folder (jsonargparse reads a config file from inside
its folder), so ``configs/unet3plus_membrane.yaml``'s ``../../shared/data/membrane`` is the same folder
from anywhere; one typed on the command line is relative to the working folder, as every typed path is.
The recipes of a non-editable install live inside site-packages, which has no data next to it: their
relative roots resolve as if the recipes were in ``./configs`` under the working folder (``../data`` is
``./data``). Outputs (``default_root_dir``, checkpoint ``dirpath``, a teacher checkpoint written by an
earlier run) stay relative to the working folder: a run's files go where it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse.typing import register_type

_state: dict[str, Path | None] = {"recipes": None, "working_folder": None}
_registered: list[bool] = []


class DataRoot(str):
    """A data folder, as a ``str``; relative roots in a config file are relative to the file (see above)."""


def _absolute_root(value: str) -> DataRoot:
    folder = Path.cwd()  # a config file's folder while jsonargparse reads one, else the working folder
    recipes, working = _state["recipes"], _state["working_folder"]
    if recipes is not None and working is not None and not (recipes.parent / "pyproject.toml").is_file() \
            and folder.is_relative_to(recipes):  # an installed recipe: as if it were in ./configs
        folder = working / "configs" / folder.relative_to(recipes)
    return DataRoot(os.path.normpath(folder / Path(value).expanduser()))


def register_data_roots(recipes: Path) -> None:
    """Make the command line read ``DataRoot`` arguments as described above; call before parsing."""
    _state.update(recipes=recipes.resolve(), working_folder=Path.cwd())
    if not _registered:  # jsonargparse keeps one registration per type for the process
        register_type(DataRoot, serializer=str, deserializer=_absolute_root)
        _registered.append(True)

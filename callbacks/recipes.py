"""The recipes shipped with labelwise, found by name, and data roots that do not depend on the working folder.

``configs/`` sits beside ``train.py`` in the checkout and in an installed package alike (the wheel
ships it), so ``--config quickstart`` (or ``quickstart.yaml``, ``strategies/ddp``, or the checkout's
``configs/quickstart.yaml`` run from another folder) names ``<recipes>/quickstart.yaml`` when no
such file is in the working folder. A name that is neither a file nor a recipe is an error listing
the recipes.

Data roots (:class:`datamodules.data_root.DataRoot`): a relative ``root``/``predict_root`` written in
a config file is relative to that file's folder (jsonargparse reads a config file from inside its
folder), so ``configs/unet3plus_membrane.yaml``'s ``../../shared/data/membrane`` is the same folder
from anywhere; one typed on the command line is relative to the working folder. The recipes of a
non-editable install live inside site-packages, which has no data next to it: their relative roots
resolve as if the recipes were in ``./configs`` under the working folder (``../data`` is ``./data``).
Outputs (``default_root_dir``, checkpoint ``dirpath``, a teacher checkpoint written by an earlier run)
stay relative to the working folder: a run's files go where it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse.typing import register_type

from datamodules.data_root import DataRoot

CONFIG_FLAGS = ("--config", "-c")
_state: dict[str, Path | None] = {"recipes": None, "working_folder": None}
_registered: list[bool] = []


def recipe_names(recipes: Path) -> list[str]:
    """Every recipe's name: its path under ``recipes`` without ``.yaml`` (``quickstart``, ``strategies/ddp``)."""
    return sorted(str(path.relative_to(recipes).with_suffix("")) for path in recipes.rglob("*.yaml"))


def find_config(value: str, recipes: Path) -> str:
    """``value`` when it is a file or a config given inline, else the path of the recipe it names."""
    if Path(value).expanduser().is_file() or any(c in value for c in ":{\n"):  # inline YAML, URLs: jsonargparse's
        return value
    name = value.removeprefix("./").removeprefix("configs/")
    name = name[: -len(Path(name).suffix)] if Path(name).suffix in (".yaml", ".yml") else name
    recipe = recipes / f"{name}.yaml"
    if recipe.is_file():
        return str(recipe)
    raise ValueError(f"--config {value}: no such file, and no recipe of that name. The recipes are: "
                     f"{', '.join(recipe_names(recipes))} (or give the path of a YAML file)")


def find_configs(args: list[str], recipes: Path) -> list[str]:
    """``args`` with every ``--config``/``-c`` value that names a recipe replaced by the recipe's path."""
    found = list(args)
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag in CONFIG_FLAGS and equals:
            found[i] = f"{flag}={find_config(value, recipes)}"
        elif arg in CONFIG_FLAGS and i + 1 < len(args):
            found[i + 1] = find_config(args[i + 1], recipes)
    return found


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

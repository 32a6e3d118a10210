"""The recipes shipped with labelwise, found by name.

``configs/`` sits beside ``train.py`` in the checkout and in an installed package alike (the wheel
ships it), so ``--config quickstart`` (or ``quickstart.yaml``, ``strategies/ddp``, or the checkout's
``configs/quickstart.yaml`` run from another folder) names ``<recipes>/quickstart.yaml`` when no
such file is in the working folder. A name that is neither a file nor a recipe is an error listing
the recipes. Relative data roots in a recipe are read by :mod:`datamodules.data_root`.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FLAGS = ("--config", "-c")


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

"""The package layout and its import rules (docs/design.md, "Packages" and "Import rules"), read from the
source with ``ast``: what each package may import, that nobody imports another package's private names,
the size limits, and that the class paths of the flat layout before issue 16 still resolve."""

from __future__ import annotations

import ast
from importlib import import_module
from pathlib import Path

import pytest

import lightning_modules
from train import cli_main

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_modules", "datamodules", "callbacks")
FAMILIES = ("core", "classification", "ssl", "distillation", "segmentation", "detection", "fusion")

#: What each part may import from the three packages (itself included). core <- datamodules / tasks <-
#: method families <- train.py; callbacks/ import only core.
ALLOWED = {
    "core": {"core"},
    "datamodules": {"datamodules", "core"},
    "callbacks": {"callbacks", "core"},
    "classification": {"classification", "core"},
    "segmentation": {"segmentation", "core"},
    "detection": {"detection", "core"},
    "ssl": {"ssl", "classification", "core"},
    "distillation": {"distillation", "classification", "core"},
    "fusion": {"fusion", "core"},  # any module's checkpoints (Ensemble, the soup), loaded by class path
    "lightning_modules": set(FAMILIES),  # the package's __init__: every public class
}
#: The documented exceptions (docs/design.md, "Import rules"), each a file and the parts it may import
#: beyond its package's rule. FixMatch and Mean Teacher per pixel reuse the methods of ssl/. Core imports no
#: task: the task is composed (core/task.py), not the base.
EXCEPTIONS = {
    "lightning_modules/segmentation/semi_supervised.py": {"ssl"},
}
#: The core pieces callbacks/ use: files written whole, checkpoints read under the one policy, the shared
#: weight average, BatchNorm re-estimation after averaging (SWA), metric keys of class names.
CALLBACKS_IMPORT = {"lightning_modules.core.atomic", "lightning_modules.core.checkpoint_loading",
                    "lightning_modules.core.ema", "lightning_modules.core.batch_norm_estimation",
                    "lightning_modules.core.class_keys"}


def _sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def _part(module: str) -> str | None:
    """The part of the layout a module belongs to (``core``, ``ssl``, ``datamodules``, ...), or ``None``."""
    parts = module.split(".")
    if parts[0] in ("datamodules", "callbacks"):
        return parts[0]
    if parts[0] != "lightning_modules":
        return None
    if len(parts) == 1:
        return "lightning_modules"
    return parts[1] if parts[1] in FAMILIES else "lightning_modules"


def _module_of(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    names = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(names)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for every import in ``path``, relative ones made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def _parts_imported(module: str, names: list[str]) -> set[str]:
    if module == "lightning_modules" and names:  # from lightning_modules import ssl / FixMatch
        return {_part(f"{module}.{name}") for name in names}
    return {_part(module)} - {None}


def test_imports_flow_one_way():
    broken = []
    for path in _sources():
        source = str(path.relative_to(REPO))
        own = _part(_module_of(path))
        allowed = ALLOWED[own] | EXCEPTIONS.get(source, set())
        for module, names, line in _imports(path):
            for target in _parts_imported(module, names) - allowed:
                broken.append(f"{source}:{line} imports {module} ({target}; {own} may import {sorted(allowed)})")
    assert not broken, "\n".join(broken)


def test_callbacks_import_only_the_documented_core_pieces():
    imported = {module for path in (REPO / "callbacks").rglob("*.py") for module, _, _ in _imports(path)
                if module.startswith("lightning_modules")}
    assert imported == CALLBACKS_IMPORT


def _private(module: str, names: list[str]) -> tuple[str, list[str]]:
    """The package owning the private names or module imported, and those names (none: nothing private)."""
    parts = module.split(".")
    first = next((i for i, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")), None)
    if first is not None:
        return ".".join(parts[:first]), [parts[first]]
    return module.rpartition(".")[0] or module, [n for n in names if n.startswith("_") and not n.startswith("__")]


def test_nobody_imports_another_packages_private_names():
    private = []
    for path in _sources():
        importer = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
        for module, names, line in _imports(path):
            owner, hidden = _private(module, names)
            if hidden and module.startswith(PACKAGES) and not (importer + ".").startswith(owner + "."):
                private.append(f"{path.relative_to(REPO)}:{line} imports {hidden} of {owner} from {module}")
    assert not private, "\n".join(private)


def test_the_rules_see_what_they_must_refuse():  # rule tests pass on a reader that finds nothing
    imports = {module for module, _, _ in _imports(REPO / "callbacks" / "wandb_run.py")}
    assert {"lightning_modules.core.atomic", "lightning_modules.core.class_keys"} <= imports
    relative = _imports(REPO / "lightning_modules" / "segmentation" / "networks" / "unet3plus" / "model.py")
    assert ("lightning_modules.segmentation.networks._base", ["EncoderDecoderModel"], 15) in relative
    # what main had: callbacks reading datamodules, core reading callbacks, a method from the package root
    assert _parts_imported("datamodules.split", ["atomic_path"]) - ALLOWED["callbacks"] == {"datamodules"}
    assert _parts_imported("callbacks.ema", ["EMAModel"]) - ALLOWED["core"] == {"callbacks"}
    assert _parts_imported("lightning_modules", ["kd_losses"]) - ALLOWED["distillation"] == {"lightning_modules"}
    assert _parts_imported("lightning_modules.ssl.fixmatch", ["FixMatch"]) - ALLOWED["segmentation"] == {"ssl"}
    # a private name of another package is refused, one of the importer's own package is not
    assert _private("datamodules.sampling", ["StreamSampler", "_world_and_rank"]) == (
        "datamodules", ["_world_and_rank"])
    assert _private("lightning_modules.segmentation.networks._base", ["X"]) == (
        "lightning_modules.segmentation.networks", ["_base"])


def _datamodule_reads(source: str) -> tuple[list[int], list[tuple[int, str]]]:
    """Lines of ``source`` that reach a DataModule (``x.datamodule``, ``getattr(x, "datamodule")``), and the
    private names read through one (``.datamodule._x``, or through a name bound to it: ``dm = ...datamodule``)."""
    tree = ast.parse(source)

    def reaches(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "datamodule":
            return True
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "datamodule")

    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None \
                and any(reaches(n) for n in ast.walk(node.value)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            aliases |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}

    def is_datamodule(node: ast.AST) -> bool:
        return reaches(node) or (isinstance(node, ast.Name) and node.id in aliases)

    def private(name: object) -> bool:
        return isinstance(name, str) and name.startswith("_") and not name.startswith("__")

    lines, hidden = sorted({n.lineno for n in ast.walk(tree) if reaches(n)}), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_datamodule(node.value) and private(node.attr):
            hidden.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) > 1 and is_datamodule(node.args[0]) and isinstance(node.args[1], ast.Constant) \
                and private(node.args[1].value):
            hidden.append((node.lineno, node.args[1].value))
    return lines, hidden


def test_methods_learn_about_their_data_only_through_the_contract():
    """No method reads a DataModule (docs/design.md, "Model-data contract"): they get ``data_facts`` in
    ``setup`` (lightning_modules/core/data_contract.py), so only core reaches ``trainer.datamodule``, and
    nobody in lightning_modules reads a DataModule's private names through it."""
    outside_core, hidden = [], []
    for path in sorted((REPO / "lightning_modules").rglob("*.py")):
        lines, private = _datamodule_reads(path.read_text())
        where = str(path.relative_to(REPO))
        if lines and not where.startswith("lightning_modules/core/"):
            outside_core += [f"{where}:{line}" for line in lines]
        hidden += [f"{where}:{line} reads {name}" for line, name in private]
    assert not outside_core and not hidden, "\n".join(
        ["methods reach the DataModule (use self.data_facts):", *outside_core, "private names read:", *hidden])


def test_the_datamodule_rule_sees_what_main_did():
    remixmatch = (  # ReMixMatch.labeled_class_marginal on main (34d5f8b)
        "trainer = getattr(self, '_trainer', None)\n"
        "dm = getattr(trainer, 'datamodule', None) if trainer is not None else None\n"
        "train, split = getattr(dm, '_train', None), getattr(dm, 'split', None)\n")
    assert _datamodule_reads(remixmatch) == ([2], [(3, "_train")])
    flexmatch = "datamodule = getattr(self.trainer, 'datamodule', None)\ndataset = datamodule.unlabeled_dataset()\n"
    assert _datamodule_reads(flexmatch) == ([1], [])
    assert _datamodule_reads("n = len(self.trainer.datamodule._train[0])\n") == ([1], [(1, "_train")])
    assert _datamodule_reads("facts = self.data_facts\n") == ([], [])


def test_lightning_modules_top_level_holds_at_most_six_files_and_no_file_is_over_300_lines():
    assert len(list((REPO / "lightning_modules").glob("*.py"))) <= 6
    long = {str(path.relative_to(REPO)): n for path in _sources() if (n := len(path.read_text().splitlines())) > 300}
    assert not long


def test_old_module_paths_name_the_same_classes():
    # A class path of the flat layout (a config, --model, a checkpoint's _class_path) still resolves.
    assert len(lightning_modules.MOVED_MODULES) == 21  # 20 of the flat layout, and ensemble.py (into fusion/)
    for old, new in lightning_modules.MOVED_MODULES.items():
        assert import_module(f"lightning_modules.{old}") is import_module(f"lightning_modules.{new}")
    moved = {f"lightning_modules.{new}": f"lightning_modules.{old}"
             for old, new in lightning_modules.MOVED_MODULES.items()}
    added_after_the_move = {"AdaMatch", "Dash", "DeFixMatch", "ReFixMatch", "CPS",  # never had a flat-layout path
                            "LabelPropagation", "SimMatch", "CoMatch", "SimMatchV2", "CRMatch", "SequenceMatch",
                            "MultiMatch", "LadderNetwork", "LadderGamma", "DeepCoTraining", "UniMatch", "SoftTeacher"}
    for name in set(lightning_modules.MODELS) - added_after_the_move:
        cls = getattr(lightning_modules, name)
        assert getattr(import_module(moved[cls.__module__]), name) is cls
    from lightning_modules.semi_supervised_segmentation import SegFixMatch  # the from-import form too

    assert SegFixMatch is lightning_modules.SegFixMatch


def test_an_old_class_path_on_the_command_line_builds_the_class(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model", "lightning_modules.fixmatch.FixMatch", "--data", "DigitsSSL", "--print_config"])
    assert "class_path: lightning_modules.fixmatch.FixMatch" in capsys.readouterr().out
    cli = cli_main(["--model", "lightning_modules.fixmatch.FixMatch", "--data", "DigitsSSL", "--model.network", "wrn10_1"],
                   run=False)
    assert type(cli.model) is lightning_modules.FixMatch


#: The labeled/unlabeled skeleton, defined only by the base (datamodules/labeled_unlabeled.py, issue 16).
DATAMODULE_SKELETON = {"setup", "_stream", "train_dataloader", "test_dataloader", "on_after_batch_transfer",
                       "requested_unlabeled_views"}


def test_the_datamodule_skeleton_is_written_once():
    import datamodules
    from datamodules.labeled_unlabeled import LabeledUnlabeledDataModule

    assert all(issubclass(getattr(datamodules, name), LabeledUnlabeledDataModule) for name in datamodules.DATAMODULES)
    written = {}
    for path in (REPO / "datamodules").rglob("*.py"):
        defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
        if defined & DATAMODULE_SKELETON:
            written[str(path.relative_to(REPO))] = sorted(defined & DATAMODULE_SKELETON)
    assert written == {"datamodules/labeled_unlabeled.py": sorted(DATAMODULE_SKELETON)}


def test_old_datamodule_paths_name_the_same_classes(capsys):
    # LightningCLI saves a DataModule chosen by name with its module's path (a run's config.yaml, a checkpoint).
    import datamodules

    for old, new in datamodules.MOVED_MODULES.items():
        assert import_module(f"datamodules.{old}") is import_module(f"datamodules.{new}")
    for old, name in (("torchvision_sets", "CIFAR10SSL"), ("digits", "DigitsSSL"), ("image_folder", "ImageFolderSSL"),
                      ("segmentation_folders", "SegmentationFolders"), ("coco_detection", "COCODetection"),
                      ("base", "SSLDataModule")):
        assert getattr(import_module(f"datamodules.{old}"), name) is getattr(datamodules, name)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model", "Supervised", "--data", "datamodules.digits.DigitsSSL", "--print_config"])
    assert "class_path: datamodules.digits.DigitsSSL" in capsys.readouterr().out

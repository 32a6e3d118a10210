"""The ``labelwise`` command and the recipes it ships: recipes by name from any folder, data roots in a
config relative to the config file, and a non-editable ``pip install`` (a wheel built from a copy of
the checkout, installed into a scratch environment) whose ``labelwise`` trains the quickstart in /tmp."""

from __future__ import annotations

import importlib.util
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from train import cli_main

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_SHARED = REPO.parent / "shared" / "data"
SOURCES = ("pyproject.toml", "README.md", "train.py", "lightning_modules", "datamodules", "callbacks", "configs")


def _error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli_main(args)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_a_recipe_by_name_from_any_folder_and_an_unknown_name_lists_them(capsys, tmp_path):
    for name in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml"):  # tmp_path has no configs/
        with pytest.raises(SystemExit):
            cli_main(["fit", "--config", name, "--config", "strategies/ddp_cpu", "--print_config"])
        out = capsys.readouterr().out
        assert "class_path: lightning_modules.FixMatch" in out and "default_root_dir: runs/quickstart" in out
        assert "strategy: ddp" in out  # the fragment under configs/strategies, by name too
    err = _error(capsys, ["fit", "--config", "quickstrat"])
    assert "--config quickstrat: no such file, and no recipe of that name" in err
    assert "quickstart," in err and "strategies/ddp" in err and "unet3plus_membrane" in err


def test_relative_data_roots_in_a_config_are_relative_to_the_file_from_any_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "seg.yaml").write_text(
        "model: {class_path: lightning_modules.Segmenter, init_args: {network: Unet}}\n"
        "data: {class_path: datamodules.SegmentationFolders, init_args: {root: ../membrane, predict_root: ../new}}\n")
    roots = []
    for cwd in (tmp_path, project / "configs", Path("/")):
        monkeypatch.chdir(cwd)
        data = cli_main(["--config", str(project / "configs" / "seg.yaml")], run=False).datamodule
        roots.append((str(data.root), str(data.predict_root)))
    assert roots == [(str(project / "membrane"), str(project / "new"))] * 3
    monkeypatch.chdir(project)  # typed on the command line: relative to the working folder
    data = cli_main(["--config", "configs/seg.yaml", "--data.root", "elsewhere"], run=False).datamodule
    assert str(data.root) == str(project / "elsewhere") and str(data.predict_root) == str(project / "new")
    # the shipped recipe, by name from tmp_path: the shared data beside the checkout
    monkeypatch.chdir(tmp_path)
    data = cli_main(["--config", "unet3plus_membrane"], run=False).datamodule
    assert Path(data.root) == (REPO / "configs" / ".." / ".." / "shared" / "data" / "membrane").resolve()
    assert Path(data.root) == CHECKOUT_SHARED.resolve() / "membrane"


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"  # a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    offline = importlib.util.find_spec("setuptools") is not None  # build with this environment's setuptools
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *(["--no-build-isolation"] * offline),
                          "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return next((tmp_path / "wheel").glob("labelwise-*.whl"))


def test_pip_install_ships_the_recipes_and_labelwise_trains_the_quickstart_from_tmp(tmp_path):
    wheel = _build_wheel(tmp_path)
    env = tmp_path / "env"  # a scratch environment that sees this one's packages, but not its labelwise
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    env_site = Path(subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                            text=True).strip())
    (env_site / "shared_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert (env_site / "configs" / "quickstart.yaml").is_file() and (env_site / "configs" / "strategies").is_dir()

    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run([env / "bin" / "labelwise", "fit", "--config", "quickstart", "--trainer.max_steps", "2",
                          "--data.steps_per_epoch", "2", "--trainer.limit_val_batches", "1",
                          "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"],
                         cwd=work, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert re.match(r"fit: test/acc \d\.\d{4} on the EMA weights .* \| checkpoint runs/quickstart/", summary), summary
    assert (work / "runs" / "quickstart" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    where = subprocess.check_output([python, "-c", "import train; print(train.__file__, train.RECIPES)"], text=True,
                                    cwd=work).split()
    assert where == [str(env_site / "train.py"), str(env_site / "configs")]  # the installed copy, not the checkout
    config = subprocess.run([env / "bin" / "labelwise", "fit", "--config", "fixmatch_cifar10", "--print_config"],
                            cwd=work, capture_output=True, text=True)
    assert f"root: {work / 'data'}\n" in config.stdout, config.stderr[-2000:]  # not into site-packages

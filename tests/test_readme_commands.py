"""Every command in README.md's code blocks runs as written, with tiny step counts (issue 15, "Done when").

The commands are parsed from the README's code blocks and run one by one, in README order, each in
its own subprocess, in one temporary copy of the checkout (``<tmp>/repo``, with ``<tmp>/shared/data``
the shared data beside it, as in the checkout's layout), so that a command finds what earlier ones
wrote: a run's ``last.ckpt``, the teacher checkpoint, ``data/membrane_cells``. Each must exit with
status 0, and a ``fit``/``validate``/``test`` must end with the run's summary line. What differs from
typing them, and why:

* appended: tiny step counts and batches (``TINY``); the recipes run for hours to months;
* CIFAR-10 (a recipe whose data is ``CIFAR10SSL``, ``--data CIFAR10SSL``, ``--data.download true``):
  nothing can be downloaded here, so these read the shared CIFAR-10 JPEGs through ``ImageFolderSSL``
  instead (410 training and 10 test images per class, enough for 4,000 labels): ``--data CIFAR10SSL``
  becomes ``--data ImageFolderSSL``, ``--data.download true`` becomes ``--data.root <folder>``, and a
  recipe gets ``--data ImageFolderSSL --data.root <folder>`` after its ``--config``; the README's
  placeholder ``/path/to/tree`` is that folder too;
* ``labelwise ...`` runs as ``python -c 'from train import main; main()' ...`` in the copy: the entry
  point ``pip install`` puts on the PATH (``tests/test_package.py`` installs a wheel and runs the real
  command);
* skipped: ``pip ...`` (it installs packages; ``.ci/run`` runs the README's install command) and
  ``python -m pytest`` (this test is part of that run). Any other kind of command fails the test
  until it is run or given a reason here.

Slow: about 6 minutes on 2 CPU cores (22 commands); ``-m "not readme"`` leaves it out.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.recipe_times import cifar_folder
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
COPIED = ("pyproject.toml", "README.md", "train.py", "lightning_modules", "datamodules", "callbacks", "configs",
          "benchmarks")
EVALUATE = ["--data.eval_batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false"]
TINY = {"fit": ["--trainer.max_steps", "2", "--data.steps_per_epoch", "2", "--data.batch_size", "2",
                "--trainer.enable_model_summary", "false", *EVALUATE],
        "validate": EVALUATE, "test": EVALUATE, "predict": EVALUATE}
SKIPPED = {"pip": "installs packages: .ci/run runs the README's install command",
           "python -m pytest": "runs the tests, this one among them"}
pytestmark = pytest.mark.readme


def readme_commands() -> list[list[str]]:
    """The words of every command in README.md's code blocks, in order (continuation lines joined)."""
    fences = re.findall(r"^```(\w*)\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    blocks = [block for language, block in fences if language in ("", "bash", "sh", "shell")]  # not ```text
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def skip_reason(words: list[str]) -> str | None:
    return next((reason for start, reason in SKIPPED.items() if " ".join(words).startswith(start)), None)


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _on_cifar_folder(args: list[str], cifar: Path) -> list[str]:
    """CIFAR-10 from the shared JPEGs, in place of torchvision's download (module docstring)."""
    args = [str(cifar) if arg == "/path/to/tree" else arg for arg in args]
    config, data = _value(args, "--config"), _value(args, "--data")
    if config is not None and not Path(config).is_file():  # a recipe by name
        config = f"configs/{config.removesuffix('.yaml')}.yaml"
    cifar_recipe = config is not None and "datamodules.CIFAR10SSL" in Path(config).read_text()
    if not (data == "CIFAR10SSL" or (data is None and cifar_recipe)):
        return args
    if "--data.download" in args:
        at = args.index("--data.download")
        args[at:at + 2] = ["--data.root", str(cifar)]
    if _value(args, "--data") == "CIFAR10SSL":
        args[args.index("--data") + 1] = "ImageFolderSSL"
    else:
        at = len(args) - args[::-1].index("--config") + 1  # after the last --config and its file
        args[at:at] = ["--data", "ImageFolderSSL", *([] if "--data.root" in args else ["--data.root", str(cifar)])]
    return args


def command_line(words: list[str], cifar: Path) -> list[str]:
    """What to run for a README command (module docstring); unknown kinds fail."""
    if words[:2] == ["python", "train.py"] or words[0] == "labelwise":
        args = words[2:] if words[0] == "python" else words[1:]
        entry = ["train.py"] if words[0] == "python" else ["-c", "from train import main; main()"]
        if "--print_config" not in args:
            args = [*_on_cifar_folder(args, cifar), *TINY[args[0]]]
        return [sys.executable, *entry, *args]
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        return [sys.executable, *words[1:]]
    raise AssertionError(f"README command of a kind this test does not know: {shlex.join(words)}; "
                         "run it in command_line() or give a reason to skip it in SKIPPED")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """``<tmp>/repo``: a copy of the checkout, with the shared data at ``<tmp>/shared/data`` and a CIFAR-10
    folder of 410 training and 10 test JPEGs per class at ``<tmp>/cifar10``."""
    if not (SHARED_DATA / "cifar10" / "train.tar.gz").is_file():
        pytest.skip(f"{SHARED_DATA} has no CIFAR-10: put the shared data beside the repository")
    tmp = tmp_path_factory.mktemp("readme")
    (tmp / "repo").mkdir()
    for name in COPIED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, tmp / "repo" / name, ignore=shutil.ignore_patterns("__pycache__", ".cache"))
        else:
            shutil.copy(REPO / name, tmp / "repo" / name)
    (tmp / "shared").mkdir()
    (tmp / "shared" / "data").symlink_to(SHARED_DATA.resolve())
    cifar_folder(SHARED_DATA, tmp / "cifar10")  # the recipe-times benchmark's 410 + 10 JPEGs per class
    return tmp / "repo"


COMMANDS = readme_commands()


@pytest.mark.parametrize("words", COMMANDS, ids=[shlex.join(w)[:90] for w in COMMANDS])
def test_readme_command_runs_as_written(words, checkout, monkeypatch):
    reason = skip_reason(words)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(checkout)
    argv = command_line(words, checkout.parent / "cifar10")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PL_GLOBAL_SEED", None)
    run = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{shlex.join(argv)}\nexit status {run.returncode}:\n{output[-4000:]}"
    subcommand = next((w for w in argv if w in TINY), None)
    if subcommand in ("fit", "validate", "test") and "--print_config" not in argv:
        assert run.stdout.strip().splitlines()[-1].startswith(f"{subcommand}: "), output[-2000:]


def test_readme_shows_the_labelwise_command_and_the_cpu_only_torch_install():
    words = [" ".join(w) for w in COMMANDS]
    assert any(w.startswith("labelwise fit --config quickstart") for w in words)
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in words

"""`train.py predict` writes classification predictions (callbacks.PredictionWriter, on by default): a CSV
for the test set or for a folder of new images (--data.predict_root), read back with the csv module;
bad folders stop with clear errors; a chosen output folder is replaced whole; two DDP ranks write
one merged CSV with every image once."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules import DigitsSSL
from train import cli_main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(root: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.steps_per_epoch", "4", "--data.batch_size", "8", "--data.eval_batch_size", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A quickstart FixMatch checkpoint (4 steps) and its run root."""
    root = tmp_path_factory.mktemp("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cli = cli_main(["fit", *_quick(root), "--trainer.max_epochs", "1", "--test_after_fit", "false"])
    torch.set_num_threads(threads)
    return root, next(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """The first 7 test digits as grey PNGs (5 at the top, 2 in a subfolder), pixel for pixel."""
    folder = tmp_path_factory.mktemp("new_digits")
    images, _ = DigitsSSL().load_test()
    for i in range(7):
        path = folder / ("sub" if i in (2, 5) else ".") / f"digit{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(images[i, 0].numpy()).save(path)
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _probs(row: dict) -> torch.Tensor:
    return torch.tensor([float(row[f"prob_{c}"]) for c in range(10)])


def test_predict_writes_a_csv_for_the_test_set_and_for_a_folder(trained, digit_folder, capsys):
    root, ckpt = trained
    cli = cli_main(["predict", *_quick(root), "--ckpt_path", str(ckpt)])
    path = Path(cli.trainer.log_dir) / "predictions" / "predictions.csv"
    assert f"450 images classified: {path}" in capsys.readouterr().out  # it says where they went
    rows = _rows(path)
    returned = cli.trainer.predict_loop.predictions
    probs = torch.cat([p["probs"] for p in returned])
    _, targets = DigitsSSL().load_test()
    assert [int(r["index"]) for r in rows] == list(range(450))
    assert [r["target"] for r in rows] == [str(int(t)) for t in targets]
    table = torch.stack([_probs(r) for r in rows])
    torch.testing.assert_close(table, probs, atol=1e-6, rtol=0)
    assert [r["predicted"] for r in rows] == [str(int(c)) for c in probs.argmax(dim=1)]
    assert torch.allclose(table.sum(dim=1), torch.ones(450), atol=1e-4)

    cli = cli_main(["predict", *_quick(root), "--ckpt_path", str(ckpt), "--data.predict_root", str(digit_folder)])
    folder_rows = _rows(Path(cli.trainer.log_dir) / "predictions" / "predictions.csv")
    names = ["digit0.png", "digit1.png", "digit3.png", "digit4.png", "digit6.png", "sub/digit2.png", "sub/digit5.png"]
    assert [r["file"] for r in folder_rows] == names and "target" not in folder_rows[0]
    for row in folder_rows:  # the same pixels as test digit i: the same prediction
        i = int(row["file"].split("digit")[1][0])
        torch.testing.assert_close(_probs(row), table[i], atol=1e-5, rtol=0)
        assert row["predicted"] == rows[i]["predicted"]


def _bad_folder(folder: Path, kind: str) -> Path:
    if kind == "missing":
        return folder / "missing"
    if kind == "no images":
        (folder / "notes.txt").write_text("not an image")
    if kind == "truncated":
        (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
    if kind == "same name":
        digit = Image.fromarray(DigitsSSL().load_test()[0][0, 0].numpy())
        digit.save(folder / "a.png")
        digit.save(folder / "a.bmp")
    return folder


@pytest.mark.parametrize(("kind", "error", "match"), [
    ("empty", ValueError, r"predict_root .* holds no images .*\(it is empty\): put the images to predict there"),
    ("missing", FileNotFoundError, r"predict_root .*missing does not exist: pass the folder of images"),
    ("no images", ValueError, r"holds no images .*\(it holds \['notes.txt'\]"),
    ("truncated", ValueError, r"DigitsSSL: cannot decode image .*cut\.png .*: replace or remove it"),
    ("same name", ValueError, r"a\.bmp and .*a\.png differ only in their suffix, so their predictions would share"),
])
def test_bad_predict_folders_stop_with_a_clear_error(trained, tmp_path, kind, error, match):
    root, ckpt = trained
    folder = tmp_path / "new"
    folder.mkdir()
    with pytest.raises(error, match=match):
        cli_main(["predict", *_quick(root), "--ckpt_path", str(ckpt), "--data.predict_root",
                  str(_bad_folder(folder, kind))])


def test_a_chosen_output_folder_is_replaced_whole(trained, digit_folder, tmp_path):
    root, ckpt = trained
    out = tmp_path / "out"
    writer = ["--trainer.callbacks+=PredictionWriter", f"--trainer.callbacks.output_dir={out}"]
    cli = cli_main(["predict", *_quick(root), "--ckpt_path", str(ckpt), "--data.predict_root", str(digit_folder),
                    *writer])
    assert len(_rows(out / "predictions.csv")) == 7
    assert not (Path(cli.trainer.log_dir) / "predictions").exists()  # the configured writer replaces the default
    cli_main(["predict", *_quick(root), "--ckpt_path", str(ckpt), "--data.predict_root", str(digit_folder / "sub"),
              *writer])
    assert [r["file"] for r in _rows(out / "predictions.csv")] == ["digit2.png", "digit5.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left


def test_two_ddp_ranks_write_one_csv_with_every_image_once(trained, digit_folder, tmp_path):
    """`train.py predict` on two CPU processes (Lightning launches the second, gloo): 7 images in
    batches of 2 split 4 / 3 between the ranks; rank 0 merges them into the one-process CSV."""
    root, ckpt = trained
    base = ["predict", *_quick(root), "--ckpt_path", str(ckpt), "--data.predict_root", str(digit_folder),
            "--data.eval_batch_size", "2"]
    single = cli_main(base + ["--trainer.callbacks+=PredictionWriter",
                              f"--trainer.callbacks.output_dir={tmp_path / 'one'}"])
    assert single.trainer.world_size == 1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *base, "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp",
                           "--trainer.callbacks+=PredictionWriter", f"--trainer.callbacks.output_dir={tmp_path / 'two'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 1/2" in done.stderr and "MEMBER: 2/2" in done.stderr  # two processes did predict
    assert done.stdout.count("Predictions written: 7 images classified") == 1  # rank 0 only
    one, two = _rows(tmp_path / "one" / "predictions.csv"), _rows(tmp_path / "two" / "predictions.csv")
    assert [r["file"] for r in two] == [r["file"] for r in one] and len(two) == 7
    for a, b in zip(one, two):
        torch.testing.assert_close(_probs(a), _probs(b), atol=1e-5, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

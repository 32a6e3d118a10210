"""Bad names and bad weight files give one clear error naming the problem and the fix
(docs/robustness.md): unknown --model/--data/network names on the command line, unknown timm
models, and teacher or detector weight files that are missing, truncated or not weights."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_modules import Detector, KDStudent, Supervised
from lightning_modules.classification.networks import build_network
from tests.ssl_helpers import SMALL_NET
from train import cli_main


@pytest.mark.parametrize("args, flag", [(["--model", "Foo", "--data", "DigitsSSL"], "--model"),
                                        (["--model", "FixMatch", "--data=Foo"], "--data")])
def test_unknown_model_or_data_name_lists_the_names(capsys, args, flag):
    with pytest.raises(SystemExit):
        cli_main(["fit", *args])
    err = capsys.readouterr().err
    assert f"unknown {flag} 'Foo': choose one of" in err
    assert ("FixMatch, FlexMatch" if flag == "--model" else "DigitsSSL, CIFAR10SSL") in err


@pytest.mark.parametrize("args, match", [
    (["--model", "Supervised", "--data", "DigitsSSL", "--model.network", "foo"], "unknown network 'foo'. Valid forms"),
    (["--model", "Segmenter", "--data", "DigitsSSL", "--model.network", "unet4"], "unknown segmentation network 'unet4'"),
])
def test_unknown_network_name_on_the_command_line(args, match):
    with pytest.raises(ValueError, match=match):
        cli_main(["fit", *args, "--trainer.max_steps", "1", "--trainer.logger", "false"])


def test_unknown_timm_model_lists_similar_names():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet999' in 'timm:resnet999'.*similar: .*resnet18"):
        build_network("timm:resnet999", num_classes=10)


def _truncated_weights(path) -> None:
    buffer = io.BytesIO()
    torch.save(Supervised(**SMALL_NET).net.state_dict(), buffer)
    path.write_bytes(buffer.getvalue()[:1000])


@pytest.mark.parametrize("damage, reason", [("garbage", "Unsupported operand"), ("truncated", "PytorchStreamReader")])
def test_teacher_file_that_is_not_weights(tmp_path, damage, reason):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"not a checkpoint") if damage == "garbage" else _truncated_weights(path)
    with pytest.raises(ValueError, match=rf"teacher file .*teacher\.pt cannot be read as weights \({reason}.*\): it is "
                                         r"cut short, not a torch.save file"):
        KDStudent(teacher=str(path), teacher_network="wrn10_1", network="wrn10_1", num_classes=10, in_channels=1)


def test_detector_weights_path_missing_or_not_weights(tmp_path):
    small = dict(network="fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, min_size=128, max_size=128)
    with pytest.raises(FileNotFoundError, match=r"weights_path .*missing\.pt does not exist"):
        Detector(weights_path=str(tmp_path / "missing.pt"), **small)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"weights_path .*garbage\.pt cannot be read as weights"):
        Detector(weights_path=str(tmp_path / "garbage.pt"), **small)


def test_unknown_smp_encoder_is_smps_own_error_listing_the_encoders():
    from lightning_modules.segmentation.networks import build_segmentation_network

    with pytest.raises(KeyError, match=r"Wrong encoder name `resnet999`, supported encoders: \['resnet18'"):
        build_segmentation_network("Unet", encoder_name="resnet999")

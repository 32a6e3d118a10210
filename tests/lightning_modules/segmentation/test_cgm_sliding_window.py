"""Sliding-window inference of UNet 3+ with the CGM, through Segmenter.segment, on a real membrane
slice whose right half is blanked: the blank window is "absent", its neighbours "present"."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.segmentation.sliding_window import sliding_window_inference
from lightning_modules import Segmenter
from lightning_modules.segmentation.networks.unet3plus import ABSENT_LOGIT

WINDOW = 64  # windows start at x = 0, 32 and 64 on a 128-wide image (overlap 0.5)


@pytest.fixture()
def model_and_image(shared_data):
    path = shared_data / "membrane" / "image" / "0.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255)[None, None, :64, :128]
    image[..., 64:] = 0.0  # blank: with fresh BatchNorm statistics every feature of a blank window is 0
    torch.manual_seed(0)
    model = Segmenter(network="unet3plus", network_kwargs={"encoder_name": "resnet18", "cgm": True},
                      sliding_window=WINDOW, window_overlap=0.5, ema_decay=None, log_images=0)
    net = model.eval_net.eval()
    conv = net.classification_head[1]  # "present" (channel 1) grows with the deepest features; "absent" is 0.5
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1] = 1.0
        conv.bias.copy_(torch.tensor([0.5, 0.0]))
        net.segmentation_head[0].bias.copy_(torch.tensor([0.0, 3.0]))  # lean to foreground, so there is some
    return model, image


def verdicts(net, image) -> list[bool]:
    """The CGM's "present" verdict on each window, alone."""
    present = []
    for x in (0, 32, 64):
        net(image[..., x:x + WINDOW])
        present.append(bool(net.last_presence.argmax(dim=1) == 1))
    return present


@torch.no_grad()
def test_an_absent_window_no_longer_wipes_its_neighbours_foreground(model_and_image):
    model, image = model_and_image
    net = model.eval_net
    assert verdicts(net, image) == [True, True, False]
    ungated = copy.deepcopy(net)
    ungated.classification_head = None  # the same network without a CGM: an independent, ungated path
    expected = sliding_window_inference(ungated, image, window=WINDOW, overlap=0.5)
    logits = model.segment(image)
    overlap = (slice(None), slice(None), slice(None), slice(64, 96))  # the present window x=32 and the absent x=64
    assert (expected[overlap].argmax(dim=1) == 1).sum() > 100  # foreground the absent window must not wipe
    torch.testing.assert_close(logits[..., :96], expected[..., :96])
    only_absent = logits[..., 96:]  # covered by the absent window alone: an empty mask, as the gate makes it
    assert (only_absent[:, 0] == 0).all() and (only_absent[:, 1] == ABSENT_LOGIT).all()


@torch.no_grad()
def test_one_window_over_the_whole_image_is_the_networks_own_gate(model_and_image):
    model, image = model_and_image
    net = model.eval_net
    for crop in (image[..., :WINDOW], image[..., 64:]):  # present, then absent
        torch.testing.assert_close(model.segment(crop), net(crop))
    assert net.gate_absent  # the window pass turned the gate off only while it ran

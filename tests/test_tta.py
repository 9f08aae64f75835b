"""Test-time crops: where the crops land, the flips of 10-crop, and averaging over softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune.data.transforms import eval_transform
from finetune.errors import UserError
from finetune.data.crops import CropViews, ViewsDataset
from finetune.evaluation.tta import forward_views
from finetune.model.scoring import calibrated_probs

# mean 0 / std 1: tensor values are the pixel values / 255, so positions can be read back exactly.
CONFIG = {"input_size": [3, 32, 32], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "crop_pct": 0.8,
          "interpolation": "bilinear", "crop_mode": "center"}


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red encodes x, green encodes y: every crop says where it was cut from."""
    x = np.tile(np.arange(width, dtype=np.uint8)[None, :], (height, 1))
    y = np.tile(np.arange(height, dtype=np.uint8)[:, None], (1, width))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1), mode="RGB")


def origin(view: torch.Tensor) -> tuple[int, int]:
    """(x, y) of a crop's top-left pixel in the source image."""
    return round(float(view[0, 0, 0]) * 255), round(float(view[1, 0, 0]) * 255)


def test_five_crop_corners_and_centre_land_where_expected():
    # 60x40, shorter side already 32 / 0.8 = 40: the resize keeps the pixels, crops are 32x32.
    views = CropViews(CONFIG, "5crop")(coordinate_image(60, 40))
    assert views.shape == (5, 3, 32, 32)
    # torchvision order: top-left, top-right, bottom-left, bottom-right, centre.
    assert [origin(v) for v in views] == [(0, 0), (28, 0), (0, 8), (28, 8), (14, 4)]
    # Each crop is a contiguous window: x grows to the right, y downwards.
    tl = views[0]
    assert round(float(tl[0, 0, 31]) * 255) == 31 and round(float(tl[1, 31, 0]) * 255) == 31


def test_centre_view_is_exactly_the_eval_transform():
    img = coordinate_image(75, 50)
    expected = eval_transform(CONFIG)(img)
    assert torch.equal(CropViews(CONFIG, "center")(img)[0], expected)
    assert torch.equal(CropViews(CONFIG, "5crop")(img)[4], expected)
    assert torch.equal(CropViews(CONFIG, "none")(img)[0], expected)


def test_ten_crop_adds_horizontal_flips_of_the_five_crops():
    img = coordinate_image(60, 40)
    five = CropViews(CONFIG, "5crop")(img)
    ten = CropViews(CONFIG, "10crop")(img)
    assert ten.shape == (10, 3, 32, 32)
    assert torch.equal(ten[:5], five)
    flipped = ten[5:]
    for view in five:
        assert any(torch.equal(view.flip(-1), f) for f in flipped)
    # A flip reverses x: the mirrored top-left crop reads x = 31 at its left edge.
    assert origin(flipped[1].flip(-1)) == (0, 0)


def test_average_is_over_softmax_not_logits():
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = calibrated_probs(logits.view(2, 2, 3), temperature=1.0)
    expected = torch.stack([logits[:2].softmax(-1).mean(0), logits[2:].softmax(-1).mean(0)])
    assert torch.allclose(probs, expected)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert not torch.allclose(probs[0], logits[:2].mean(0).softmax(-1))  # the tempting wrong answer


class _Flat(nn.Module):
    """A classifier over flattened pixels, with timm's `get_classifier` (what the features hook reads)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_forward_views_forwards_batch_sized_chunks_and_keeps_images_apart():
    torch.manual_seed(0)
    net = _Flat()
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    views = torch.randn(3, 10, 3, 32, 32)
    logits, feats = forward_views(net, views)
    assert seen == [3] * 10  # 30 crops, as many per forward as images per batch
    assert logits.shape == (3, 10, 4) and feats.shape == (3, 10, 3 * 32 * 32)
    probs = calibrated_probs(logits)
    for b in range(3):
        assert torch.allclose(probs[b], net(views[b]).softmax(-1).mean(0), atol=1e-6)
        assert torch.allclose(feats[b], views[b].flatten(1))  # the classifier's input, per crop


def test_dataset_decodes_once_and_reports_bad_files(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    coordinate_image(50, 40).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    calls = []
    from finetune.data import crops as tta

    real = tta.load_rgb
    monkeypatch.setattr(tta, "load_rgb", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ds = ViewsDataset([str(good), str(bad)], CropViews(CONFIG, "10crop"), CONFIG)
    views, index, error = ds[0]
    assert views.shape == (10, 3, 32, 32) and index == 0 and error == ""
    views, index, error = ds[1]
    assert index == 1 and "not a readable image" in error and not views.any()
    assert calls == [str(good), str(bad)]  # one decode per image for all ten crops


@pytest.mark.parametrize("mode", ["3crop", "", "CENTER"])
def test_unknown_mode_is_a_user_error(mode):
    with pytest.raises(UserError, match="Valid values"):
        CropViews(CONFIG, mode)


def test_multi_crop_needs_a_centre_crop_transform():
    with pytest.raises(UserError, match="--tta center"):
        CropViews({**CONFIG, "crop_mode": "border"}, "5crop")  # timm pads instead of cropping

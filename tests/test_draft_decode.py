"""Large JPEGs are decoded at reduced scale (PIL draft) by every loader, never below the resize target."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from finetune.data import crops as tta
from finetune.data.transforms import resize_size
from finetune.data.loaders import FolderDataModule
from finetune.data.folders import scan_folder
from finetune.data.images import load_rgb


def _photo(path: Path, size=(1024, 768), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.radial_gradient("L").resize(size).convert("RGB").save(path, fmt)
    return path


@pytest.mark.parametrize("draft, expected", [
    (None, (1024, 768)),
    ((150, 150), (256, 192)),  # 1/4 scale: the shorter side 192 covers 150, 1/8 (96) would not
    ((300, 300), (512, 384)),  # 1/2 scale: the shorter side 384 covers 300, 1/4 (192) would not
    ((400, 400), (1024, 768)),  # 1/2 would give 384 < 400: full scale
])
def test_jpeg_draft_never_goes_below_the_target(tmp_path, draft, expected):
    assert load_rgb(_photo(tmp_path / "a.jpg"), draft_size=draft).size == expected


def test_png_is_always_decoded_at_full_size(tmp_path):
    assert load_rgb(_photo(tmp_path / "a.png", fmt="PNG"), draft_size=(100, 100)).size == (1024, 768)


def test_training_and_eval_loaders_decode_at_reduced_scale(tmp_path):
    for cls in ("a", "b"):
        for i in range(2):
            _photo(tmp_path / "data" / cls / f"{i}.jpg")
    splits = scan_folder(tmp_path / "data", val_fraction=0.5)
    dm = FolderDataModule(splits, None, None, batch_size=1, num_workers=0, draft_size=(300, 300))
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        img, _ = loader.dataset[0]
        assert img.size == (512, 384)


def test_prediction_decodes_once_at_reduced_scale(tmp_path, monkeypatch):
    data_config = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
                   "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_mode": "center"}
    decoded = []

    def recording_load(*args, **kwargs):
        img = load_rgb(*args, **kwargs)
        decoded.append(img.size)
        return img

    monkeypatch.setattr(tta, "load_rgb", recording_load)
    path = str(_photo(tmp_path / "big.jpg", size=(2048, 1536)))
    ds = tta.ViewsDataset([path], tta.CropViews(data_config, "10crop"), data_config)
    views, _, error = ds[0]
    assert error == "" and views.shape == (10, 3, 224, 224)
    assert resize_size(data_config) == 256
    assert decoded == [(512, 384)]  # one decode, at 1/4 scale: 384 >= 256

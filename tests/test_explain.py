"""Grad-CAM (finetune.evaluation.explain): maps for CNNs, ViTs and heads on earlier stages, where the
evidence is, the `finetune explain` command, batch prediction's --explain and the top-losses sheet."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from finetune.cli import cli
from finetune.data.transforms import eval_crop, eval_transform
from finetune.evaluation.evaluate import plot_top_losses
from finetune.errors import UserError
from finetune.evaluation.explain import (check_explainable, heatmaps, overlay, overlay_names, target_layer,
                                          token_reshape)
from finetune import tracking
from finetune.model.artifact import ModelSpec, save_model
from finetune.model.heads import StageClassifier
from finetune.tracking import registry
from serve.batch_predict import main as batch_main
from tests.conftest import TINY_MODEL, make_folder
from tests.model_helpers import DATA_CONFIG, logged_model


def tiny_vit() -> nn.Module:
    return timm.create_model("test_vit", num_classes=3, img_size=64)


NETWORKS = {
    "cnn": lambda: timm.create_model(TINY_MODEL, num_classes=3),
    "vit": tiny_vit,
    "cnn-stage-1": lambda: StageClassifier(timm.create_model(TINY_MODEL, num_classes=3), 1, 3),
    "vit-stage-2": lambda: StageClassifier(tiny_vit(), 2, 3),
}


@pytest.mark.parametrize("kind", NETWORKS)
def test_a_map_per_image_in_0_1_and_the_network_left_as_it_was(kind):
    torch.manual_seed(0)
    net = NETWORKS[kind]().train()
    frozen = next(net.parameters())
    frozen.requires_grad_(False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # as evaluation calls it: Grad-CAM turns gradients on for itself
        maps = heatmaps(net, images)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert (maps.max(axis=(1, 2)) - maps.min(axis=(1, 2)) > 0.1).all()  # a map, not a constant (zero gradients)
    assert net.training and not frozen.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in list(net.parameters())[1:])


def test_the_layer_is_the_stage_the_head_reads():
    net = StageClassifier(timm.create_model(TINY_MODEL, num_classes=3), 1, 3)
    assert target_layer(net) is net.trunk.layer1  # feature_info: act1, layer1, ...; index 1 is layer1
    assert target_layer(timm.create_model(TINY_MODEL, num_classes=3)).__class__ is nn.Sequential
    vit = tiny_vit()  # reads the class token: the last block's patch tokens get no gradient, its norm1 does
    assert target_layer(vit) is vit.blocks[-1].norm1


def test_overlay_names_never_overwrite_and_unexplainable_networks_are_refused():
    assert overlay_names(["a/x.png", "b/y.jpg", "c/x.jpg"]) == ["x_0_cam.png", "y_cam.png", "x_2_cam.png"]
    with pytest.raises(UserError, match="feature_info"):
        check_explainable(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))


def test_vit_tokens_go_back_to_the_patch_grid_in_order():
    vit = tiny_vit()  # 64 px, patch 16: a 4 x 4 grid after 1 class token
    tokens = torch.cat([torch.full((1, 1, 2), -1.0), torch.arange(16.0).view(1, 16, 1).expand(1, 16, 2)], dim=1)
    grid = token_reshape(vit, (64, 64))(tokens)
    assert grid.shape == (1, 2, 4, 4)
    assert torch.equal(grid[0, 0], torch.arange(16.0).view(4, 4))
    feature_map = torch.randn(1, 8, 4, 4)
    assert token_reshape(vit, (64, 64))(feature_map) is feature_map


class ColourNet(nn.Module):
    """Class 0: how much red there is, class 1: how much blue, each pooled over the whole image."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, -1, -1], [-1, -1, 1]]).view(2, 3, 1, 1))
            self.features[0].bias.zero_()
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()
        self.feature_info = [{"module": "features", "num_chs": 2, "reduction": 1}]

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_the_map_is_where_the_explained_class_is():
    """A red square on the left, a blue one on the right (non-square image: a transposed map fails)."""
    image = torch.zeros(1, 3, 48, 80)
    image[0, 0, 14:34, 4:24] = 1.0  # red, left
    image[0, 2, 14:34, 56:76] = 0.8  # blue, right (less of it: red is the prediction)
    left, right = (slice(14, 34), slice(4, 24)), (slice(14, 34), slice(56, 76))
    red, blue = heatmaps(ColourNet(), image.repeat(2, 1, 1, 1), targets=[0, 1])
    assert red[left].mean() > 0.9 and red[right].mean() < 0.1
    assert blue[right].mean() > 0.9 and blue[left].mean() < 0.1
    predicted = heatmaps(ColourNet(), image)[0]
    assert np.allclose(predicted, red)


def test_overlay_is_the_eval_crop_of_the_image():
    img = Image.new("RGB", (90, 50), (200, 30, 30))
    crop = eval_crop(DATA_CONFIG)(img)
    assert crop.size == (32, 32) and eval_transform(DATA_CONFIG)(img).shape[-2:] == (32, 32)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:, :16] = 1.0
    out = np.asarray(overlay(img, heat, DATA_CONFIG)).astype(int)
    assert out.shape == (32, 32, 3)
    assert (out[:, :16, 2] < out[:, 16:, 2]).all()  # JET: hot (red) where the map is 1, blue where it is 0


def test_explain_command_writes_overlays_and_reports_a_bad_image(tmp_path):
    uri = logged_model(tmp_path)
    folder = make_folder(tmp_path / "images", per_class=1)
    good = sorted(str(p) for p in folder.rglob("*.png"))
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = tmp_path / "cams"
    result = CliRunner().invoke(cli, ["explain", uri, good[0], str(bad), good[1], "--output", str(out)])
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cat_0_cam.png", "dog_0_cam.png"]
    assert str(out / "cat_0_cam.png") in result.output
    assert [line for line in result.output.splitlines() if "broken.png" in line][0].startswith("Error:")
    with Image.open(out / "cat_0_cam.png") as png:
        assert png.width == 32 and png.height > 32  # the crop under its title strip

    result = CliRunner().invoke(cli, ["explain", uri, good[0], "--output", str(out), "--target", "dog"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["explain", uri, good[0], "--target", "horse"])
    assert result.exit_code == 2 and "cat, dog" in result.output


def test_explain_command_on_a_logged_head_on_an_earlier_stage(tmp_path):
    """A small-* plan's model (the network cut after a stage, as load_model rebuilds it from model.json)."""
    net = StageClassifier(timm.create_model(TINY_MODEL, num_classes=2), 1, 2)
    spec = ModelSpec(architecture=TINY_MODEL, num_classes=2, class_names=["cat", "dog"], data_config=DATA_CONFIG,
                     head_stage=1)
    run = tracking.client().create_run(tracking.ensure_experiment("test"))
    uri = registry.log_pyfunc(run.info.run_id, save_model(tmp_path / "model", net, spec), ["cat", "dog"],
                              "center", {})
    image = make_folder(tmp_path / "images", per_class=1) / "dog" / "dog_0.png"
    result = CliRunner().invoke(cli, ["explain", uri, str(image), "--output", str(tmp_path / "cams")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cams" / "dog_0_cam.png").is_file()


def test_batch_prediction_explains_each_image_it_predicts(tmp_path):
    uri = logged_model(tmp_path)
    folder = make_folder(tmp_path / "images", per_class=2)
    (folder / "cat" / "broken.png").write_text("not an image")
    (folder / "dog" / "cat_0.png").write_bytes((folder / "cat" / "cat_0.png").read_bytes())  # same stem
    out, cams = tmp_path / "preds.csv", tmp_path / "cams"
    args = ["--model-uri", uri, "--input", str(folder), "--output", str(out), "--num-workers", "0"]
    result = CliRunner().invoke(batch_main, [*args, "--explain", str(cams)])
    assert result.exit_code == 0, result.output
    header = "path,label,score,top1_label,top1_score,top2_label,top2_score,ood_score,unknown,error"
    assert out.read_text().splitlines()[0] == header
    names = sorted(p.name for p in cams.iterdir())
    assert len(names) == 5 and not any("broken" in n for n in names)  # 5 decodable images, no overwrites
    assert {"cat_1_cam.png", "dog_0_cam.png", "dog_1_cam.png"} <= set(names)


def test_top_losses_sheet_has_heatmaps_or_says_why_not(tmp_path, caplog):
    folder = make_folder(tmp_path / "images", per_class=2)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.9, 0.1]])
    labels = np.array([0, 0, 1, 1])  # every image wrong
    net = timm.create_model(TINY_MODEL, num_classes=2)
    size = {}
    for name, model in [("with", net), ("none", None), ("unexplainable", nn.Sequential(nn.Flatten(), nn.LazyLinear(2)))]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            path = plot_top_losses(paths, probs, labels, ["cat", "dog"], tmp_path / f"{name}.png", net=model,
                                   data_config=DATA_CONFIG)
        with Image.open(path) as png:
            size[name] = png.size
        assert ("without Grad-CAM" in caplog.text) == (name != "with"), caplog.text
    assert size["with"][0] > 1.5 * size["none"][0]  # image | heatmap pairs
    assert size["unexplainable"] == size["none"]

"""Feature cache (reuse, invalidation), cached-feature heads == full-model predictions, stage-head
artifacts, and the dataset profile."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.model.artifact import ModelSpec, load_model, save_model
from finetune.data.transforms import eval_transform, resize_size
from finetune.model.backbone import create_backbone
from finetune.data.folders import scan_folder
from finetune.model.features import FINAL, cached_features, feature_stages
from finetune.model.heads import StageClassifier, load_linear
from finetune.data.images import load_rgb
from finetune.data.profile import profile_splits
from tests.conftest import make_folder

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]


def _backbone(model: str, num_classes: int = 2, size: int = 32):
    torch.manual_seed(0)
    return create_backbone(model, "none", num_classes, image_size=size)


def _images(backbone, samples) -> torch.Tensor:
    """The images as the model sees them: the eval preprocessing, same JPEG draft as the cache."""
    size = resize_size(backbone.data_config)
    t = eval_transform(backbone.data_config)
    return torch.stack([t(load_rgb(s.path, None, (size, size))) for s in samples])


def test_cache_is_reused_and_invalidated_when_a_file_changes(image_folder: Path, tmp_path: Path):
    splits = scan_folder(image_folder)
    bb = _backbone("test_resnet")
    kwargs = dict(batch_size=4, cache_dir=tmp_path / "cache")
    first = cached_features(bb, splits.train, **kwargs)
    assert first.extracted and first.seconds > 0
    assert set(first.arrays) == {s.key for s in feature_stages(bb.model)}
    assert first.arrays[FINAL].shape == (1, len(splits.train), bb.model.num_features)
    assert isinstance(first.arrays[FINAL], np.memmap)  # on disk, not in memory

    second = cached_features(bb, splits.train, **kwargs)
    assert not second.extracted and second.directory == first.directory
    np.testing.assert_array_equal(second.arrays[FINAL], first.arrays[FINAL])

    changed = splits.train[0].path
    Image.new("RGB", (50, 50), (0, 255, 255)).save(changed)
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third = cached_features(bb, splits.train, **kwargs)
    assert third.extracted and third.directory != first.directory
    assert not np.allclose(third.arrays[FINAL][0, 0], first.arrays[FINAL][0, 0])
    np.testing.assert_allclose(third.arrays[FINAL][0, 1:], first.arrays[FINAL][0, 1:], atol=1e-5)

    # Other weights are another entry too.
    other = _backbone("test_resnet")
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    assert cached_features(other, splits.train, **kwargs).extracted


def test_several_backbones_in_one_pass_write_the_entries_each_would_write_alone(tmp_path: Path, monkeypatch):
    import finetune.data.images as images
    from finetune.model.features import cached_features_many

    data = make_folder(tmp_path / "data", per_class=3, size=200, ext="jpg")  # JPEGs: decoded at a reduced scale
    splits = scan_folder(data)
    Path(splits.train[0].path).write_bytes(b"not an image any more")  # broken after the scan
    backbones = [_backbone("test_resnet"), _backbone("test_efficientnet"), _backbone("test_efficientnet", size=64)]
    decodes = []
    real = images.to_rgb
    monkeypatch.setattr(images, "to_rgb", lambda img: decodes.append(img.size) or real(img))
    together = cached_features_many(backbones, splits.train, batch_size=4, cache_dir=tmp_path / "one-pass")
    # 32 px models share one decode per file, the 64 px one needs a finer scale: two decodes per readable file
    readable = len(splits.train) - 1
    assert len(decodes) == 2 * readable
    for backbone, joint in zip(backbones, together):
        alone = cached_features(backbone, splits.train, batch_size=4, cache_dir=tmp_path / "alone")
        assert joint.extracted and alone.extracted and joint.directory.name == alone.directory.name
        assert joint.seconds > 0 and (joint.directory / "speed.json").is_file()
        for key in alone.arrays:
            np.testing.assert_array_equal(joint.arrays[key], alone.arrays[key])
        np.testing.assert_array_equal(joint.valid, alone.valid)
        assert joint.valid.sum() == readable
        np.testing.assert_array_equal(joint.logits, alone.logits)
        for layer, stats in alone.bn_stats.items():
            for name, value in stats.items():
                np.testing.assert_allclose(joint.bn_stats[layer][name], value, rtol=1e-6)
    # a second call reads all three from the cache
    assert not any(f.extracted for f in cached_features_many(backbones, splits.train, batch_size=4,
                                                             cache_dir=tmp_path / "one-pass"))


def _noise_folder(root: Path, per_class: int = 4) -> Path:
    """Textured images (a solid colour looks the same under every crop and flip)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_augmented_views_are_cached_and_reproducible(tmp_path: Path):
    splits = scan_folder(_noise_folder(tmp_path / "data"))
    bb = _backbone("test_resnet")
    kwargs = dict(batch_size=4, cache_dir=tmp_path / "cache", seed=3)
    aug = cached_features(bb, splits.train, views=3, **kwargs)
    assert aug.arrays[FINAL].shape[:2] == (3, len(splits.train))
    assert not np.allclose(aug.arrays[FINAL][0], aug.arrays[FINAL][1])  # the views differ
    again = cached_features(bb, splits.train, views=3, cache_dir=tmp_path / "other", batch_size=2,
                            seed=3)
    np.testing.assert_allclose(again.arrays[FINAL], aug.arrays[FINAL], atol=1e-5)  # same seed, same views
    assert not cached_features(bb, splits.train, views=3, **kwargs).extracted


@pytest.mark.parametrize("model", FAMILIES)
def test_cached_feature_heads_match_the_full_network(model: str, tmp_path: Path):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=3)
    splits = scan_folder(data)
    bb = _backbone(model, num_classes=3)
    feats = cached_features(bb, splits.train, batch_size=4, cache_dir=tmp_path / "cache")
    x = _images(bb, splits.train)
    torch.manual_seed(1)
    for stage in [s for s in feats.stages if s.key in ("stage1", FINAL)]:
        weight, bias = torch.randn(3, stage.channels), torch.randn(3)
        expected = F.linear(torch.from_numpy(feats.matrix(stage.key)[0]), weight, bias)
        if stage.key == FINAL:
            net = bb.model
            load_linear(net.get_classifier(), weight, bias)
        else:
            net = StageClassifier(_backbone(model, num_classes=3).model, stage.index, 3)
            load_linear(net.head, weight, bias)
        with torch.no_grad():
            got = net.eval()(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_stage_head_artifact_round_trip(tmp_path: Path):
    bb = _backbone("test_efficientnet", num_classes=4)
    net = StageClassifier(bb.model, 2, 4).eval()
    n_full = sum(p.numel() for p in _backbone("test_efficientnet", 4).model.parameters())
    assert sum(p.numel() for p in net.parameters()) < n_full  # the later stages were pruned away
    spec = ModelSpec(architecture="test_efficientnet", num_classes=4, class_names=list("abcd"),
                     data_config=bb.data_config, scenario="small-different", head_stage=2)
    save_model(tmp_path / "model", net, spec)
    loaded, loaded_spec = load_model(tmp_path / "model")
    assert loaded_spec.head_stage == 2 and isinstance(loaded, StageClassifier)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_profile_from_scan_info(tmp_path: Path):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6, size=40)
    for i in range(4):  # grayscale images in class c, and one extra in class a
        Image.new("L", (40, 60), 128).save(data / "c" / f"gray_{i}.png")
    Image.new("RGB", (40, 40)).save(data / "a" / "extra.png")
    splits = scan_folder(data, val_fraction=0.25)
    p = profile_splits(splits)
    assert p.n_classes == 3 and p.n_train == len(splits.train) and p.n_val == len(splits.val)
    counts = sorted(sum(1 for s in splits.train if s.label == k) for k in range(3))
    assert (p.per_class_min, p.per_class_max) == (counts[0], counts[-1])
    assert p.imbalance_ratio == pytest.approx(counts[-1] / counts[0], rel=1e-3)
    gray_train = sum(1 for s in splits.train if s.info.mode == "L")
    assert gray_train > 0 and p.grayscale_share == pytest.approx(gray_train / p.n_train, abs=1e-4)
    assert 40 <= p.median_width <= 48


def test_cached_center_outputs_match_the_network_prediction(tmp_path: Path):
    """The after-training report of a feature plan reads cached features instead of running the
    network: logits and (pooled) features must be the ones the network gives through the TTA code path."""
    from finetune.evaluation.tta import source_outputs
    from finetune.training.feature_plans import cached_center_outputs

    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=4)
    splits = scan_folder(data)
    bb = _backbone("test_resnet", num_classes=3)
    torch.manual_seed(2)
    load_linear(bb.model.get_classifier(), torch.randn(3, bb.model.num_features), torch.randn(3))
    val = cached_features(bb, splits.val, batch_size=4, cache_dir=tmp_path / "cache")
    cached = cached_center_outputs(val, FINAL, bb.model)
    net = source_outputs(bb.model.eval(), [s.path for s in splits.val], bb.data_config, "center", 4, pool=True)
    np.testing.assert_allclose(cached.logits.numpy(), net.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(cached.features.numpy(), net.features.numpy(), atol=1e-5)


def test_a_stage_head_network_leaves_the_backbone_whole(tmp_path: Path):
    """The small-different network is cut after a stage; the backbone must stay whole, or the feature
    cache (keyed by its weights) misses and re-extracts with a pruned model."""
    from types import SimpleNamespace

    from finetune.model.features import weights_fingerprint
    from finetune.training.feature_plans import head_network

    bb = _backbone("test_efficientnet", num_classes=3)
    before = weights_fingerprint(bb)
    net = head_network(bb, SimpleNamespace(head_stage="stage2"), 3)
    assert isinstance(net, StageClassifier)
    assert weights_fingerprint(bb) == before
    assert bb.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_fold_heads_on_cached_crop_features_match_the_network_on_those_crops(tmp_path: Path, monkeypatch):
    """`--tta auto` scores a feature plan's out-of-fold heads on cached 10-crop features instead of running the
    network: the per-crop logits and features must be the network's own through the TTA code path."""
    from finetune.config import TrainConfig
    from finetune.evaluation.tta import source_outputs
    from finetune.training import feature_plans

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=4, size=40)
    splits = scan_folder(data)
    bb = _backbone("test_resnet", num_classes=3)
    torch.manual_seed(3)
    weight, bias = torch.randn(3, bb.model.num_features), torch.randn(3)
    rows = np.array([0, 2, 5])
    cfg = TrainConfig(batch_size=4, num_workers=0)
    fold = feature_plans._fold_crop_outputs(cfg, bb, splits.train, FINAL, [(rows, weight, bias)], None)[0]
    logits, feats, labels = fold()
    load_linear(bb.model.get_classifier(), weight, bias)
    expected = source_outputs(bb.model.eval(), [splits.train[r].path for r in rows], bb.data_config, "10crop", 2)
    assert logits.shape == (3, 10, 3) and list(labels) == [splits.train[r].label for r in rows]
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(feats, expected.features.numpy(), atol=1e-4)
    # The second call reads the crops from the cache.
    assert any((tmp_path / "cache").rglob("meta.json"))


def _bn_inputs_reference(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean and variance of every BatchNorm layer's input over the whole batch, two-pass in float64."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, i[0].double()))
             for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, t in inputs.items():
        var, mean = torch.var_mean(t, dim=[d for d in range(t.ndim) if d != 1], correction=0)
        out[name] = (mean.numpy(), var.numpy())
    return out


def test_cached_batchnorm_statistics_match_a_float64_two_pass_reference(image_folder: Path, tmp_path: Path):
    """The similarity measure's BatchNorm input statistics, accumulated over batches of 5 (the last
    one partial) with the cheap channel reductions, equal the statistics of all images at once."""
    splits = scan_folder(image_folder)
    bb = _backbone("test_resnet")
    fs = cached_features(bb, splits.train, batch_size=5, cache_dir=tmp_path / "cache")
    assert len(splits.train) % 5 != 0
    ref = _bn_inputs_reference(bb.model, _images(bb, splits.train))
    assert fs.bn_stats and set(fs.bn_stats) == set(ref)
    for name, (mean, var) in ref.items():
        sd = np.sqrt(var + 1e-5)
        np.testing.assert_allclose(fs.bn_stats[name]["mean"] / sd, mean / sd, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(fs.bn_stats[name]["var"], var, rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 112), (4, 3, 112, 112)])
def test_channel_moments_give_the_float64_mean_and_variance_per_channel(shape):
    """[N, C], [N, C, L] and [N, C, H, W] inputs, reduced over all but the channels; the mean is large
    against the spread (mean 3, sd 0.1), where E[x^2] - E[x]^2 cancels."""
    from finetune.model.features import channel_moments

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 0.1 + 3.0
    s, ss = channel_moments(x.float())
    n = x.numel() // x.shape[1]
    dims = [d for d in range(x.ndim) if d != 1]
    var, mean = torch.var_mean(x.float().double(), dim=dims, correction=0)
    np.testing.assert_allclose((s / n).numpy(), mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose((ss / n - (s / n) ** 2).numpy(), var.numpy(), rtol=1e-4)

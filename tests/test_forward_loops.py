"""The hand-written forward loops (feature extraction, linear heads, TTA, initial loss, the pyfunc model)
return CPU results, leave the network on the device and in the mode they found it in, and forward in
bounded chunks. On a GPU the same loops move the network to the process's own device and back
(tests/test_gpu.py); here the device is the CPU, and what can be checked is the contract around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune import runtime
from finetune.model.backbone import create_backbone
from finetune.training.callbacks import initial_loss
from finetune.data.loaders import FolderDataModule
from finetune.data.folders import scan_folder
from finetune.data.transforms import eval_transform, train_transform
from finetune.model.features import FINAL, cached_features
from finetune.training.linear_probe import fit_linear_head
from finetune.training.optim import create_optimizer
from finetune.config import TrainConfig
from finetune.evaluation.tta import predict_sources
from tests.conftest import make_folder


def _backbone(num_classes: int = 2):
    torch.manual_seed(0)
    return create_backbone("test_resnet", "none", num_classes, image_size=32)


def _state(model: nn.Module) -> tuple[bool, torch.device, list[bool]]:
    return model.training, runtime.module_device(model), [m.training for m in model.modules()]


def test_feature_extraction_leaves_the_model_as_it_found_it(tmp_path: Path):
    splits = scan_folder(make_folder(tmp_path / "data", per_class=4))
    bb = _backbone()
    bb.model.train()
    before = _state(bb.model)
    feats = cached_features(bb, splits.train, batch_size=4, cache_dir=tmp_path / "cache", rt=runtime.cpu())
    assert _state(bb.model) == before  # still in train mode, on its device
    assert isinstance(feats.arrays[FINAL], np.ndarray) and feats.arrays[FINAL].dtype == np.float32
    assert np.isfinite(feats.arrays[FINAL]).all()


def test_tta_prediction_leaves_the_model_in_train_mode_and_returns_cpu_probabilities(tmp_path: Path):
    splits = scan_folder(make_folder(tmp_path / "data", per_class=3))
    bb = _backbone()
    bb.model.train()
    before = _state(bb.model)
    probs, errors = predict_sources(bb.model, [s.path for s in splits.val + splits.train], bb.data_config, "10crop",
                                    batch_size=2)
    assert _state(bb.model) == before
    assert probs.device.type == "cpu" and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(probs)))
    assert errors == [""] * len(probs)


def test_initial_loss_leaves_the_model_in_train_mode(tmp_path: Path):
    splits = scan_folder(make_folder(tmp_path / "data", per_class=4))
    bb = _backbone()
    bb.model.train()
    before = _state(bb.model)
    dm = FolderDataModule(splits, train_transform(bb.data_config, "none"), eval_transform(bb.data_config),
                          batch_size=4)
    loss = initial_loss(bb.model, dm.val_dataloader(), runtime.cpu())
    assert isinstance(loss, float) and np.isfinite(loss)
    assert _state(bb.model) == before


def test_linear_head_returns_cpu_weights_and_keeps_cpu_candidates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 40, 6)).astype(np.float32)
    y = (x[0, :, 0] > 0).astype(np.int64)
    cfg = TrainConfig()

    def factory(groups, module):
        return create_optimizer(cfg, [{**g, "lr": 0.1} for g in groups])

    result = fit_linear_head([x], y, np.ones(40, bool), 2, [0.0, 1e-3], epochs=3, batch_size=8,
                             optimizer_factory=factory, rt=runtime.cpu(), fold_heads=True)
    assert result.weight.device.type == "cpu" and result.bias.device.type == "cpu"
    assert result.weight.shape == (2, 6) and result.select_acc > 0.6
    assert all(w.device.type == "cpu" and b.device.type == "cpu" for _, w, b in result.fold_heads)


class _CountingNet(nn.Module):
    """Records the batch size of every forward pass."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.linear = nn.Linear(3, num_classes)
        self.batches: list[int] = []

    def get_classifier(self) -> nn.Module:  # as timm models have: its input is the image's features
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.linear(x.mean(dim=(2, 3)))


def test_pyfunc_model_forwards_a_large_request_in_bounded_chunks(tmp_path: Path):
    """A request of any size must not go to the GPU in one batch (it ran out of memory there)."""
    from finetune.model.artifact import ModelSpec
    from finetune.model.scoring import Scoring
    from finetune.tracking.pyfunc import ImageClassifierModel
    from tests.model_helpers import DATA_CONFIG

    data = make_folder(tmp_path / "data", per_class=6)
    files = sorted(str(p) for p in data.rglob("*.png"))
    model = ImageClassifierModel()
    model.runtime, model.batch_size, model.max_pixels, model.request_max_pixels = runtime.cpu(), 4, None, None
    model.net, model.runner, model.scoring = _CountingNet(), None, Scoring()
    model.spec = ModelSpec(architecture="x", num_classes=2, class_names=["a", "b"], data_config=DATA_CONFIG)
    probs, _ = model.predict_scores(files, "5crop")
    assert probs.shape == (len(files), 2) and probs.device.type == "cpu"
    assert len(files) > 4 and max(model.net.batches) <= 4  # 5 crops of at most 4 images, never all at once

"""Backbones: weights from a local file, from the (offline) Hugging Face cache, and clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from finetune.model.backbone import create_backbone
from finetune.cli import cli
from finetune.errors import UserError
from tests.conftest import TINY_MODEL, tiny_train_args


def _save_source_weights(path: Path, num_classes: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(TINY_MODEL, num_classes=num_classes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_really_loaded_and_head_reset(tmp_path: Path, suffix: str):
    path = tmp_path / f"src{suffix}"
    state = _save_source_weights(path)
    bb = create_backbone(TINY_MODEL, str(path), num_classes=3, keep_source_head=True)
    model_state = bb.model.state_dict()
    conv = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    assert torch.equal(model_state[conv], state[conv])
    assert bb.model.get_classifier().out_features == 3
    assert bb.source_num_classes == 7
    head = bb.model.pretrained_cfg["classifier"]
    assert torch.equal(bb.source_head["weight"], state[f"{head}.weight"])
    assert bb.weights_source == f"file:{path}"


def test_sidecar_sets_preprocessing_and_create_kwargs(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    _save_source_weights(path)
    path.with_suffix(".json").write_text(json.dumps({
        "architecture": TINY_MODEL, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "input_size": [3, 96, 96], "crop_pct": 0.8, "interpolation": "bicubic"}))
    bb = create_backbone(TINY_MODEL, str(path), num_classes=2)
    assert bb.data_config["mean"] == [0.5, 0.5, 0.5]
    assert bb.data_config["std"] == [0.25, 0.25, 0.25]
    assert bb.data_config["input_size"] == [3, 96, 96]
    assert bb.data_config["crop_pct"] == 0.8
    assert bb.data_config["interpolation"] == "bicubic"


def test_train_with_weights_file_uses_it(image_folder: Path, tmp_path: Path):
    path = tmp_path / "w.safetensors"
    _save_source_weights(path)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out)[:-6] + [
        "--weights", str(path), "--num-workers", "0", "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "model" / "model.json").read_text())["weights_source"] == f"file:{path}"
    assert summary["metrics"]["val_acc"] >= 0.0


def _fake_hf_cache(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> None:
    """The on-disk layout huggingface_hub reads in offline mode: refs/main -> snapshots/<sha>/file."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    save_file(state, str(snap / "model.safetensors"))


def test_hub_weights_load_from_offline_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    name = f"{TINY_MODEL}.r160_in1k"
    repo_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model(TINY_MODEL, num_classes=1000).state_dict().items()}
    _fake_hf_cache(tmp_path / "hf", repo_id, state)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    bb = create_backbone(name, "hub", num_classes=4)
    assert bb.weights_source == f"hub:{repo_id}"
    conv = next(k for k in state if state[k].ndim == 4)
    assert torch.equal(bb.model.state_dict()[conv], state[conv])
    assert bb.model.get_classifier().out_features == 4


def test_hub_without_network_or_cache_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="Could not download pretrained weights.*--weights PATH"):
        create_backbone(f"{TINY_MODEL}.r160_in1k", "hub", num_classes=2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "Weights file not found"),
        (lambda p: save_file({"x": torch.zeros(3)}, str(p)), "do not fit model"),
        (lambda p: p.write_bytes(b"not a safetensors file"), "Cannot read weights file"),
    ],
    ids=["missing", "wrong-shapes", "corrupt"],
)
def test_bad_weights_files(tmp_path: Path, make, message: str):
    path = tmp_path / "w.safetensors"
    make(path)
    with pytest.raises(UserError, match=message):
        create_backbone(TINY_MODEL, str(path), num_classes=2)


def test_pickled_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"weight": Evil()}, path)
    with pytest.raises(UserError, match="Refused to load"):
        create_backbone(TINY_MODEL, str(path), num_classes=2)
    assert not marker.exists()


def test_sidecar_architecture_mismatch(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    _save_source_weights(path)
    path.with_suffix(".json").write_text(json.dumps({"architecture": "resnet18"}))
    with pytest.raises(UserError, match="Use --model resnet18"):
        create_backbone(TINY_MODEL, str(path), num_classes=2)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="Did you mean: resnet18"):
        create_backbone("resnt18", "none", num_classes=2)


def test_model_without_pretrained_weights_is_an_error_not_random_init():
    with pytest.raises(UserError, match="no pretrained weights"):
        create_backbone("test_mambaout", "hub", num_classes=2)

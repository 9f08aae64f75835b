"""The trained model on disk: `model.safetensors` + `model.json` (how to rebuild and feed it).

Everything downstream (evaluate, the MLflow pyfunc model, batch prediction) rebuilds the network
from this pair, with no pickled Python objects and no network access.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save

from finetune.files import atomic_write
from torch import nn

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


@dataclass
class ModelSpec:
    architecture: str
    num_classes: int
    class_names: list[str]
    data_config: dict[str, Any]
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    weights_source: str = ""
    scenario: str = ""
    default_tta: str = "center"
    # None: the timm model with its own classifier. An int i: the model cut after feature_info
    # stage i, pooled, and a linear head (finetune.model.heads.StageClassifier; small-different plans).
    head_stage: int | None = None
    # Calibration and unknown detection (finetune.model.scoring), chosen on held-out training images.
    temperature: float = 1.0
    ood: dict[str, Any] | None = None  # {"method": "knn", "k", "threshold", "kept", ...}; bank in BANK_FILE
    # Multi-label models: one threshold per class (chosen on held-out training images); a class is in an image's
    # answer when its (sigmoid) probability reaches it. None: one label per image (softmax).
    thresholds: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_network(spec: ModelSpec) -> nn.Module:
    """The network of a spec, with random weights (load_model fills them in)."""
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=spec.num_classes,
                              **spec.create_kwargs)
    if spec.head_stage is not None:
        from finetune.model.heads import StageClassifier

        return StageClassifier(model, spec.head_stage, spec.num_classes)
    return model


def save_model(directory: str | Path, net: nn.Module, spec: ModelSpec) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE, "wb") as f:
        f.write(save(state))
    with atomic_write(directory / SPEC_FILE) as f:
        f.write(json.dumps(asdict(spec), indent=2, default=str) + "\n")
    return directory


def weights_sha256(directory: str | Path) -> str:
    """The sha256 of a model folder's weights file: what ties an exported graph to the model it came from."""
    with open(Path(directory) / WEIGHTS_FILE, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_scoring(directory: str | Path, spec: ModelSpec):
    """The model's `finetune.model.scoring.Scoring` (temperature, unknown detector and its bank)."""
    from finetune.model.scoring import Scoring

    return Scoring.load(directory, spec.temperature, spec.ood, spec.thresholds)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    directory = Path(directory)
    spec = ModelSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
    net = build_network(spec)
    net.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return net.to(device).eval(), spec

"""Pretrained timm backbones: hub, local file, or none; and the preprocessing that comes with them.

Weights are always loaded strictly with the source classifier in place, then the classifier is
reset to the user's classes. So a file that does not fit the model is an error, never a silent
partial load, and asking for pretrained weights never quietly gives random ones.
"""

from __future__ import annotations

import difflib
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from finetune.errors import UserError

log = logging.getLogger(__name__)

SIDECAR_DATA_KEYS = ("mean", "std", "input_size", "crop_pct", "interpolation", "crop_mode")


@dataclass
class Backbone:
    """A timm model with its classifier set to the user's classes, plus how it was obtained."""

    model: nn.Module
    model_name: str  # timm name, with tag when one was given
    create_kwargs: dict[str, Any]
    data_config: dict[str, Any]
    weights_source: str  # "hub:<id>", "file:<path>", "none"
    source_num_classes: int = 0
    source_head: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def check_model_name(model_name: str) -> None:
    """Fail with close matches when timm does not know the architecture."""
    arch = model_name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for valid names."
    raise UserError(f"Unknown timm model {model_name!r}.{hint}")


def read_sidecar(weights_path: Path) -> dict[str, Any]:
    sidecar = weights_path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"Sidecar {sidecar} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"Sidecar {sidecar} must hold a JSON object.")
    return data


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # what --weights FILE reads (`read_state_dict`)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors only: safetensors, or torch.load with weights_only=True (pickled code refused)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"Refused to load {path}: it contains pickled Python objects, not just tensors "
                        f"({str(e).splitlines()[0]}). Save weights as .safetensors or a plain state_dict.") from None
    except Exception as e:  # corrupt archive, wrong format, ...
        raise UserError(f"Cannot read weights file {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"Weights file {path} does not hold a state_dict of tensors.")
    return obj


def _classifier_names(model_name: str, create_kwargs: dict[str, Any]) -> tuple[str, ...]:
    probe = timm.create_model(model_name, pretrained=False, num_classes=1, **create_kwargs)
    name = probe.pretrained_cfg.get("classifier") or ""
    return (name,) if isinstance(name, str) else tuple(name)


def _source_num_classes(state_dict: dict[str, torch.Tensor], classifier_names: tuple[str, ...]) -> int:
    for name in classifier_names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return 0


def _head_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    head = model.get_classifier()
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        return None
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def create_backbone(model_name: str, weights: str, num_classes: int, image_size: int | None = None,
                    keep_source_head: bool = False, **model_kwargs: Any) -> Backbone:
    """Build a timm model with pretrained weights and a fresh classifier for `num_classes`.

    Args:
        model_name: timm name, optionally with a weight tag (``convnext_tiny.fb_in22k``).
        weights: ``hub`` (timm's pretrained download), ``none`` (random init), or a local file.
        num_classes: classes of the user's dataset.
        image_size: override of the data config's input size.
        keep_source_head: keep a copy of the pretrained classifier (for the similarity measure).
        model_kwargs: extra timm create args (drop_rate, drop_path_rate, ...).
    """
    check_model_name(model_name)
    source, source_classes, create_kwargs, overlay = _weights_source(model_name, weights, num_classes)
    pretrained = source != "none"
    model = _create(model_name, weights, pretrained, source_classes, overlay, create_kwargs, model_kwargs)
    source_head = _head_state(model) if keep_source_head and pretrained else None
    if source_classes != num_classes:
        model.reset_classifier(num_classes)
    data_config = resolve_data_config(model, image_size)
    return Backbone(model, model_name, create_kwargs, data_config, source, source_classes, source_head)


def _weights_source(model_name: str, weights: str, num_classes: int
                    ) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
    """Where the weights come from: (source, classes of their classifier, create kwargs, timm cfg overlay)."""
    if weights == "none":
        return "none", num_classes, {}, {}
    if weights == "hub":
        cfg = _pretrained_cfg(model_name)
        return f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or model_name}", int(cfg.get("num_classes") or 0), {}, {}
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"Weights file not found: {path}. Pass an existing .safetensors/.pth/.bin file, "
                        "'hub' to download timm's pretrained weights, or 'none'.")
    sidecar = read_sidecar(path)
    arch = sidecar.get("architecture")
    if arch and arch != model_name.split(".", 1)[0]:
        raise UserError(f"Weights {path} are for architecture {arch!r} (from {path.with_suffix('.json').name}), "
                        f"but --model is {model_name!r}. Use --model {arch}.")
    create_kwargs = dict(sidecar.get("create_kwargs") or {})
    source_classes = _source_num_classes(read_state_dict(path), _classifier_names(model_name, create_kwargs))
    overlay = {"file": str(path), "num_classes": source_classes,
               **{k: (tuple(v) if isinstance(v, list) else v) for k, v in sidecar.items() if k in SIDECAR_DATA_KEYS}}
    return f"file:{path}", source_classes, create_kwargs, overlay


def _create(model_name: str, weights: str, pretrained: bool, num_classes: int, overlay: dict[str, Any],
            create_kwargs: dict[str, Any], model_kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model, with every way it can fail turned into one message that says what to do."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                 pretrained_cfg_overlay=overlay or None, **create_kwargs, **model_kwargs)
    except UserError:
        raise
    except TypeError as e:  # a create argument this architecture does not take (drop_path_rate, a sidecar kwarg)
        given = {**create_kwargs, **model_kwargs}
        raise UserError(f"timm cannot create {model_name!r} with {given}: {str(e).splitlines()[0][:200]}. "
                        "Leave out the option it does not support (e.g. --drop-path 0 or --dropout 0).") from None
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
            raise UserError(f"Weights {weights} do not fit model {model_name!r}: {msg[:300]}. "
                            "Check that --model is the architecture the weights were trained for.") from None
        raise UserError(f"Could not load weights for {model_name!r}: {msg[:300]}") from None
    except Exception as e:  # network errors from huggingface_hub / urllib, offline mode, ...
        if weights == "hub":
            raise UserError(
                f"Could not download pretrained weights for {model_name!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Check the network (or the Hugging Face cache when "
                "HF_HUB_OFFLINE=1), or pass --weights PATH to a local file, or --weights none to train "
                "from scratch.") from None
        raise


def _pretrained_cfg(model_name: str) -> dict[str, Any]:
    """The pretrained config timm would download from; an error when there is none."""
    from timm.models import get_pretrained_cfg

    arch, _, tag = model_name.partition(".")
    cfg = get_pretrained_cfg(model_name) if tag else None
    if cfg is None and not tag:
        cfg = get_pretrained_cfg(arch)
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    if not (cfg_dict.get("hf_hub_id") or cfg_dict.get("url") or cfg_dict.get("file")):
        tags = timm.list_pretrained(f"{arch}.*")
        hint = f" Available: {', '.join(tags[:8])}." if tags else " This architecture has no pretrained weights in timm."
        raise UserError(f"timm has no pretrained weights for {model_name!r}.{hint} "
                        "Use --weights PATH for your own file or --weights none.")
    return cfg_dict


def resolve_data_config(model: nn.Module, image_size: int | None = None) -> dict[str, Any]:
    """Preprocessing from the model's own pretrained config (mean, std, size, crop_pct, interpolation)."""
    config = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    return config

"""Training configuration: defaults < YAML file < command-line flags.

One dataclass holds every option `finetune train` understands. A YAML file may set any of them;
unknown keys are an error naming the valid ones. The resolved config is saved with every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError

SCENARIOS = ("auto", "small-similar", "large-similar", "small-different", "large-different")
DEFAULT_SELECT_FRACTION = 0.2
BANK_MAX_IMAGES = 2000  # training images whose features a model keeps for its unknown score (stratified)
TTA_MAX_IMAGES = 500  # held-out training images `--tta auto` scores (10 crops each), a stratified subset
FIXED_TTA_MODES = ("none", "center", "5crop", "10crop")
TTA_MODES = ("auto", *FIXED_TTA_MODES)  # auto: chosen on held-out training images (evaluation.trust.choose_after_training)
# The training recipe. Presets/values are also listed in finetune.data.transforms / finetune.training.optim.
AUGMENT_PRESETS = ("none", "light", "standard", "strong")
OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "step", "exponential", "cosine", "onecycle")
CLASS_WEIGHTS = ("none", "auto")
SAMPLERS = ("shuffle", "balanced")


@dataclass
class TrainConfig:
    """Every option of `finetune train`; see README for what each one does."""

    data_dir: str = ""
    model: str = "resnet50.a1_in1k"
    weights: str = "hub"
    scenario: str = "auto"
    # Overrides of the scenario's plan (None: the plan's own value; see configs/<scenario>.yaml).
    freeze_groups: int | None = None
    backbone_lr_mult: float | None = None
    aug_views: int | None = None
    epochs: int = 10
    batch_size: int = 32
    image_size: int | None = None
    lr: float = 1e-3
    # None: the plan's. A feature plan chooses its head's weight decay by cross-validation on train from the
    # plan's grid, a fine-tuning plan uses 0.05 (finetune.training.recipe); a value given here is used as it is.
    weight_decay: float | None = None
    val_fraction: float = 0.2
    exclude: str | None = None  # a file listing images (one path a line) to leave out of every split
    # Network plans (and the pilot) hold this share of train out to choose on; None: 0.2 (`select_share`).
    select_fraction: float | None = None
    seed: int = 0
    tta: str = "auto"  # "auto": the crop mode that scores best on data inside train; or a fixed mode
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    num_workers: int | None = None
    experiment: str = "finetune"
    run_name: str | None = None
    register: str | None = None
    output: str | None = None
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    # Training recipe: None means "the scenario's default" (finetune.training.recipe.default_recipe).
    augment: str | None = None
    mixup: float | None = None
    cutmix: float | None = None
    label_smoothing: float | None = None
    optimizer: str = "adamw"
    momentum: float | None = None  # sgd and rmsprop only; 0.9 when not given
    nesterov: bool = False
    schedule: str | None = None
    warmup_epochs: float | None = None
    step_epochs: int | None = None
    lr_gamma: float | None = None
    dropout: float | None = None
    drop_path: float | None = None
    drop_connect: float | None = None
    ema: float | None = None
    patience: int | None = None
    class_weights: str = "none"
    sampler: str = "shuffle"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def select_share(self) -> float:
        """The share of train held out as the selection split (--select-fraction; 0.2 when not given)."""
        return DEFAULT_SELECT_FRACTION if self.select_fraction is None else self.select_fraction


def config_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of known keys (dashes in keys are accepted)."""
    return read_yaml_mapping(path, "Config file")


def read_yaml_mapping(path: str | Path, label: str) -> dict[str, Any]:
    """A YAML file holding `key: value` pairs, keys with dashes turned into underscores.

    Args:
        path: the file.
        label: what the file is, for the error messages ("Config file", "Strategy config").
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{label} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{label} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label} {path} must hold a mapping of option: value, not {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """Merge defaults, file and explicitly-given CLI values (CLI wins) into a TrainConfig."""
    valid = config_keys()
    unknown = sorted(set(file_values) - set(valid))
    if unknown:
        raise UserError(f"Unknown config key(s): {', '.join(unknown)}. Valid keys: {', '.join(valid)}.")
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    cfg = TrainConfig(**merged)
    _coerce_types(cfg)
    validate_config(cfg)
    return cfg


def _coerce_types(cfg: TrainConfig) -> None:
    """YAML gives strings for things like 1e-3 written oddly; cast to the declared types."""
    casts = {"epochs": int, "batch_size": int, "seed": int, "max_image_pixels": int, "num_nodes": int,
             "lr": float, "val_fraction": float}
    for name, cast in casts.items():
        value = getattr(cfg, name)
        try:
            setattr(cfg, name, cast(value))
        except (TypeError, ValueError):
            raise UserError(f"Config value {name}={value!r} is not a valid {cast.__name__}.") from None
    for name in ("image_size", "num_workers", "freeze_groups", "aug_views"):
        value = getattr(cfg, name)
        if value is not None:
            try:
                setattr(cfg, name, int(value))
            except (TypeError, ValueError):
                raise UserError(f"Config value {name}={value!r} is not a valid int.") from None
    if cfg.backbone_lr_mult is not None:
        try:
            cfg.backbone_lr_mult = float(cfg.backbone_lr_mult)
        except (TypeError, ValueError):
            raise UserError(f"Config value backbone_lr_mult={cfg.backbone_lr_mult!r} is not a valid float.") from None
    cfg.devices = str(cfg.devices)
    optional = {"weight_decay": float, "mixup": float, "cutmix": float, "label_smoothing": float, "warmup_epochs": float,
                "step_epochs": int, "lr_gamma": float, "dropout": float, "drop_path": float,
                "drop_connect": float, "ema": float, "patience": int, "select_fraction": float}
    for name, cast in {**optional, "momentum": float}.items():
        value = getattr(cfg, name)
        if value is not None:
            try:
                setattr(cfg, name, cast(value))
            except (TypeError, ValueError):
                raise UserError(f"Config value {name}={value!r} is not a valid {cast.__name__}.") from None
    if not isinstance(cfg.nesterov, bool):
        raise UserError(f"Config value nesterov={cfg.nesterov!r} must be true or false.")


def validate_config(cfg: TrainConfig) -> None:
    """Impossible values fail here, before any work is done."""
    if cfg.epochs < 1:
        raise UserError(f"epochs must be at least 1 (got {cfg.epochs}).")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be at least 1 (got {cfg.batch_size}).")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, exclusive (got {cfg.val_fraction}).")
    if cfg.select_fraction is not None and not 0.0 < cfg.select_fraction < 1.0:
        raise UserError(f"select_fraction must be between 0 and 1, exclusive (got {cfg.select_fraction}).")
    if cfg.lr <= 0:
        raise UserError(f"lr must be positive (got {cfg.lr}).")
    if cfg.image_size is not None and cfg.image_size < 16:
        raise UserError(f"image_size must be at least 16 pixels (got {cfg.image_size}).")
    if cfg.num_nodes < 1:
        raise UserError(f"num_nodes must be at least 1 (got {cfg.num_nodes}).")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UserError(f"num_workers must be >= 0 (got {cfg.num_workers}).")
    if cfg.freeze_groups is not None and cfg.freeze_groups < 0:
        raise UserError(f"freeze_groups must be >= 0 (got {cfg.freeze_groups}).")
    if cfg.backbone_lr_mult is not None and cfg.backbone_lr_mult < 0:
        raise UserError(f"backbone_lr_mult must be >= 0 (got {cfg.backbone_lr_mult}).")
    if cfg.aug_views is not None and cfg.aug_views < 0:
        raise UserError(f"aug_views must be >= 0 (got {cfg.aug_views}).")
    _check_choice("scenario", cfg.scenario, SCENARIOS)
    _check_choice("tta", cfg.tta, TTA_MODES)
    validate_recipe(cfg)


def validate_recipe(cfg: TrainConfig) -> None:
    """The recipe options: named choices list the valid ones, numbers their range."""
    if cfg.augment is not None:
        _check_choice("augment", cfg.augment, AUGMENT_PRESETS)
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    if cfg.schedule is not None:
        _check_choice("schedule", cfg.schedule, SCHEDULES)
    _check_choice("class_weights", cfg.class_weights, CLASS_WEIGHTS)
    _check_choice("sampler", cfg.sampler, SAMPLERS)
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0 (got {cfg.weight_decay}).")
    for name in ("mixup", "cutmix", "warmup_epochs"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise UserError(f"{name} must be >= 0 (got {value}).")
    for name in ("label_smoothing", "dropout", "drop_path", "drop_connect", "momentum"):
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"{name} must be in [0, 1) (got {value}).")
    if cfg.ema is not None and not (cfg.ema == 0.0 or 0.0 < cfg.ema < 1.0):
        raise UserError(f"ema is the decay of the weight average: 0 (off) or between 0 and 1, e.g. 0.999 "
                        f"(got {cfg.ema}).")
    if cfg.momentum is not None and cfg.optimizer not in ("sgd", "rmsprop"):
        raise UserError(f"--momentum applies to --optimizer sgd or rmsprop; {cfg.optimizer} has its own "
                        "(betas). Leave it out, or choose sgd / rmsprop.")
    if cfg.lr_gamma is not None and not 0.0 < cfg.lr_gamma <= 1.0:
        raise UserError(f"lr_gamma must be in (0, 1] (got {cfg.lr_gamma}).")
    if cfg.step_epochs is not None and cfg.step_epochs < 1:
        raise UserError(f"step_epochs must be at least 1 (got {cfg.step_epochs}).")
    if cfg.patience is not None and cfg.patience < 1:
        raise UserError(f"patience must be at least 1 epoch (got {cfg.patience}).")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix pair each image with another of the batch: batch_size must be even "
                        f"(got {cfg.batch_size}).")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"Invalid {name} {value!r}. Valid values: {', '.join(choices)}.")

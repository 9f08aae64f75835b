"""Training configuration: defaults < YAML file < command-line flags.

One dataclass declares every option `finetune train` understands, each once: name, type and default as the
field, and as its metadata the help, the help group, the valid values or range, and the commands that act on
it. The click options (`finetune.cli`), the YAML checks (`resolve_config`) and the recipe
(`finetune.training.recipe.Recipe`) are generated from it. A YAML file may set any option of its command;
unknown keys are an error naming the valid ones. The resolved config is saved with every run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

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

# The commands that build a TrainConfig, and which of its options each one acts on (`opt(commands=...)`).
COMMANDS = ("train", "plan", "sweep", "sanity", "lr-find", "audit", "rank")
EVERY = frozenset(COMMANDS) - {"rank"}  # the data, the model and the hardware: every command with one model reads them
READERS = EVERY | {"rank"}  # the data and the hardware: `rank` too (it compares several models, each at its own size)
TRAINING = EVERY - {"audit"}  # what measures, decides and trains (or, `plan`, shows the plan)
RUNS = TRAINING - {"sanity", "lr-find"}  # options of a real run: DDP and the like
MLFLOW_RUNS = frozenset({"train", "sweep", "lr-find"})  # the commands that make an MLflow run
# The order the help shows the groups in.
GROUPS = ("Data", "Model and plan", "Recipe", "Tracking and output", "Hardware")


def opt(default: Any, help: str, group: str, *, choices: tuple[str, ...] | None = None, low: float | None = None,
        high: float | None = None, low_open: bool = False, high_open: bool = False, shows: str | None = None,
        commands: frozenset[str] = TRAINING, path: bool = False) -> Any:
    """One option's whole declaration: the dataclass field (name, type, default) and, as its metadata, what the
    CLI, the YAML checks and the help need. `shows`: the default as the help says it (for a None that means
    "derived"); `commands`: the commands that act on it (the others neither offer it nor accept it in a file)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "low": low,
                                            "high": high, "low_open": low_open, "high_open": high_open,
                                            "shows": shows, "commands": commands, "path": path})


@dataclass
class TrainConfig:
    """Every option of `finetune train`, each declared once (see the module docstring)."""

    data_dir: str = ""
    # Data
    val_fraction: float = opt(0.2, "Fraction held out for validation when the folder has no val/ split "
                              "(stratified).", "Data", low=0.0, high=1.0, low_open=True, high_open=True,
                              commands=READERS)
    exclude: str | None = opt(None, "A file of image paths, one per line (e.g. reviewed findings of `finetune "
                              "audit`), left out of training and evaluation; nothing is moved or deleted.", "Data",
                              shows="none", commands=READERS, path=True)
    seed: int = opt(0, "Random seed (split, init, augmentation).", "Data", commands=READERS)
    max_image_pixels: int = opt(89_478_485, "Refuse images with more pixels than this (Pillow's "
                                "decompression-bomb limit).", "Data", low=1, commands=READERS)
    image_size: int | None = opt(None, "Input size in pixels (rank: every candidate's, as it would be trained).",
                                 "Data", low=16, shows="the model's pretrained size", commands=READERS)
    batch_size: int = opt(32, "Images per batch (per process under DDP).", "Data", low=1, commands=READERS)
    # Model and plan
    model: str = opt("resnet50.a1_in1k", "timm model name, optionally with a weight tag, e.g. "
                     "convnext_tiny.fb_in22k; `train` also takes auto: the best of --candidates.", "Model and plan",
                     commands=EVERY)
    weights: str = opt("hub", "'hub' (download timm's pretrained weights), 'none', or a local "
                       ".safetensors/.pth/.bin file (a sidecar <file>.json is honoured).", "Model and plan",
                       commands=EVERY)
    scenario: str = opt("auto", "Scenario of the four-scenario table; auto measures it.", "Model and plan",
                        choices=SCENARIOS)
    freeze_groups: int | None = opt(None, "Override: freeze the first N layer groups (0 trains all; `finetune "
                                    "plan` lists the groups). Fine-tuning plans only.", "Model and plan", low=0,
                                    shows="the plan's")
    backbone_lr_mult: float | None = opt(None, "Override: backbone LR as a multiple of the head's.",
                                         "Model and plan", low=0.0, shows="the plan's")
    aug_views: int | None = opt(None, "Augmented views per image in the feature cache (frozen-backbone plans).",
                                "Model and plan", low=0, shows="the plan's")
    epochs: int = opt(10, "Training epochs.", "Model and plan", low=1)
    # Network plans (and the pilot) hold this share of train out to choose on; None: 0.2 (`select_share`).
    select_fraction: float | None = opt(None, "Fine-tuning plans: fraction of train held out to choose the "
                                        "epoch and weights on (val is only reported).", "Model and plan", low=0.0,
                                        high=1.0, low_open=True, high_open=True, shows=str(DEFAULT_SELECT_FRACTION))
    tta: str = opt("auto", "Test-time crops the model uses: auto picks centre, 5crop or 10crop by accuracy on "
                   "held-out training images; or a fixed mode.", "Model and plan", choices=TTA_MODES,
                   commands=frozenset({"train", "sweep"}))
    threshold_precision: float | None = opt(None, "Label files with several labels per image: each class's "
                                            "threshold is the lowest that reaches this precision on the selection "
                                            "images.", "Model and plan", low=0.0, high=1.0, low_open=True,
                                            shows="each class's best F1", commands=frozenset({"train"}))
    # Recipe: None means "the plan's", the scenario's default (finetune.training.recipe.DEFAULT_RECIPES).
    lr: float = opt(1e-3, "Learning rate of the new head.", "Recipe", low=0.0, low_open=True)
    weight_decay: float | None = opt(None, "Weight decay (not on norms, biases, position embeddings).", "Recipe",
                                     low=0.0, shows="the plan's: 0.05 when fine-tuning, chosen by cross-validation "
                                     "on train for a linear head")
    augment: str | None = opt(None, "Augmentation preset.", "Recipe", choices=AUGMENT_PRESETS, shows="the plan's")
    mixup: float | None = opt(None, "Mixup alpha (0 = off).", "Recipe", low=0.0, shows="the plan's")
    cutmix: float | None = opt(None, "CutMix alpha (0 = off).", "Recipe", low=0.0, shows="the plan's")
    label_smoothing: float | None = opt(None, "Label smoothing (0 = off).", "Recipe", low=0.0, high=1.0,
                                        high_open=True, shows="the plan's")
    optimizer: str = opt("adamw", "Optimizer (timm).", "Recipe", choices=OPTIMIZERS)
    momentum: float | None = opt(None, "Momentum of sgd/rmsprop.", "Recipe", low=0.0, high=1.0, high_open=True,
                                 shows="0.9")
    nesterov: bool = opt(False, "Nesterov momentum (sgd).", "Recipe")
    schedule: str | None = opt(None, "Learning-rate schedule.", "Recipe", choices=SCHEDULES, shows="the plan's")
    warmup_epochs: float | None = opt(None, "Linear LR warm-up length in epochs.", "Recipe", low=0.0,
                                      shows="the plan's")
    step_epochs: int | None = opt(None, "Epochs between LR drops of the step schedule.", "Recipe", low=1,
                                  shows="a third of the epochs")
    lr_gamma: float | None = opt(None, "LR factor per drop (step) or per epoch (exponential).", "Recipe", low=0.0,
                                 high=1.0, low_open=True, shows="0.1 (step), 0.9 (exponential)")
    dropout: float | None = opt(None, "Dropout before the classifier (timm drop_rate).", "Recipe", low=0.0,
                                high=1.0, high_open=True, shows="the plan's")
    drop_path: float | None = opt(None, "Stochastic depth rate (timm drop_path_rate).", "Recipe", low=0.0,
                                  high=1.0, high_open=True, shows="the plan's")
    drop_connect: float | None = opt(None, "DropConnect rate on the classifier's weights.", "Recipe", low=0.0,
                                     high=1.0, high_open=True, shows="the plan's")
    ema: float | None = opt(None, "Decay of the EMA of the weights (Polyak averaging; 0 = off), e.g. 0.999.",
                            "Recipe", low=0.0, high=1.0, high_open=True, shows="the plan's")
    patience: int | None = opt(None, "Early stopping after N epochs without a better select_acc (accuracy on "
                               "the selection split held out of train).", "Recipe", low=1, shows="off")
    class_weights: str = opt("none", "'auto': inverse-frequency loss weights.", "Recipe", choices=CLASS_WEIGHTS)
    sampler: str = opt("shuffle", "'balanced': draw each class equally often.", "Recipe", choices=SAMPLERS)
    # Tracking and output
    experiment: str = opt("finetune", "MLflow experiment name.", "Tracking and output", commands=MLFLOW_RUNS)
    run_name: str | None = opt(None, "MLflow run name.", "Tracking and output", shows="model-data-time",
                               commands=MLFLOW_RUNS)
    register: str | None = opt(None, "Register the model (sweep: the best trial's) under this name in the MLflow "
                               "registry.", "Tracking and output", shows="not registered",
                               commands=frozenset({"train", "sweep"}))
    output: str | None = opt(None, "Output folder (new or empty: a run never writes into another's).",
                             "Tracking and output", shows="outputs/<run name>-<run id>", commands=EVERY - {"sanity"})
    # Choosing the backbone (`finetune rank`)
    candidates: str | None = opt(None, "The backbones to rank: a folder of weight files with sidecars, a file with "
                                 "one timm name or weights file per line, or timm names separated by commas "
                                 "(hub weights). With `train --model auto` the best of them is trained.", "Model and plan",
                                 shows="none (rank: required)", commands=frozenset({"rank", "train"}))
    max_latency_ms: float | None = opt(None, "Leave out candidates slower than this, in ms per image at batch 1 on "
                                       "this machine.", "Model and plan", low=0.0, low_open=True, shows="no limit",
                                       commands=frozenset({"rank", "train"}))
    # Hardware
    num_workers: int | None = opt(None, "Data loader workers.", "Hardware", low=0, shows="from the cores",
                                  commands=READERS)
    accelerator: str = opt("auto", "auto, cpu, gpu, ... (Lightning).", "Hardware", commands=READERS)
    devices: str = opt("auto", "Number of devices, or 'auto' (Lightning).", "Hardware", commands=RUNS)
    num_nodes: int = opt(1, "Machines in a multi-node DDP run (Lightning).", "Hardware", low=1, commands=RUNS)
    strategy: str = opt("auto", "Lightning strategy: auto, ddp, ...", "Hardware", commands=RUNS)
    precision: str | None = opt(None, "Lightning precision.", "Hardware", shows="bf16-mixed on GPUs with native "
                                "bf16, 16-mixed on older ones, 32-true on CPU", commands=READERS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def select_share(self) -> float:
        """The share of train held out as the selection split (--select-fraction; 0.2 when not given)."""
        return DEFAULT_SELECT_FRACTION if self.select_fraction is None else self.select_fraction


def options(command: str | None = None) -> list[Field]:
    """The declared options (every field but the data folder), or those `command` acts on."""
    return [f for f in fields(TrainConfig) if f.metadata and (command is None or command in f.metadata["commands"])]


def option_type(f: Field) -> type:
    """The option's value type (int, float, str or bool), from its annotation."""
    hint = get_type_hints(TrainConfig)[f.name]
    return next(a for a in (get_args(hint) or (hint,)) if a is not type(None))


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




def resolve_config(file_values: dict[str, Any], cli_values: dict[str, Any], command: str = "train") -> TrainConfig:
    """Merge defaults, file and explicitly-given CLI values (CLI wins) into a checked TrainConfig.

    `command`: the command line offers only the options the command acts on; a file may set any option (one
    file serves every command), and the keys that do not act on this command are left out, with a note.
    """
    valid = config_keys()
    unknown = sorted(set(file_values) - set(valid))
    if unknown:
        raise UserError(f"Unknown config key(s): {', '.join(unknown)}. Valid keys: {', '.join(valid)}.")
    acts = {f.name for f in options(command)} | {"data_dir"}
    ignored = sorted(k for k, v in file_values.items() if k not in acts and v is not None)
    if ignored:  # one file serves every command: say what this one leaves to the others
        logging.getLogger(__name__).info("Config key(s) %s act on other commands than `finetune %s`; not used here.",
                                         ", ".join(ignored), command)
    file_values = {k: v for k, v in file_values.items() if k in acts}
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    cfg = TrainConfig(**merged)
    for f in options():
        setattr(cfg, f.name, checked_value(f, getattr(cfg, f.name)))
    validate_config(cfg)
    return cfg


def checked_value(f: Field, value: Any) -> Any:
    """`value` cast to the option's type and checked against its choices and range; a UserError names both."""
    if value is None:
        if f.default is not None:
            raise UserError(f"Config value {f.name} is empty; leave the key out to use its default ({f.default}).")
        return None
    kind = option_type(f)
    if kind is bool or isinstance(value, bool):
        if kind is not bool or not isinstance(value, bool):
            raise UserError(f"Config value {f.name}={value!r} must be {'true or false' if kind is bool else 'a ' + kind.__name__}.")
        return value
    try:
        cast = kind(value)
        if kind is int and float(value) != cast or kind is float and not math.isfinite(cast):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"Config value {f.name}={value!r} is not a valid {kind.__name__}"
                        f"{' (a finite number)' if kind is float else ''}.") from None
    m = f.metadata
    if m["choices"] and cast not in m["choices"]:
        raise UserError(f"Invalid {f.name} {cast!r}. Valid values: {', '.join(m['choices'])}.")
    too_low = m["low"] is not None and (cast <= m["low"] if m["low_open"] else cast < m["low"])
    too_high = m["high"] is not None and (cast >= m["high"] if m["high_open"] else cast > m["high"])
    if too_low or too_high:
        raise UserError(f"{f.name} must be {range_text(f)} (got {cast}).")
    return cast


def range_text(f: Field) -> str:
    """An option's range in words: `>= 1`, `> 0`, `in [0, 1)`."""
    m = f.metadata
    if m["low"] is not None and m["high"] is not None:
        return f"in {'(' if m['low_open'] else '['}{m['low']:g}, {m['high']:g}{')' if m['high_open'] else ']'}"
    if m["low"] is not None:
        return (f"at least {m['low']:g}" if not m["low_open"] and option_type(f) is int
                else f"{'>' if m['low_open'] else '>='} {m['low']:g}")
    return f"{'<' if m['high_open'] else '<='} {m['high']:g}"


def validate_config(cfg: TrainConfig) -> None:
    """What one option's declaration cannot say: the options that depend on each other, before any work is done."""
    if cfg.momentum is not None and cfg.optimizer not in ("sgd", "rmsprop"):
        raise UserError(f"--momentum applies to --optimizer sgd or rmsprop; {cfg.optimizer} has its own "
                        "(betas). Leave it out, or choose sgd / rmsprop.")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix pair each image with another of the batch: batch_size must be even "
                        f"(got {cfg.batch_size}).")

"""The four-scenario decision: (dataset profile, measured similarity, thresholds) -> Plan.

|              | similar domain                            | different domain                              |
|--------------|-------------------------------------------|-----------------------------------------------|
| little data  | small-similar: linear head on the final   | small-different: linear head on the best      |
|              | features of the frozen backbone           | earlier stage's features (measured)           |
| lots of data | large-similar: head warm-up, then the top | large-different: all layers, higher backbone  |
|              | stages with a lower backbone LR           | LR, longer schedule                           |

Pure functions of plain numbers: no torch, no model. The thresholds come from
`finetune/configs/strategy.yaml` and each scenario's defaults from `finetune/configs/<scenario>.yaml` (shipped in
the package); both are read here, with unknown keys an error. Which concrete parameter groups a plan freezes is resolved
against the model's own timm `group_matcher` by `finetune.strategy.groups`.
"""

from __future__ import annotations

import math
from importlib import resources
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


from finetune.config import read_yaml_mapping
from finetune.errors import UserError
from finetune.model.stages import FINAL

SCENARIO_NAMES = ("small-similar", "large-similar", "small-different", "large-different")
# What each BatchNorm policy of a fine-tuning plan does (Plan.bn_policy; executed by freezing.apply_plan).
BN_POLICIES = {
    "eval": "BatchNorm in eval mode everywhere (pretrained running statistics kept: the network computes what "
            "the head was warmed up on; BatchNorm weights learn where their group learns)",
    "train": "plain BatchNorm where layers learn (random init: no statistics to keep)",
}
# strategy.yaml and <scenario>.yaml ship inside the package (finetune/configs/), read through importlib.resources
# so that they are found wherever finetune is installed, not only in a source checkout.
CONFIG_PACKAGE, CONFIG_FOLDER = "finetune", "configs"


@dataclass(frozen=True)
class Thresholds:
    """Where the cells of the table begin (finetune/configs/strategy.yaml says what they were calibrated on)."""

    large_min_images: int = 1000  # training images needed for "a lot of data" ...
    large_min_per_class: float = 100  # ... and per class (median)
    similar_min_score: float = 0.62  # similarity score at and above which the domain counts as similar
    similarity_weights: dict[str, float] = field(default_factory=lambda: {
        "probe": 0.5, "depth": 1.0, "source_confidence": 1.0, "bn_match": 0.5})
    probe_folds: int = 5
    probe_alpha: float = 100.0  # ridge penalty of the probe (standardised features)
    probe_max_images: int = 4000  # the probe uses a stratified subset of at most this many images
    source_max_images: int = 500  # ... and the source components, when measured at another size (extra pass)
    # On little data the linear heads compete in a pilot (`pilot_candidates`); the better one goes on only when it
    # gets at least this share of the selection images right, else the network is fine-tuned (`settle_pilot`):
    linear_min_select_acc: float = 0.85
    # ... and the head on an earlier stage is that head only when it beats the one on the final features by at least
    # this share of the selection images (it is the riskiest plan; `settle_pilot`):
    earlier_head_min_gain: float = 0.05

    def __post_init__(self):
        for name in ("linear_min_select_acc", "earlier_head_min_gain"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"Strategy config: {name} must be in [0, 1] (got {getattr(self, name)}).")


@dataclass(frozen=True)
class ScenarioDefaults:
    """What a scenario does, before measured numbers and user overrides refine it."""

    train_on_features: bool  # linear head on cached frozen features, no backbone forward per epoch
    head_stage: str  # "final" or "best-earlier" (resolved to a measured stage)
    trainable_fraction: float  # share of the backbone's layer groups, from the top, that learn
    backbone_lr_mult: float  # LR of the top trainable backbone group, relative to the head's
    layer_decay: float  # each group further down learns this factor slower
    head_warmup_epochs: int  # head-only epochs on cached features before the network is fine-tuned
    epochs_scale: float  # epochs = ceil(--epochs * epochs_scale)
    weight_decay_grid: tuple[float, ...] = (0.0,)  # candidates for the head, chosen on the val split
    aug_views: int = 0  # augmented views per image in the feature cache (feature plans)
    cache_augment: str = "light"  # preset of the cached augmented views (feature plans)


@dataclass
class Plan:
    """How to fine-tune, with the reasons. Serialisable as JSON (summary.json, MLflow)."""

    scenario: str
    source: str  # "measured" or "forced"
    size: str  # "small" or "large"
    domain: str  # "similar" or "different"
    train_on_features: bool
    head_stage: str  # stage key whose pooled features feed the head ("final" or "stage<i>")
    trainable_fraction: float
    freeze_groups: int | None  # explicit number of frozen layer groups (user override), else None
    backbone_lr_mult: float
    layer_decay: float
    bn_policy: str  # "eval": every BatchNorm keeps its pretrained statistics; "train": plain BatchNorm
    head_warmup_epochs: int  # head-only epochs on cached features before the network is fine-tuned
    epochs: int
    weight_decay_grid: list[float]
    aug_views: int
    cache_augment: str  # preset of the augmented views in the feature cache
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- configuration files -------------------------------------------------------------------------

def _build(cls, data: Mapping[str, Any], path: Path):
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise UserError(f"Unknown key(s) in {path}: {', '.join(unknown)}. Valid keys: {', '.join(valid)}.")
    try:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def _read_config(name: str, folder: str | Path | None) -> tuple[dict[str, Any], Path]:
    """The mapping in `folder`/`name`, by default the one shipped in the package; and the path it came from."""
    if folder is not None:
        path = Path(folder) / name
        return read_yaml_mapping(path, "Strategy config"), path
    with resources.as_file(resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER / name) as path:
        return read_yaml_mapping(path, "Strategy config"), path


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    data, path = _read_config(Path(path).name, Path(path).parent) if path else _read_config("strategy.yaml", None)
    t = _build(Thresholds, data, path)
    return Thresholds(**{**asdict(t), "similarity_weights": dict(t.similarity_weights)})


def load_scenario_defaults(scenario: str, config_dir: str | Path | None = None) -> ScenarioDefaults:
    if scenario not in SCENARIO_NAMES:
        raise UserError(f"Invalid scenario {scenario!r}. Valid values: auto, {', '.join(SCENARIO_NAMES)}.")
    data, path = _read_config(f"{scenario}.yaml", config_dir)
    return _build(ScenarioDefaults, data, path)


# --- the decision --------------------------------------------------------------------------------

def classify_size(n_train: int, per_class_median: float, t: Thresholds) -> tuple[str, str]:
    """("small" | "large", reason)."""
    large = n_train >= t.large_min_images and per_class_median >= t.large_min_per_class
    cmp_n = ">=" if n_train >= t.large_min_images else "<"
    cmp_c = ">=" if per_class_median >= t.large_min_per_class else "<"
    reason = (f"{'a lot of' if large else 'little'} data: {n_train} training images ({cmp_n} {t.large_min_images}), "
              f"median {per_class_median:g} per class ({cmp_c} {t.large_min_per_class:g})")
    return ("large" if large else "small"), reason


def classify_domain(score: float, components: Mapping[str, float], t: Thresholds) -> tuple[str, str]:
    """("similar" | "different", reason)."""
    similar = score >= t.similar_min_score
    parts = ", ".join(f"{k} {v:.2f}" for k, v in components.items())
    reason = (f"{'similar' if similar else 'different'} domain: similarity {score:.2f} "
              f"({'>=' if similar else '<'} {t.similar_min_score:.2f}; {parts})")
    return ("similar" if similar else "different"), reason


def decide(profile: Mapping[str, Any], similarity: Mapping[str, Any], thresholds: Thresholds,
           defaults: Mapping[str, ScenarioDefaults], *, base_epochs: int, forced: str = "auto",
           freeze_groups: int | None = None, backbone_lr_mult: float | None = None,
           aug_views: int | None = None, weight_decay: float | None = None, pretrained: bool = True,
           multi_label: bool = False) -> Plan:
    """Choose the scenario and its plan.

    Args:
        profile: the dataset profile (``n_train``, ``per_class_median`` are used).
        similarity: the measured similarity (``score``, ``components``, ``best_stage``,
            ``best_earlier_stage``, and ``probes`` as dicts with ``key`` and ``normalized``).
        thresholds: from finetune/configs/strategy.yaml.
        defaults: scenario name -> its defaults (finetune/configs/<scenario>.yaml).
        base_epochs: the user's --epochs.
        forced: "auto" to decide from the measurements, else a scenario name.
        freeze_groups, backbone_lr_mult, aug_views: user overrides (None: the scenario's default).
        weight_decay: the user's --weight-decay (None: not given). A feature plan's head then trains with
            this one value instead of choosing one by cross-validation on train from the scenario's grid;
            fine-tuning plans take it through the recipe (their head warm-up keeps the grid).
        pretrained: False for a randomly initialised backbone: nothing to keep, so every layer learns.
        multi_label: several labels per image (`_multi_label_scenario`): no measured cell; the head warm-up is a
            one-vs-rest logistic regression.
    """
    scenario, source, reasons = (_multi_label_scenario(profile, thresholds, forced) if multi_label else
                                 _choose_scenario(profile, similarity, thresholds, forced, pretrained))
    reasons += [r for r in [_input_size_reason(similarity) if pretrained else None] if r]
    d = defaults[scenario]
    size, domain = scenario.split("-")
    _check_overrides(scenario, d, freeze_groups, backbone_lr_mult, aug_views)
    head_stage = FINAL
    if d.train_on_features:
        head_stage, stage_reason = _head_stage(d.head_stage, similarity)
        reasons.append(stage_reason)
    # From random init the "longer schedule" of large-different is not about domain shift: keep --epochs.
    scale = d.epochs_scale if (pretrained or forced != "auto") else 1.0
    epochs = max(1, math.ceil(base_epochs * scale))
    lr_mult = d.backbone_lr_mult if backbone_lr_mult is None else float(backbone_lr_mult)
    layer_decay = float(d.layer_decay)
    # Random features: nothing for a head warm-up to build on (and BatchNorm then trains in train mode, so the
    # network computes other features than the eval-mode ones a warm-up would fit), forced or not.
    warmup = int(d.head_warmup_epochs) if pretrained else 0
    if not pretrained and forced == "auto":  # ... and nothing to protect with lower LRs
        lr_mult = 1.0 if backbone_lr_mult is None else lr_mult
        layer_decay = 1.0
    views = d.aug_views if aug_views is None else int(aug_views)
    bn_policy = "eval" if pretrained else "train"
    grid = [float(w) for w in d.weight_decay_grid]
    if d.train_on_features:
        grid = [float(weight_decay)] if weight_decay is not None else grid
        reasons.append(_feature_reason(epochs, grid, weight_decay is not None, views))
    else:
        reasons += _network_reasons(scenario, d, freeze_groups, epochs, lr_mult, layer_decay, warmup, bn_policy,
                                    pretrained, multi_label)
    return Plan(
        scenario=scenario, source=source, size=size, domain=domain, train_on_features=d.train_on_features,
        head_stage=head_stage, trainable_fraction=0.0 if d.train_on_features else float(d.trainable_fraction),
        freeze_groups=freeze_groups, backbone_lr_mult=lr_mult, layer_decay=layer_decay, bn_policy=bn_policy,
        head_warmup_epochs=0 if d.train_on_features else warmup, epochs=epochs, weight_decay_grid=grid,
        aug_views=views if d.train_on_features else 0, cache_augment=d.cache_augment, reasons=reasons)


def _choose_scenario(profile: Mapping[str, Any], similarity: Mapping[str, Any], thresholds: Thresholds,
                     forced: str, pretrained: bool) -> tuple[str, str, list[str]]:
    """The cell of the table: (scenario, "measured" or "forced", the reasons)."""
    size, size_reason = classify_size(int(profile["n_train"]), float(profile["per_class_median"]), thresholds)
    domain, domain_reason = classify_domain(float(similarity["score"]), similarity["components"], thresholds)
    measured = f"{size}-{domain}"
    if forced == "auto" and not pretrained:
        return "large-different", "measured", [
            "no pretrained weights (random init): there are no features to keep, so every layer "
            f"learns, whatever the data ({size_reason})"]
    if forced == "auto":
        return measured, "measured", [size_reason, domain_reason]
    if forced not in SCENARIO_NAMES:
        raise UserError(f"Invalid scenario {forced!r}. Valid values: auto, {', '.join(SCENARIO_NAMES)}.")
    partial = ("; measured at the training size only (`finetune plan` measures the source components at the "
               "weights' own size)" if (similarity.get("details") or {}).get("source_skipped_forced") else "")
    return forced, "forced", [f"scenario {forced} forced by the user (the measurements say {measured}: "
                              f"{size_reason}; {domain_reason}{partial})"]


def _multi_label_scenario(profile: Mapping[str, Any], thresholds: Thresholds, forced: str
                          ) -> tuple[str, str, list[str]]:
    """Several labels per image: the domain measurement and the linear heads take one label per image, so `auto`
    fine-tunes every layer (large-different), the fixed policy with the lowest regret on the single-label bench
    (docs/decisions.md); a forced fine-tuning scenario runs, a forced linear head is refused."""
    _, size_reason = classify_size(int(profile["n_train"]), float(profile["per_class_median"]), thresholds)
    if forced == "auto":
        return "large-different", "multi-label", [
            f"several labels per image: every layer is fine-tuned, the fixed plan that loses least on the bench "
            f"(the domain is not measured: its probes take one label per image; {size_reason})"]
    if forced not in SCENARIO_NAMES:
        raise UserError(f"Invalid scenario {forced!r}. Valid values: auto, {', '.join(SCENARIO_NAMES)}.")
    if forced.startswith("small-"):
        raise UserError(f"Scenario {forced} trains a linear head on cached features, which takes one label per "
                        "image; for several labels per image use auto, large-similar or large-different.")
    return forced, "forced", [f"scenario {forced} forced by the user (several labels per image; {size_reason})"]


def _input_size_reason(similarity: Mapping[str, Any]) -> str | None:
    """Why the score is not the one the weights' own input size gives, when training uses another size."""
    details = similarity.get("details") or {}
    size, native = details.get("image_size"), details.get("source_image_size")
    if size is None or native is None or size == native:
        return None
    return (f"similarity measured at {size:g} px, the training size, for probe and depth (the features the plan "
            f"trains on), and at {native:g} px, the weights' pretraining size, for source_confidence and bn_match "
            "(away from it they follow the resolution, not the domain); probe and depth move with the size, "
            "mostly downwards below it, so the score is not size-invariant (docs/decisions.md, "
            "'Similarity across input sizes')")


def _check_overrides(scenario: str, d: ScenarioDefaults, freeze_groups: int | None,
                     backbone_lr_mult: float | None, aug_views: int | None) -> None:
    if freeze_groups is not None and d.train_on_features:
        raise UserError(f"--freeze-groups applies to fine-tuning plans (large-similar, large-different); "
                        f"{scenario} trains a linear head on frozen features. Force a large-* scenario "
                        "with --scenario to fine-tune layers.")
    if backbone_lr_mult is not None and d.train_on_features:
        raise UserError(f"--backbone-lr-mult applies to fine-tuning plans; {scenario} trains a linear head on frozen "
                        "features, whose backbone does not learn. Leave it out, or force a large-* scenario.")
    if aug_views and not d.train_on_features:
        raise UserError(f"--aug-views applies to feature plans (small-*); {scenario} fine-tunes the network on "
                        "freshly augmented images every epoch. Leave it out, or force a small-* scenario.")
    if backbone_lr_mult is not None and backbone_lr_mult < 0:
        raise UserError(f"backbone_lr_mult must be >= 0 (got {backbone_lr_mult}).")
    if aug_views is not None and aug_views < 0:
        raise UserError(f"aug_views must be >= 0 (got {aug_views}).")


def _feature_reason(epochs: int, grid: list[float], given: bool, views: int) -> str:
    wd = (f"weight decay {grid[0]:g} (--weight-decay)" if given
          else f"weight decay chosen by cross-validation on the training split from {grid}")
    return (f"backbone frozen (BatchNorm in eval mode): a linear head trains for {epochs} epochs on cached "
            f"features, no backbone forward per epoch; {wd}" + (f"; {views} augmented view(s) per image cached"
                                                                 if views else ""))


def _network_reasons(scenario: str, d: ScenarioDefaults, freeze_groups: int | None, epochs: int, lr_mult: float,
                     layer_decay: float, warmup: int, bn_policy: str, pretrained: bool,
                     multi_label: bool = False) -> list[str]:
    if freeze_groups is not None:
        train_what = f"all but the first {freeze_groups} layer group(s) (user override)"
    elif d.trainable_fraction >= 1:
        train_what = "all layer groups"
    else:
        train_what = f"the top {d.trainable_fraction:.0%} of the layer groups"
    warm = (f"head warm-up for {warmup} epochs on cached features with the backbone frozen, then " if warmup else "")
    if warmup and multi_label:
        warm = ("head warm-up on cached features with the backbone frozen (a one-vs-rest logistic regression, C chosen "
                "on a fifth of the fit images), then ")
    reasons = [f"{warm}fine-tune {train_what} for {epochs} epochs; backbone LR x{lr_mult:g} of the "
               f"head's, x{layer_decay:g} per group further down; {BN_POLICIES[bn_policy]}"]
    if scenario == "large-different" and pretrained:
        reasons.append("different domain with enough data: the features must move, so a higher backbone LR "
                       f"than the similar case and a longer schedule ({d.epochs_scale:g} x --epochs)")
    return reasons


def _head_stage(rule: str, similarity: Mapping[str, Any]) -> tuple[str, str]:
    scores = {p["key"]: p["normalized"] for p in similarity.get("probes", [])}
    if rule == FINAL:
        return FINAL, f"head on the final pooled features (probe {scores.get(FINAL, float('nan')):.2f})"
    if rule != "best-earlier":
        raise UserError(f"Invalid head_stage rule {rule!r} in a scenario config. Valid: final, best-earlier.")
    best, earlier = similarity["best_stage"], similarity["best_earlier_stage"]
    if best == FINAL:
        # Measured, not assumed: when no earlier stage beats the final features, use them.
        return FINAL, (f"head on the final features: they probe best ({scores.get(FINAL, 0):.2f}; best earlier "
                       f"stage {earlier} {scores.get(earlier, 0):.2f})")
    return best, (f"head on {best}, the stage whose features probe best ({scores.get(best, 0):.2f} vs final "
                  f"{scores.get(FINAL, 0):.2f})")


# --- where the table is unclear: the candidates of a pilot ---------------------------------------

def pilot_candidates(profile: Mapping[str, Any], similarity: Mapping[str, Any],
                     thresholds: Thresholds) -> tuple[list[str], list[str]]:
    """The scenarios the pilot compares, the measured cell first; and why.

    Little data: both linear heads (on the final features, and on the stage that probes best), which train on
    cached features in seconds; `settle_pilot` then keeps the better one only where it is already good, and
    fine-tunes the network otherwise. A lot of data: the table's cell, no pilot (fine-tuning wins there).

    Callers pilot only a measured plan with pretrained weights (``plan.source == "measured"`` and a
    backbone whose ``weights_source != "none"``): a forced scenario is the user's choice, and from
    random init every layer learns whatever the cell (`decide`); those plans run as decided.
    """
    n, per_class = int(profile["n_train"]), float(profile["per_class_median"])
    size, _ = classify_size(n, per_class, thresholds)
    domain, _ = classify_domain(float(similarity["score"]), similarity["components"], thresholds)
    if size == "large":
        return [f"large-{domain}"], [f"a lot of data ({n} training images): the network is fine-tuned, no pilot"]
    other = "different" if domain == "similar" else "similar"
    return [f"small-{domain}", f"small-{other}"], [
        f"little data ({n} training images): the linear heads on the final and on the best earlier stage's features "
        f"compete on cached features (no backbone pass); the better one (the final features' unless the earlier "
        f"stage's leads by {thresholds.earlier_head_min_gain:.0%} of the selection images) goes on if it gets at "
        f"least {thresholds.linear_min_select_acc:.0%} of them right, else the network is fine-tuned"]


def settle_pilot(domain: str, scores: Mapping[str, float], thresholds: Thresholds,
                 linear_only: str | None = None) -> tuple[str, str]:
    """The plan after the pilot of the linear heads (`scores`: scenario -> selection accuracy), and why.
    `linear_only`: an option the user gave that only a linear head honours (`--aug-views`): the better head then
    goes on whatever its score, and the reason says so.

    The better head is the one on the final features (small-similar) unless the one on an earlier stage
    (small-different) beats it by at least `earlier_head_min_gain`: the earlier stage's head is the plan with the
    largest regret of all when it is wrong, and a tie or a small lead on a few dozen selection images is noise.
    The better head goes on where it is already good (at least `linear_min_select_acc`): fine-tuning has little
    left to gain there and costs several times more. Elsewhere the network is fine-tuned, the measured domain
    choosing how (`large-similar` or `large-different`). Measured on the domain bench: docs/decisions.md, "When a
    linear head is enough"."""
    finetune = f"large-{domain}"
    if not scores:
        return finetune, f"no linear head could run: {finetune} (the network is fine-tuned)"
    best = _better_head(scores, thresholds.earlier_head_min_gain)
    acc, need = scores[best], thresholds.linear_min_select_acc
    if acc >= need:
        return best, (f"the better linear head, {best}, gets {acc:.3f} of the selection images right (>= {need:g}): "
                      "it goes on (fine-tuning has little left to gain, at several times the cost)")
    if linear_only:
        return best, (f"the better linear head, {best}, gets only {acc:.3f} of the selection images right (< {need:g}), "
                      f"so the network would be fine-tuned, but {linear_only} applies to linear heads only: {best} goes "
                      f"on. Leave {linear_only} out to let the network be fine-tuned")
    return finetune, (f"the better linear head, {best}, gets only {acc:.3f} of the selection images right "
                      f"(< {need:g}): the network is fine-tuned ({finetune}, by the measured domain)")


def _better_head(scores: Mapping[str, float], min_gain: float) -> str:
    """The head on the final features, unless the one on an earlier stage beats it by at least `min_gain` (or it
    did not run)."""
    final, earlier = "small-similar", "small-different"
    if final not in scores:
        return max(scores, key=lambda s: scores[s])
    if earlier in scores and scores[earlier] >= scores[final] + min_gain - 1e-9:
        return earlier
    return final


def pilot_separates(winner_only: int, other_only: int, z: float = 1.96) -> bool:
    """Whether the pilot's winner beats another candidate beyond the noise of the selection images.

    A paired test on the images where the two disagree (McNemar's, normal approximation): `winner_only`
    images only the winner got right, `other_only` only the other. With no disagreement there is no
    evidence either way (False)."""
    disagree = winner_only + other_only
    return disagree > 0 and (winner_only - other_only) ** 2 > z * z * disagree


def resolve_frozen_count(plan: Plan, n_backbone_groups: int) -> int:
    """How many layer groups, from the bottom, stay frozen (the head group always trains)."""
    if plan.train_on_features:
        return n_backbone_groups
    if plan.freeze_groups is not None:
        if not 0 <= plan.freeze_groups <= n_backbone_groups:
            raise UserError(f"--freeze-groups {plan.freeze_groups} is out of range: this model has "
                            f"{n_backbone_groups} backbone layer groups (0 trains all, "
                            f"{n_backbone_groups} freezes the whole backbone). `finetune plan` lists them.")
        return plan.freeze_groups
    trainable = math.ceil(plan.trainable_fraction * n_backbone_groups - 1e-9)
    return n_backbone_groups - min(n_backbone_groups, max(0, trainable))


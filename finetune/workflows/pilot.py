"""The pilot: on little data, is a linear head on the frozen features enough, or must the network be fine-tuned?

The candidates (`strategy.decide.pilot_candidates`: the two linear heads) are executed by `run_plan` on the
fit part of the training split, on cached features (seconds: no backbone pass), and scored the same way, on
the cached centre-crop features of the selection part of train, which none of them fitted on or chose anything
with.
`strategy.decide.settle_pilot` keeps the better head where it is already good and fine-tunes the network
elsewhere. The user's val and test are not read.

`run_pilot` runs network candidates too (on a budget: the fit part capped at `PILOT_MAX_IMAGES`,
stratified, for a share of the epochs): the domain bench pilots all four scenarios with it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune import runtime, timing
from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits, Sample
from finetune.data.profile import stratified_subset
from finetune.errors import UserError
from finetune.evaluation.tta import predict_sources
from finetune.model.backbone import Backbone, create_backbone
from finetune.strategy.decide import Plan, load_thresholds, pilot_candidates, pilot_separates, settle_pilot
from finetune.strategy.cost import pilot_sentence
from finetune.strategy.report import unresolved_sentence
from finetune.strategy.measure import Decision, plan_for, preserved_rng, with_plan
from finetune.model.heads import init_head
from finetune.training.recipe import check_feature_plan_options, model_kwargs, resolve_recipe
from finetune.training import distributed
from finetune.training.distributed import QuietLogger
from finetune.training.plan_context import RunContext
from finetune.training.run_plan import run_plan

log = logging.getLogger(__name__)

PILOT_MAX_IMAGES = 1000  # training images a network candidate fits on in the pilot (stratified subset)
PILOT_EPOCH_SHARE = 0.4  # of the plan's epochs, for a network candidate (at least 1)


@dataclass
class PilotResult:
    """What the pilot ran and measured; `winner` is the plan that goes on."""

    candidates: list[str]
    reasons: list[str]
    winner: str
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # scenario -> select_acc, seconds, epochs
    skipped: dict[str, str] = field(default_factory=dict)  # scenario -> why it could not run
    select_images: int = 0
    seconds: float = 0.0
    choice: str = ""  # why the winner goes on (decide.settle_pilot), when the pilot's best is not simply it
    # scenario -> [images only the winner got right, images only it got right], for each candidate the
    # selection images cannot tell from the winner (decide.pilot_separates)
    unresolved: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def find_unresolved(self, correct: dict[str, np.ndarray]) -> None:
        """Which candidates the winner does not beat beyond the noise of the selection images (`correct`:
        scenario -> which selection images it got right)."""
        won = correct[self.winner]
        for scenario, right in correct.items():
            if scenario != self.winner:
                w, o = int((won & ~right).sum()), int((right & ~won).sum())
                if not pilot_separates(w, o):
                    self.unresolved[scenario] = [w, o]


def pilot_epochs(epochs: int) -> int:
    return max(1, math.ceil(epochs * PILOT_EPOCH_SHARE))


def run_pilot(cfg: TrainConfig, decision: Decision, candidates: list[str], reasons: list[str], backbone: Backbone,
              splits: FolderSplits, rt: runtime.Runtime, folds: int = 1) -> PilotResult:
    """Run each candidate on the budget and score it on the selection part of train. With `folds` > 1, each
    candidate runs once per fold of train (`FolderSplits.folds`) and is scored on all the training images,
    each predicted by the run that did not fit on it."""
    started = time.perf_counter()
    inners = [splits.selection(cfg.select_share, cfg.seed)] if folds < 2 else splits.folds(folds, cfg.seed)
    budgets = [dataclasses.replace(i, train=stratified_subset(i.train, PILOT_MAX_IMAGES)) for i in inners]
    result = PilotResult(candidates, reasons, candidates[0], select_images=sum(len(i.val) for i in inners))
    correct: dict[str, np.ndarray] = {}
    with preserved_rng(), tempfile.TemporaryDirectory(prefix="finetune-pilot-") as workdir:
        for scenario in candidates:
            try:
                runs = [_run_candidate(cfg, decision, scenario, backbone, b, splits.train, rt,
                                       Path(workdir) / f"fold{i}")
                        for i, b in enumerate(budgets)]
            except UserError as e:  # an option the candidate cannot honour (e.g. --mixup on a feature plan)
                result.skipped[scenario] = e.message
                continue
            correct[scenario] = np.concatenate([right for _, right in runs])
            result.scores[scenario] = runs[0][0] if len(runs) == 1 else {
                **runs[0][0], "select_acc": round(float(correct[scenario].mean()), 4),
                "seconds": round(sum(r["seconds"] for r, _ in runs), 1), "folds": len(runs)}
    ran = [s for s in candidates if s in result.scores]
    if ran:  # candidates keep their order (the measured cell first): a tie goes to the earlier one
        result.winner = max(ran, key=lambda s: (result.scores[s]["select_acc"], -ran.index(s)))
        result.find_unresolved(correct)
    result.seconds = round(time.perf_counter() - started, 1)
    log.info("Pilot (%.0f s): %s -> %s%s", result.seconds,
             ", ".join(f"{s} {v['select_acc']:.4f}" for s, v in result.scores.items()), result.winner,
             f" (not separated from {', '.join(result.unresolved)} on {result.select_images} selection images)"
             if result.unresolved else "")
    return result


def _run_candidate(cfg: TrainConfig, decision: Decision, scenario: str, backbone: Backbone, splits: FolderSplits,
                   within: list[Sample], rt: runtime.Runtime, workdir: Path) -> tuple[dict[str, Any], np.ndarray]:
    """The candidate's score on the selection images, and which of them it got right. `splits` is cut from the
    training split `within`, whose cached features the candidate reads (`RunContext.features_within`); the run
    that follows the pilot reads the same entry."""
    started = time.perf_counter()
    plan = plan_for(decision, scenario, cfg)
    if plan.train_on_features:
        check_feature_plan_options(cfg, scenario)
    else:
        plan = dataclasses.replace(plan, epochs=pilot_epochs(plan.epochs))
    recipe = resolve_recipe(cfg, scenario)
    # A fresh network each (fine-tuning moves the weights; the feature cache is keyed by the pretrained ones),
    # built as `train` builds it.
    net = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True,
                          **({} if plan.train_on_features else model_kwargs(recipe)))
    init_head(net.model, recipe.drop_connect)
    candidate = with_plan(decision, plan, net.model, cfg.lr)
    # Nothing of a candidate is tracked (a logger that keeps nothing: the LR monitor needs one).
    # The budget is cut from the training split, whose features the measurement cached: read, not extracted.
    ctx = RunContext(run_id=f"pilot-{scenario}", output=workdir / scenario, logger=QuietLogger(f"pilot-{scenario}"),
                     progress=False, features_within=within)
    fit = run_plan(cfg, candidate, recipe, net, splits, ctx, rt)
    if plan.train_on_features:  # the head on the selection images' cached centre-crop features: no network pass
        probs = fit.center_outputs["val"].logits[:, 0].numpy()
    else:
        probs = predict_sources(fit.net, [s.path for s in splits.val], net.data_config, "center", cfg.batch_size,
                                cfg.max_image_pixels, rt)[0].numpy()
    labels = np.array([s.label for s in splits.val])
    ok = ~np.isnan(probs).any(axis=1)
    right = ok & (np.nan_to_num(probs).argmax(axis=1) == labels)
    acc = float(right[ok].mean()) if ok.any() else 0.0
    return ({"select_acc": round(acc, 4), "seconds": round(time.perf_counter() - started, 1),
             "epochs": plan.epochs, "fit_images": len(splits.train)}, right)


def pilot_plan(decision: Decision, winner: Plan, pilot: PilotResult) -> Plan:
    """The winner's plan, saying that the pilot chose it and on what."""
    scores = ", ".join(f"{s} {v['select_acc']:.3f}" for s, v in pilot.scores.items())
    skipped = "".join(f"; {s} not run ({why})" for s, why in pilot.skipped.items())
    unresolved = f"; {unresolved_sentence(pilot.to_dict())}" if pilot.unresolved else ""
    choice = f"; {pilot.choice}" if pilot.choice else ""
    why = (f"pilot ({pilot.seconds:.0f} s): {' '.join(pilot.reasons)}; candidates scored on {pilot.select_images} "
           f"held-out training images: {scores}{skipped}{choice} -> {pilot.winner}{unresolved}")
    # What the measurement said (size, domain: the first two reasons of a measured cell), then the winner's own
    # reasons (not the cell's plan: a fine-tuning winner is not described as the linear head it replaced).
    measured = [r for r in decision.plan.reasons[:2] if "forced" not in r]
    return dataclasses.replace(winner, source="pilot", reasons=list(dict.fromkeys([why, *measured, *winner.reasons[1:]])))


@timing.timed("pilot")
def settle(cfg: TrainConfig, decision: Decision, backbone: Backbone, splits: FolderSplits,
           rt: runtime.Runtime) -> Decision:
    """The measured decision, or, on little data, the pilot's choice (`decision.pilot` says): the better linear
    head where it is good enough, else the network fine-tuned. A forced scenario, or a network without pretrained
    weights, is not piloted."""
    if decision.plan.source != "measured" or backbone.weights_source == "none":
        return decision
    thresholds = load_thresholds()
    candidates, reasons = pilot_candidates(decision.profile.to_dict(), decision.similarity.to_dict(), thresholds)
    if len(candidates) < 2:
        return decision
    linear_only = "--aug-views" if cfg.aug_views is not None else None  # an option only a linear head honours
    if distributed.is_multi_process():  # rank 0 alone, inside the one-time work: it cannot start Trainers
        return _without_pilot(cfg, decision, backbone, candidates, linear_only)
    select = round(len(splits.train) * cfg.select_share)
    log.info("Pilot: %s, %s", ", ".join(candidates),
             pilot_sentence(len(candidates), select, decision.timings.get("images_per_s")))
    pilot = run_pilot(cfg, decision, candidates, reasons, backbone, splits, rt)
    chosen, why = settle_pilot(decision.plan.domain, {s: v["select_acc"] for s, v in pilot.scores.items()},
                               thresholds, linear_only)
    if chosen in pilot.scores and pilot.scores[chosen]["select_acc"] < thresholds.linear_min_select_acc:
        log.warning(why)  # a head below the threshold goes on only because the user's option asks for one
    if chosen != pilot.winner:
        pilot.unresolved = {}  # between the heads, which do not go on
    pilot.winner, pilot.choice = chosen, why
    plan = pilot_plan(decision, plan_for(decision, chosen, cfg), pilot)
    settled = with_plan(decision, plan, backbone.model, cfg.lr)
    return dataclasses.replace(settled, pilot=pilot.to_dict(),
                               timings={**decision.timings, "pilot_s": pilot.seconds})


def _without_pilot(cfg: TrainConfig, decision: Decision, backbone: Backbone, candidates: list[str],
                   linear_only: str | None) -> Decision:
    """A multi-process run, which cannot pilot: without the evidence that a linear head is enough the network is
    fine-tuned, unless the user gave an option only a linear head honours (then the measured cell runs)."""
    if linear_only:
        note = (f"pilot skipped: a multi-process run cannot pilot; {linear_only} applies to linear heads only, so "
                f"the measured cell {decision.plan.scenario} runs; run `finetune plan` on one device to compare "
                f"{', '.join(candidates)}")
        log.warning(note)
        return dataclasses.replace(decision, plan=dataclasses.replace(decision.plan,
                                                                      reasons=[*decision.plan.reasons, note]))
    finetune = f"large-{decision.plan.domain}"
    note = (f"pilot skipped: a multi-process run cannot pilot, so without the evidence that a linear head is "
            f"enough the network is fine-tuned ({finetune}); run `finetune plan` on one device to compare "
            f"{', '.join(candidates)}, then pass its choice as --scenario")
    log.warning(note)
    plan = plan_for(decision, finetune, cfg)
    plan = dataclasses.replace(plan, source="measured", reasons=[note, *plan.reasons[1:]])
    return with_plan(decision, plan, backbone.model, cfg.lr)

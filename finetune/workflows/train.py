"""`train(cfg)`: the pipeline of `finetune train`, in the order the data flows.

data -> backbone -> measure and decide -> run the plan -> evaluate -> publish. The CLI only parses
options into a TrainConfig and calls this; tests and benchmarks call it directly too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytorch_lightning as pl

from finetune import runtime, timing, tracking
from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits, data_name, read_exclude_list, scan_folder
from finetune.errors import UserError
from finetune.evaluation import evaluate, multilabel, trust
from finetune.model.artifact import ModelSpec, load_scoring, save_model
from finetune.model.scoring import Scoring
from finetune.model.backbone import Backbone, create_backbone
from finetune.model.stages import stage_index
from finetune.strategy.cost import estimate_sentence
from finetune.strategy.decide import SCENARIO_NAMES, Plan
from finetune.strategy.measure import Decision, measure_and_decide, preserved_rng, with_plan
from finetune.tracking import registry
from finetune.training import checkpoints, distributed
from finetune.workflows import pilot
from finetune.model.heads import init_head
from finetune.training.recipe import (Recipe, check_feature_plan_options, check_selection_option, model_kwargs,
                                      resolve_recipe)
from finetune.training.plan_context import FitResult, RunContext
from finetune.training.run_plan import run_plan
from finetune.workflows import preflight, run_folder
from finetune.workflows.audit import audit_counts, audit_or_note, leaked_images
from finetune.workflows.evaluate import log_evaluation
from finetune.workflows.resume import DATA_TAG, OUTPUT_TAG, ResumePoint

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def dataset_params(splits: FolderSplits) -> dict[str, Any]:
    return {"layout": splits.layout, **splits.counts()}


def run_name_for(cfg: TrainConfig) -> str:
    return cfg.run_name or f"{cfg.model.split('.')[0]}-{data_name(cfg.data_dir)}-{time.strftime('%Y%m%d-%H%M%S')}"


def recipe_scenario(cfg: TrainConfig) -> str:
    """The scenario whose default recipe applies in commands that do not measure (sanity, lr-find).

    `train` measures the scenario and uses the plan's; without a measurement `auto` trains the full
    network, which is the large-similar cell of the table, so it gets that cell's recipe.
    """
    return "large-similar" if cfg.scenario == "auto" else cfg.scenario


def train(cfg: TrainConfig, tags: dict[str, str] | None = None, resume_from: ResumePoint | None = None,
          plan_override: Callable[[Plan], Plan] | None = None) -> dict[str, Any] | None:
    """Fine-tune and return the summary (also written to OUTPUT/summary.json, with `timing`: seconds per phase).

    See `_train` for the arguments.
    """
    with timing.recording() as phases, run_folder.held_for_this_call(), _fail_run_on_error() as started_run:
        summary = _train(cfg, tags, resume_from, plan_override, started_run)
    if summary is not None:
        summary["timing"] = phases.to_dict()
        tracking.write_json(Path(summary["output"]) / "summary.json", summary)
    return summary


@contextlib.contextmanager
def _fail_run_on_error() -> Iterator[list[str]]:
    """Yields a list that `_train` puts the MLflow run id in once the run exists; any error after that ends the run
    FAILED (KILLED for an interruption) unless the code that raised already ended it, so no run stays RUNNING."""
    started: list[str] = []
    try:
        yield started
    except BaseException as e:
        if started:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, checkpoints.Interrupted)) else "FAILED"
            tracking.end_run_if_running(started[0], status)
        raise


def _train(cfg: TrainConfig, tags: dict[str, str] | None, resume_from: ResumePoint | None,
           plan_override: Callable[[Plan], Plan] | None, started_run: list[str]) -> dict[str, Any] | None:
    """Fine-tune and return the summary (also written to OUTPUT/summary.json).

    Args:
        cfg: the resolved config.
        tags: extra MLflow run tags (a sweep sets ``mlflow.parentRunId`` to nest its trials).
        resume_from: continue this run from its last checkpoint, logging into the same MLflow run.
        plan_override: adjusts the decided plan before it runs (bench baselines, tests).
        started_run: receives the MLflow run id as soon as the run exists (rank 0).

    Returns:
        The summary on global rank 0; None on the other ranks of a multi-process run.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    rt = _start_process(cfg)
    cfg, backbone_choice = _choose_backbone(cfg, rt)
    if cfg.output and resume_from is None and distributed.is_global_zero():
        run_folder.check_free(cfg.output)  # before the measurement: claimed when the run starts
    splits, decision, backbone, recipe = prepare_run(cfg, rt, plan_override)
    if resume_from is not None:
        run_folder.check_files(resume_from.output, resume_from.files_sha256, splits, resume_from.run_id)
    run_id, output = distributed.on_rank_zero(
        lambda: _start_run(cfg, tags, resume_from, backbone, splits, decision, recipe, started_run))
    audit = distributed.on_rank_zero(lambda: _audit(cfg, splits, output, run_id, backbone.weights_source, rt))
    if decision.plan.train_on_features and not distributed.is_global_zero():
        return None  # a head on cached features is trained by one process
    pending = tracking.PendingLog(output, run_id)
    # Only rank 0 opens an MLflow client (opening one creates a new store's tables).
    logger = (tracking.resilient_logger(cfg.experiment, run_id, pending) if distributed.is_global_zero()
              else distributed.QuietLogger(run_id))
    ctx = RunContext(run_id, output, logger, resume_from.checkpoint if resume_from else None,
                     identity=run_folder.run_identity(splits, output, run_id))
    fit = run_plan(cfg, decision, recipe, backbone, splits, ctx, rt)
    if fit is None:
        return None  # rank 0 evaluates, writes and logs
    tta, spec, model_dir, eval_metrics = _choose_save_and_evaluate(cfg, backbone, splits, decision.plan, fit, audit,
                                                                   output, rt)
    summary = _summary(cfg, decision, recipe, splits, fit, eval_metrics, run_id, model_dir, output, started)
    summary["tta"] = {k: tta[k] for k in ("mode", "chosen_by", "scores") if k in tta}
    if splits.multi_label:
        summary["task"], summary["thresholds"] = "multi-label", tta["thresholds"].to_dict()
    summary["calibration"] = {"temperature": spec.temperature, "heldout_images": tta["heldout_images"]}
    summary["unknown"], summary["audit"] = spec.ood, audit
    if backbone_choice is not None:
        summary["backbone_choice"] = backbone_choice
        tracking.log_dict(run_id, backbone_choice, "backbone_choice.json")
    if resume_from is not None:
        summary["resumed_from_epoch"] = resume_from.epochs_done
    tracking.write_json(output / "summary.json", summary)
    return _publish(cfg, summary, eval_metrics, pending, model_dir)


def _choose_save_and_evaluate(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, plan: Plan, fit: FitResult,
                              audit: dict[str, Any], output: Path, rt: runtime.Runtime
                              ) -> tuple[dict[str, Any], ModelSpec, Path, dict[str, float]]:
    """The choices made after the fit on held-out training images (crop mode, temperature, unknown threshold; with
    several labels per image, each class's threshold), the model saved with them, then val and test read once."""
    if splits.multi_label:
        tta = multilabel.thresholds_after_training(fit.heldout, len(splits.classes), backbone.data_config,
                                                   cfg.threshold_precision, cfg.batch_size, cfg.max_image_pixels, rt)
    else:
        tta = trust.choose_after_training(cfg.tta, fit.heldout, backbone.data_config, batch_size=cfg.batch_size,
                                          max_pixels=cfg.max_image_pixels, rt=rt)
    spec, model_dir = _save(cfg, backbone, splits, plan, fit, tta, output)
    # Val and test, read once now that every choice is made; written locally first, sent to MLflow later.
    if splits.multi_label:
        metrics = multilabel.evaluate_parts(fit.net, spec, {"val": splits.val, "test": splits.test}, output,
                                            cfg.batch_size, cfg.max_image_pixels, rt)
    else:
        metrics = evaluate.after_training(fit.net, spec, splits, cfg, output, rt, tta["mode"], fit.center_outputs,
                                          leaked=audit.get("leaked"), scoring=load_scoring(model_dir, spec))
    return tta, spec, model_dir, metrics


@timing.timed("rank")
def _choose_backbone(cfg: TrainConfig, rt: runtime.Runtime) -> tuple[TrainConfig, dict[str, Any] | None]:
    """With `--model auto`: the best of `--candidates` as `finetune rank` ranks them on the training split (rank 0
    ranks, every rank trains its choice); the config then names it. Else the config as it is."""
    if cfg.model != "auto":
        return cfg, None
    from finetune.workflows.rank import rank_backbones

    choice = distributed.on_rank_zero(lambda: rank_backbones(cfg, cfg.candidates, cfg.max_latency_ms, rt))
    log.info("Backbone: %s (best of %d candidates by k-NN accuracy of frozen features, %.0f s)", choice["best"],
             len(choice["candidates"]), choice["seconds"])
    return dataclasses.replace(cfg, model=choice["best"], weights=choice["best_weights"]), choice


@timing.timed("start")
def _start_process(cfg: TrainConfig) -> runtime.Runtime:
    """This process's runtime, the options checked, and (DDP) every rank joined in the process group."""
    devices = runtime.parse_devices(cfg.devices)
    # Device (this rank's own GPU), precision, torch threads vs loader workers: decided once, used everywhere.
    rt = runtime.configure(cfg.accelerator, devices, cfg.strategy, cfg.precision, cfg.num_workers)
    preflight.check(cfg, devices, rt.precision)
    # Every rank exists and is in the process group from here on, whoever launched them; the one-time
    # work runs on rank 0 alone and the other ranks receive its results.
    distributed.start(cfg.accelerator, devices, cfg.strategy, cfg.num_nodes, rt.precision)
    return rt


def prepare_run(cfg: TrainConfig, rt: runtime.Runtime, plan_override: Callable[[Plan], Plan] | None = None
                ) -> tuple[FolderSplits, Decision, Backbone, Recipe]:
    """Everything before the fit, as `train` does it (and lr-find): the scanned splits, the decision (measured,
    piloted where unclear, checked against the options), the backbone to train and the plan's recipe."""
    splits, decision, backbone = _measure_and_decide(cfg, rt, plan_override)
    if decision.plan.train_on_features:  # measured (or forced, and already checked by the preflight)
        check_feature_plan_options(cfg, decision.plan.scenario)
        check_selection_option(cfg, decision.plan.scenario, piloted=decision.pilot is not None)
    recipe, backbone, decision = _recipe_and_network(cfg, splits, decision, backbone)
    return splits, decision, backbone, recipe


@timing.timed("decide")
def _measure_and_decide(cfg: TrainConfig, rt: runtime.Runtime, plan_override: Callable[[Plan], Plan] | None
                        ) -> tuple[FolderSplits, Decision, Backbone]:
    """Scan, build the backbone, measure and decide: on rank 0, the other ranks get the result."""
    backbone: Backbone | None = None

    def measure() -> tuple[FolderSplits, Decision]:
        nonlocal backbone
        splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels,
                             exclude=read_exclude_list(cfg.exclude), multi_label=True)
        _check_task_options(cfg, splits)
        if cfg.batch_size > len(splits.train):
            raise UserError(f"batch_size {cfg.batch_size} is larger than the training split "
                            f"({len(splits.train)} images). Use --batch-size {len(splits.train)} or less.")
        # The source head is kept for the similarity measure (how sure the pretrained classifier is).
        backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
        decision = pilot.settle(cfg, measure_and_decide(cfg, splits, backbone, rt), backbone, splits, rt)
        if plan_override is not None:
            decision = with_plan(decision, plan_override(decision.plan), backbone.model, cfg.lr)
        log.info("Scenario %s (%s): %s", decision.plan.scenario, decision.plan.source,
                 estimate_sentence(decision.plan, decision.profile.to_dict(), decision.timings.get("images_per_s")))
        return splits, decision

    splits, decision = distributed.on_rank_zero(measure)
    if backbone is None:  # another rank: the same network; DDP gives it rank 0's weights when training starts
        backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
    return splits, decision, backbone


def _check_task_options(cfg: TrainConfig, splits: FolderSplits) -> None:
    """Options that act on one kind of labels only: refused on the other, before anything is trained."""
    if cfg.threshold_precision is not None and not splits.multi_label:
        raise UserError("--threshold-precision sets the thresholds of a model with several labels per image (a "
                        "label file with a 'labels' column); this data has one label per image. Leave it out.")
    if splits.multi_label and cfg.tta not in ("auto", "center"):
        raise UserError(f"--tta {cfg.tta}: a model with several labels per image uses the centre crop (its thresholds "
                        "are chosen on it). Leave --tta out.")


@timing.timed("network")
def _recipe_and_network(cfg: TrainConfig, splits: FolderSplits, decision: Decision, backbone: Backbone
                        ) -> tuple[Recipe, Backbone, Decision]:
    """The plan's recipe, and the network it trains (rebuilt with dropout / stochastic depth when asked)."""
    plan = decision.plan
    # From random init (no domain to measure) or for a bench baseline that is no scenario, the unmeasured
    # default recipe applies.
    measured_domain = plan.source == "forced" or backbone.weights_source != "none"
    recipe = resolve_recipe(cfg, plan.scenario if plan.scenario in SCENARIO_NAMES and measured_domain
                            else recipe_scenario(cfg))
    if model_kwargs(recipe) and not plan.train_on_features:
        # Dropout / stochastic depth are create-time options: rebuild the (measured) backbone with them.
        backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size,
                                   keep_source_head=True, **model_kwargs(recipe))  # same weights: same cache
        decision = with_plan(decision, plan, backbone.model, cfg.lr)
    init_head(backbone.model, recipe.drop_connect)
    return recipe, backbone, decision


@timing.timed("start run")
def _start_run(cfg: TrainConfig, tags: dict[str, str] | None, resume_from: ResumePoint | None, backbone: Backbone,
               splits: FolderSplits, decision: Decision, recipe: Recipe, started_run: list[str]) -> tuple[str, Path]:
    """The output folder (claimed for this run alone) and the MLflow run (new, or the resumed one), by rank 0."""
    run_name = run_name_for(cfg)
    if resume_from is not None:
        run_id = resume_from.run_id
        output = run_folder.claim(resume_from.output, run_id, resuming=True)
        tracking.client().update_run(run_id, status="RUNNING")
        started_run.append(run_id)
        log.info("Resuming MLflow run %s from %s (%d epoch(s) done)", run_id, resume_from.checkpoint,
                 resume_from.epochs_done)
    else:
        # An explicit folder is claimed before the run exists, so a refusal leaves nothing behind; the default
        # folder's name holds the run id, so no two runs can share it.
        output = run_folder.claim(cfg.output) if cfg.output else None
        if output is not None:  # first, so that a run killed from here on can be resumed
            tracking.write_json(output / "config.json", cfg.to_dict())
        experiment_id = tracking.ensure_experiment(cfg.experiment)
        run = tracking.client().create_run(experiment_id, run_name=run_name, tags={
            **(tags or {}), DATA_TAG: str(Path(cfg.data_dir).resolve())})
        run_id = run.info.run_id
        started_run.append(run_id)
        if output is None:
            output = run_folder.claim(Path("outputs") / f"{run_name}-{run_id[:8]}")
            tracking.write_json(output / "config.json", cfg.to_dict())
        run_folder.record(output, run_id)
        tracking.client().set_tag(run_id, OUTPUT_TAG, str(output))
        log.info("MLflow run %s (experiment %r) at %s", run_id, cfg.experiment, tracking.tracking_uri())
    _log_run_inputs(cfg, run_id, backbone, splits, output, recipe)
    tracking.log_params(run_id, decision.params())
    tracking.log_dict(run_id, decision.to_dict(), "plan.json")
    return run_id, output


def _audit(cfg: TrainConfig, splits: FolderSplits, output: Path, run_id: str, weights_source: str,
           rt: runtime.Runtime) -> dict[str, Any]:
    """The audit of `finetune audit` on the scanned splits (rank 0; features mostly cached by the
    measurement): OUTPUT/audit.json and the sheets, also in the run. Plain data; never fails the run."""
    # Extracted or read from the cache, the audit leaves the random generators as it found them: a cold and a
    # warm cache train the same model.
    with preserved_rng():
        result = audit_or_note(cfg, splits, output, weights_source, rt)
    if "skipped" in result:
        return result
    audit = {"report": str(output / "audit.json"), "counts": audit_counts(result), "leaked": leaked_images(result)}
    try:
        tracking.log_artifact(run_id, output / "audit.json")
        for sheet in result["sheets"]:
            tracking.log_artifact(run_id, sheet, "audit")
        tracking.log_params(run_id, {"audit": audit["counts"]})
    except Exception as e:  # the store's trouble shows again (and is handled) when the run logs its metrics
        log.warning("The audit could not be logged to MLflow (%s: %s); it is in %s", type(e).__name__, e, output)
    return audit


@timing.timed("save")
def _save(cfg: TrainConfig, backbone: Backbone, splits: FolderSplits, plan: Plan, fit: FitResult,
          tta: dict[str, Any], output: Path) -> tuple[ModelSpec, Path]:
    """The trained model on disk (OUTPUT/model): weights, spec (crop mode, temperature, unknown threshold) and
    the unknown score's bank (the features of the images the saved model fitted on)."""
    spec = ModelSpec(architecture=backbone.model_name.split(".")[0], num_classes=len(splits.classes),
                     class_names=splits.classes, data_config=backbone.data_config,
                     create_kwargs=backbone.create_kwargs, weights_source=backbone.weights_source,
                     scenario=plan.scenario, default_tta=tta["mode"], head_stage=stage_index(plan.head_stage),
                     temperature=tta["temperature"],
                     thresholds=tta["thresholds"].values if "thresholds" in tta else None)
    banks = tta.pop("banks")
    bank = fit.bank() if fit.bank is not None else banks[0]
    if tta["ood"] is not None and len(bank):
        spec.ood = {**tta["ood"], "bank_images": int(len(bank))}
    model_dir = save_model(output / "model", fit.net, spec)
    Scoring(spec.temperature, spec.ood, bank if spec.ood else None).save_bank(model_dir)
    return spec, model_dir


def metric_sources(splits: FolderSplits, fit: FitResult) -> dict[str, str]:
    """Which images each number of the summary comes from."""
    val_from = {"split-folders": "the val folder", "class-folders": "split off the class folders (--val-fraction)",
                "train-test-folders": "split off the train folder (--val-fraction)",
                "csv-splits": "the label file's val rows",
                "csv": "split off the label file's rows (--val-fraction)",
                "csv-train-test": "split off the label file's train rows (--val-fraction)"}[splits.layout]
    sources = {"select_*": f"choices (epochs, weights, head, crop mode, temperature, unknown threshold): "
                           f"{fit.selection['protocol']}",
               "val_*": f"val: {len(splits.val)} images, {val_from}; read once, after every choice was made"}
    if splits.test:
        where = "the label file's test rows" if splits.layout.startswith("csv") else "the test folder"
        sources["test_*"] = f"test: {len(splits.test)} images, {where}; read once, after every choice"
    return sources


def _summary(cfg: TrainConfig, decision: Decision, recipe: Recipe, splits: FolderSplits, fit: FitResult,
             eval_metrics: dict[str, float], run_id: str, model_dir: Path, output: Path,
             started: float) -> dict[str, Any]:
    plan = decision.plan
    summary = {
        "scenario": plan.scenario,
        "plan": {**plan.to_dict(), "groups": [dataclasses.asdict(g) for g in decision.groups], **fit.report},
        "profile": decision.profile.to_dict(),
        "similarity": decision.similarity.to_dict(),
        "pilot": decision.pilot,
        "recipe": recipe.to_dict(),
        "metrics": {**fit.metrics, **eval_metrics},
        "metric_sources": metric_sources(splits, fit),
        "selection": fit.selection,
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking.tracking_uri(),
        "experiment": cfg.experiment,
        "classes": splits.classes,
        "data": dataset_params(splits),
        "skipped_files": [s.path for s in splits.skipped],
        "excluded": len(splits.excluded),
        "model_dir": str(model_dir.resolve()),
        "output": str(output.resolve()),
        "wall_time_s": round(time.time() - started, 1),
    }
    if fit.ddp is not None:
        summary["ddp"] = fit.ddp
    return summary


@timing.timed("publish")
def _publish(cfg: TrainConfig, summary: dict[str, Any], eval_metrics: dict[str, float],
             pending: tracking.PendingLog, model_dir: Path) -> dict[str, Any]:
    """The report, the pyfunc model, the registry version and the final metrics to MLflow; everything a
    user needs is on disk already, so the store going away here loses nothing (`finetune upload`)."""
    run_id, output = summary["mlflow_run_id"], Path(summary["output"])
    if not pending.active:
        try:
            log_evaluation(run_id, output, eval_metrics)
            tracking.log_dict(run_id, {k: summary[k] for k in ("metric_sources", "tta", "calibration", "unknown")},
                              "metric_sources.json")
            summary.update(registry.publish(run_id, model_dir, summary, summary["tta"]["mode"], cfg.register,
                                            cfg.max_image_pixels))
            tracking.write_json(output / "summary.json", summary)
        except UserError:
            raise
        except Exception as e:  # the store went away after training: keep going, nothing is lost locally
            pending.failed("publish", e)
    if pending.active:
        log.warning("MLflow was unreachable: the pyfunc model was not logged%s. The trained model is in %s.",
                    f" nor registered as {cfg.register!r}" if cfg.register else "", model_dir)
    numeric = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}
    if not tracking.finish_run(run_id, output, numeric, pending):
        summary["mlflow_pending"] = str(pending.path)
        log.warning("MLflow was unreachable (%s): the model and summary are in %s. Once the store is back, "
                    "send the rest with:  finetune upload %s", pending.error, output, output)
    return summary


def _log_run_inputs(cfg: TrainConfig, run_id: str, backbone, splits: FolderSplits, output: Path, recipe) -> None:
    tracking.log_params(run_id, {"config": cfg.to_dict(),
                                 "model": backbone.model_name, "weights_source": backbone.weights_source,
                                 "data": dataset_params(splits), "data_config": backbone.data_config,
                                 "recipe": recipe.to_dict()})
    tracking.log_dict(run_id, cfg.to_dict(), "config.json")
    tracking.log_dict(run_id, {"classes": splits.classes}, "classes.json")
    tracking.log_dict(run_id, {"count": len(splits.skipped),
                               "files": [{"path": s.path, "reason": s.reason} for s in splits.skipped]},
                      "skipped_files.json")
    if splits.excluded:  # what --exclude left out, as it matched the folder
        tracking.log_text(run_id, "\n".join(splits.excluded) + "\n", "excluded.txt")
    tracking.write_json(output / "config.json", cfg.to_dict())

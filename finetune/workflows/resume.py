"""`finetune train --resume RUN_ID|last`: find a run's output folder, checkpoint and saved config."""

from __future__ import annotations

from dataclasses import dataclass
import json
import logging
from pathlib import Path
from typing import Any

from finetune import tracking
from finetune.config import TrainConfig, config_keys, resolve_config
from finetune.errors import UserError
from finetune.training.checkpoints import identity_of, load_checkpoint, resume_candidates
from finetune.workflows import run_folder

log = logging.getLogger(__name__)

OUTPUT_TAG = "finetune.output"


DATA_TAG = "finetune.data_dir"


# Options that may change when a run is resumed; anything else would make it a different run.
RESUMABLE_OVERRIDES = ("epochs", "num_workers", "accelerator", "devices", "num_nodes", "strategy", "precision",
                       "register")


@dataclass(frozen=True)
class ResumePoint:
    run_id: str
    output: Path
    checkpoint: Path | None  # None: stopped before its first checkpoint, so it starts over
    epochs_done: int
    config: dict[str, Any]
    finished: bool = False
    files_sha256: str | None = None  # the digest of the run's file list, from its checkpoint
    data_dir: str | None = None  # the data folder, absolute, as the run started (its DATA_TAG)


def locate(resume: str, experiment: str) -> ResumePoint:
    """The run to resume: an MLflow run id, or `last` (the newest run of `experiment`)."""
    c = tracking.client()
    if resume == "last":
        exp = c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{OUTPUT_TAG}` != ''",
                             order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if not runs:
            raise UserError(f"No finetune run to resume in MLflow experiment {experiment!r} at "
                            f"{tracking.tracking_uri()}. Pass --experiment or a run id to --resume.")
        run = runs[0]
    else:
        try:
            run = c.get_run(resume)
        except Exception:
            raise UserError(f"No MLflow run {resume!r} at {tracking.tracking_uri()}. Use a run id printed by "
                            "`finetune train`, or --resume last.") from None
    run_id = run.info.run_id
    output = run.data.tags.get(OUTPUT_TAG)
    if not output:
        raise UserError(f"MLflow run {run_id} was not made by `finetune train` (no {OUTPUT_TAG} tag): "
                        "nothing to resume.")
    if run_folder.is_held_elsewhere(output):
        raise UserError(f"Run {run_id} is being trained by another process now ({output} is locked). Wait for "
                        "it to end, or stop it, before resuming.")
    config_file = Path(output) / "config.json"
    if not config_file.is_file():
        raise UserError(f"Run {run_id} has no saved configuration at {config_file}; cannot resume it.")
    if not resume_candidates(output):  # killed before its first epoch ended: the same run starts over
        log.warning("Run %s has no checkpoint yet (it stopped in its first epoch): training it from the start.",
                    run_id)
        return ResumePoint(run_id, Path(output), None, 0, json.loads(config_file.read_text()),
                           data_dir=run.data.tags.get(DATA_TAG))
    ckpt, checkpoint = _newest_readable(run_id, output)
    identity = identity_of(checkpoint)
    if identity.get("run_id", run_id) != run_id:
        raise UserError(f"The checkpoint {ckpt} belongs to MLflow run {identity['run_id']}, not {run_id}: the "
                        "folder was reused. Resume that run instead, or start a new one.")
    return ResumePoint(run_id, Path(output), ckpt, int(checkpoint.get("epoch", -1)) + 1,
                       json.loads(config_file.read_text()), finished=run.info.status == "FINISHED",
                       files_sha256=identity.get("files_sha256"), data_dir=run.data.tags.get(DATA_TAG))


def _newest_readable(run_id: str, output: str) -> tuple[Path, dict[str, Any]]:
    """The newest resume point that reads whole: `last.ckpt`, else the one before it."""
    candidates = resume_candidates(output)
    for i, ckpt in enumerate(candidates):
        try:
            return ckpt, load_checkpoint(ckpt)
        except UserError as e:
            if i == len(candidates) - 1:
                raise
            log.warning("%s; resuming from the one before it, %s", e.message.split(". ")[0], candidates[i + 1])
    raise AssertionError("unreachable")


def resume_config(point: ResumePoint, data_dir: str, cli_values: dict[str, Any]) -> TrainConfig:
    """The saved configuration of the run, with the few options that may change on resume."""
    saved = {k: v for k, v in point.config.items() if k in config_keys()}  # runs saved by older versions
    # The folder as the run resolved it when it started (its MLflow tag), not its path relative to wherever the
    # resume runs; the resumed run reads the folder as given now.
    trained_on = Path(point.data_dir or saved["data_dir"]).resolve()
    if Path(data_dir).resolve() != trained_on:
        raise UserError(f"Run {point.run_id} trained on {trained_on}, not {Path(data_dir).resolve()}; resume it with "
                        "the same data folder.")
    saved["data_dir"] = data_dir
    given = {k: v for k, v in cli_values.items() if v is not None}
    changed = sorted(k for k, v in given.items()
                     if k not in RESUMABLE_OVERRIDES and saved.get(k) != v)
    if changed:
        raise UserError(f"Cannot change {', '.join(changed)} when resuming run {point.run_id} (only "
                        f"{', '.join(RESUMABLE_OVERRIDES)} may change). Start a new run instead.")
    cfg = resolve_config({}, {**saved, **{k: given[k] for k in RESUMABLE_OVERRIDES if k in given}})
    if cfg.epochs < point.epochs_done or (point.finished and cfg.epochs == point.epochs_done):
        raise UserError(f"Run {point.run_id} already trained {point.epochs_done} epoch(s)"
                        f"{' and finished' if point.finished else ''}; pass --epochs larger than "
                        f"{point.epochs_done} to train further.")
    return cfg


def resumed(resume: str, cfg: TrainConfig, given: dict[str, Any]) -> tuple[ResumePoint, TrainConfig]:
    """`finetune train --resume RUN_ID|last`: the run to continue and its saved config, with the options that may
    change (`given`: the values of the command line and the config file)."""
    tracking.check_reachable()
    point = locate(resume, cfg.experiment)
    return point, resume_config(point, cfg.data_dir, given)

"""`finetune evaluate MODEL_URI DATA_DIR`: a logged or registered model on a folder, as an MLflow run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import time
from typing import Any

from finetune import runtime, tracking
from finetune.data.folders import Sample, read_exclude_list, scan_folder
from finetune.errors import UserError
from finetune.evaluation import multilabel
from finetune.evaluation.evaluate import evaluate_splits
from finetune.model.artifact import ModelSpec


def log_evaluation(run_id: str, output: Path, metrics: dict[str, float]) -> None:
    """Send the report files (OUTPUT/evaluation/<split>/) and metrics of `evaluate_splits` to a run."""
    reports = Path(output) / "evaluation"
    for folder in sorted(p for p in reports.iterdir() if p.is_dir()) if reports.is_dir() else []:
        tracking.log_artifact(run_id, folder, f"evaluation/{folder.name}")
    c = tracking.client()
    for key, value in metrics.items():
        if not math.isnan(value):
            c.log_metric(run_id, key, value)


def _in_model_order(sample: Sample, classes: list[str], model_classes: list[str]) -> Sample:
    """A multi-label sample with its labels as the model's class indices (the data may lack some classes)."""
    return dataclasses.replace(sample, labels=tuple(sorted(model_classes.index(classes[i]) for i in sample.labels)))


def evaluate_model(model_uri: str, data_dir: str, tta: str | None = None, batch_size: int = 32,
                   num_workers: int | None = None, experiment: str = "finetune-evaluate",
                   output: str | None = None, max_pixels: int | None = None, exclude: str | None = None
                   ) -> dict[str, Any]:
    """`finetune evaluate`: a logged/registered model on a folder, as a new MLflow run; `exclude`: a file of
    image paths to leave out (logged as excluded.txt)."""
    from finetune.tracking.pyfunc import load_logged_model

    rt = runtime.configure(workers=num_workers)  # device, precision, torch threads vs loader workers
    model = load_logged_model(model_uri)
    spec: ModelSpec = model.spec
    mode = tta or model.default_tta
    splits = scan_folder(data_dir, max_pixels=max_pixels or model.max_pixels, exclude=read_exclude_list(exclude),
                         multi_label=True)
    if splits.multi_label != (spec.thresholds is not None):
        raise UserError(f"{data_dir} has {'several labels' if splits.multi_label else 'one label'} per image and "
                        f"the model answers with {'several' if spec.thresholds is not None else 'one'}: evaluate it "
                        "on data labelled as it was trained.")
    if splits.multi_label and tta not in (None, "center"):
        raise UserError("A model with several labels per image is evaluated on the centre crop: leave --tta out.")
    unknown = sorted(set(splits.classes) - set(spec.class_names))
    if unknown:
        raise UserError(f"Class folder(s) {unknown} in {data_dir} are not classes of the model "
                        f"({', '.join(spec.class_names)}). Remove them or evaluate a matching model.")
    label_map = [spec.class_names.index(c) for c in splits.classes]
    parts = splits.evaluation_parts()
    out = Path(output or Path("outputs") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    run = tracking.client().create_run(tracking.ensure_experiment(experiment),
                                       run_name=f"evaluate-{Path(data_dir).resolve().name}",
                                       tags={"model_uri": model_uri, "data_dir": str(Path(data_dir).resolve())})
    run_id = run.info.run_id
    tracking.log_params(run_id, {"model_uri": model_uri, "data_dir": str(data_dir), "tta": mode,
                                 "excluded": len(splits.excluded)})
    if splits.excluded:
        tracking.log_text(run_id, "\n".join(splits.excluded) + "\n", "excluded.txt")
    if splits.multi_label:
        parts = {name: [_in_model_order(s, splits.classes, spec.class_names) for s in samples]
                 for name, samples in parts.items()}
        metrics = multilabel.evaluate_parts(model.net, spec, parts, out, batch_size, max_pixels or model.max_pixels,
                                            rt)
    else:
        metrics = evaluate_splits(model.net, spec, parts, mode, out, batch_size=batch_size,
                                  max_pixels=max_pixels or model.max_pixels, rt=rt, label_map=label_map,
                                  scoring=model.scoring)
    log_evaluation(run_id, out, metrics)
    summary = {"model_uri": model_uri, "data_dir": str(data_dir), "tta": mode, "metrics": metrics,
               "excluded": list(splits.excluded),
               "mlflow_run_id": run_id, "output": str(out.resolve())}
    tracking.write_json(out / "evaluation.json", summary)
    tracking.log_artifact(run_id, out / "evaluation.json")
    tracking.client().set_terminated(run_id, "FINISHED")
    return summary

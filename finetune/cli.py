"""Command line: `finetune train | demo | ...`. Each command parses options and calls a function."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from finetune import console
from finetune.cli_options import GroupedCommand, config_options
from finetune.config import FIXED_TTA_MODES, load_yaml, resolve_config
from finetune.errors import UserError

log = logging.getLogger("finetune")


VERBOSE_FLAGS = ("-v", "--verbose")


class FinetuneGroup(click.Group):
    """The command group; `-v/--verbose` may also come after the subcommand (`finetune train DIR -v`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)  # after `--` every word is an argument
        verbose = [a for a in args[:end] if a in VERBOSE_FLAGS]
        rest = [a for a in args[:end] if a not in VERBOSE_FLAGS] + args[end:]
        return super().parse_args(ctx, verbose[:1] + rest)


@click.group(cls=FinetuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finetune", prog_name="finetune", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail (also accepted after the command).")
def cli(verbose: bool) -> None:
    """finetune: measured transfer learning for image classifiers.

    Point `finetune train` at a folder of images (one subfolder per class) and a timm backbone.
    Runs are tracked in MLflow (MLFLOW_TRACKING_URI, else ./mlruns).
    """
    console.setup(verbose)


cli.command_class = GroupedCommand  # every command's help lists its options by group


def build_config(command: str, data_dir: str, config_file: str | None, **cli_values: Any):
    file_values = load_yaml(config_file) if config_file else {}
    return resolve_config(file_values, {"data_dir": data_dir, **cli_values}, command)


@cli.command()
@click.argument("data_dir", type=click.Path())
@config_options("train")
@click.option("--resume", "resume_run", metavar="RUN_ID|last",
              help="Continue an interrupted run from its last checkpoint, into the same MLflow run.")
def train(data_dir: str, config_file: str | None, resume_run: str | None, **options: Any) -> None:
    """Fine-tune a pretrained timm backbone on DATA_DIR (one subfolder per class, or train/ and val/)."""
    from finetune.workflows.train import train as run_train

    cfg = build_config("train", data_dir, config_file, **options)
    point = None
    if resume_run:
        from finetune.workflows.resume import resumed

        given = {k: v for k, v in options.items() if v is not None}  # click's None: not given here
        point, cfg = resumed(resume_run, cfg, {**(load_yaml(config_file) if config_file else {}), **given})
    summary = run_train(cfg, resume_from=point)
    if summary is not None:  # None on the extra ranks of a multi-process run
        _print_summary(summary, data_dir)


@cli.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False))
def upload(output: str) -> None:
    """Send to MLflow what a run could not log while the store was unreachable (OUTPUT/mlflow_pending.json)."""
    from finetune.tracking import check_reachable, upload_pending

    check_reachable()
    done = upload_pending(output)
    click.echo(f"Uploaded {done['metrics']} metric point(s) and {', '.join(done['steps']) or 'nothing else'} "
               f"to MLflow run {done['run_id']}.")


@cli.command()
@click.argument("data_dir", type=click.Path())
@config_options("plan", shows={"output": "outputs/audit-<data>-<time> (the audit)"})
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the report.")
def plan(data_dir: str, config_file: str | None, as_json: bool, **options: Any) -> None:
    """Measure DATA_DIR and show the fine-tuning plan, without training.

    Profiles the data, runs the pretrained backbone once over the training images (cached for
    `train`), measures how similar they are to the pretraining data, and prints the scenario of the
    four-scenario table, the reasons, and the plan (frozen layer groups, learning rates, epochs),
    then the audit of `finetune audit` (OUTPUT/audit.json and contact sheets, from the same features).
    """
    from finetune.strategy.report import describe
    from finetune.workflows.audit import summary_lines
    from finetune.workflows.plan import plan_and_audit

    cfg = build_config("plan", data_dir, config_file, **options)
    decision, groups, audit = plan_and_audit(cfg)
    if as_json:
        click.echo(json.dumps({**decision.to_dict(), "layer_groups": groups, "audit": audit}, default=str))
    else:
        lines = [f"  skipped: {audit['skipped']}"] if "skipped" in audit else ["  " + line for line in summary_lines(audit)]
        click.echo(describe(decision, groups) + "\n\nAudit\n" + "\n".join(lines))


@cli.command()
@click.argument("data_dir", type=click.Path())
@config_options("rank")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def rank(data_dir: str, config_file: str | None, as_json: bool, **options: Any) -> None:
    """Rank pretrained backbones (--candidates) on DATA_DIR's training images, before training.

    For each candidate: one pass over the training images at its own input size (features cached for `plan`
    and `train`), the leave-one-out k-NN accuracy and LogME of its frozen features, its size, and its latency
    on this machine (ms per image at batch 1 and 32). Prints them best first (k-NN accuracy), marks the
    accuracy-latency front, and the `train` command of the best. Val and test are not read.
    """
    from finetune.workflows.rank import rank_backbones, table

    cfg = build_config("rank", data_dir, config_file, **options)
    if not cfg.candidates:
        raise UserError("finetune rank needs --candidates: a folder of weight files with sidecars, a file with one "
                        "candidate per line, or timm names separated by commas.")
    result = rank_backbones(cfg, cfg.candidates, cfg.max_latency_ms)
    click.echo(json.dumps(result) if as_json else table(result))


@cli.command()
@click.argument("data_dir", type=click.Path())
@config_options("audit", shows={"output": "outputs/audit-<data>-<time>"})
@click.option("--json", "as_json", is_flag=True, help="Print audit.json's content instead of the summary.")
def audit(data_dir: str, config_file: str | None, as_json: bool, **options: Any) -> None:
    """Audit DATA_DIR before training: likely mislabeled images, duplicates, leakage across splits, outliers.

    Reads the pretrained features `plan` and `train` cache (extracts them when missing), writes
    OUTPUT/audit.json (every finding, with paths and scores) and contact sheets (PNG), and prints a
    summary. Nothing is moved or deleted: review the findings and pass a list of paths to leave out
    with --exclude FILE.
    """
    from finetune.workflows.audit import audit_folder, summary_lines

    result = audit_folder(build_config("audit", data_dir, config_file, **options))
    click.echo(json.dumps(result, default=str) if as_json else "\n".join(summary_lines(result)))


def _interval(metrics: dict[str, Any], key: str) -> str:
    """'95% interval a-b' for an accuracy the report gives one for, else ''."""
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    return "" if low is None or high is None else f"95% interval {low:.3f}-{high:.3f}"


def _plan_line(plan: dict[str, Any]) -> str:
    if plan.get("train_on_features"):
        where = "final features" if plan["head_stage"] == "final" else f"{plan['head_stage']} features"
        return f"linear head on cached {where}, {plan['epochs']} epochs (backbone frozen)"
    groups = plan.get("groups") or []
    frozen = sum(1 for g in groups if g.get("frozen"))
    warmup = f" after {plan['head_warmup_epochs']} head warm-up epochs" if plan.get("head_warmup_epochs") else ""
    return f"fine-tune {len(groups) - frozen} of {len(groups)} layer groups, {plan['epochs']} epochs{warmup}"


def _audit_lines(summary: dict[str, Any]) -> list[str]:
    """The audit's counts, and val/test accuracy without the images that have a duplicate in train."""
    audit, m = summary.get("audit") or {}, summary["metrics"]
    if "skipped" in audit:
        return [f"Audit:      skipped ({audit['skipped']})"]
    if "counts" not in audit:
        return []
    c = audit["counts"]
    lines = [f"Audit:      {c['label_issues']} label issue(s), duplicate pairs {c['leakage_pairs']} leakage / "
             f"{c['conflicting_pairs']} conflicting / {c['redundant_pairs']} redundant, {c['outliers']} outlier(s) "
             f"({audit['report']})"]
    for split in ("val", "test"):
        if f"{split}_acc_no_leakage" in m:
            n = int(m[f"{split}_leaked_images"])
            lines.append(f"Leakage:    {n} {split} image(s) with a (near-)duplicate in train; {split} accuracy "
                         f"without them {m[f'{split}_acc_no_leakage']:.4f} ({split}_acc_no_leakage)")
    return lines


def _score_lines(summary: dict[str, Any], kept: str) -> list[str]:
    """Selection and val (and test) accuracy, with their intervals."""
    m, lines = summary["metrics"], []
    lines.append(f"            accuracy {m['select_acc']:.4f} ({kept}); test-time crops {summary['tta']['mode']} "
                 f"({summary['tta']['chosen_by']})")
    interval = _interval(m, "val_acc")
    lines.append(f"Val:        accuracy {m['val_acc']:.4f} ({interval + '; ' if interval else ''}"
                 f"{summary['data']['val']} images, read once after training)")
    extra = [f"{k} {v:.4f}" + (f" ({i})" if (i := _interval(m, k)) else "") for k, v in m.items()
             if (k.endswith("_tta") or k.startswith("test_acc")) and "top5" not in k and "no_leakage" not in k
             and "_ci95_" not in k]
    if extra:
        lines.append(f"            {', '.join(extra)}")
    return lines


def _multi_label_lines(summary: dict[str, Any], kept: str) -> list[str]:
    """Several labels per image: the selection mAP, the thresholds, and val's (and test's) mAP, F1, subset accuracy."""
    m = summary["metrics"]
    values = summary["thresholds"]["values"]
    lines = [f"            mAP {m['select_map']:.4f} ({kept}); thresholds per class {min(values):.2f} to "
             f"{max(values):.2f} (best F1 on held-out training images, or --threshold-precision)"]
    for split in ("val", "test"):
        if f"{split}_map_macro" in m:
            lines.append(f"{split.capitalize() + ':':<12}mAP {m[f'{split}_map_macro']:.4f} (macro), "
                         f"{m[f'{split}_map_micro']:.4f} (micro); at the thresholds F1 {m[f'{split}_f1_micro']:.4f} "
                         f"(micro), subset accuracy {m[f'{split}_subset_accuracy']:.4f} "
                         f"({summary['data'][split]} images, read once after training)")
    return lines


def _print_summary(summary: dict[str, Any], data_dir: str) -> None:
    """The end of `train`: the scenario and why, the plan, the numbers, and where everything is."""
    m, plan = summary["metrics"], summary["plan"]
    lines = [""]
    if summary.get("skipped_files"):
        n = len(summary["skipped_files"])
        first = ", ".join(summary["skipped_files"][:3])
        lines += [f"Skipped {n} unreadable file(s) (skipped_files.json of the run): {first}" + (" ..." if n > 3 else ""),
                  ""]
    lines.append(f"Scenario:   {summary['scenario']} ({plan['source']})")
    lines += [f"  - {reason}" for reason in plan.get("reasons", [])]
    lines.append(f"Plan:       {_plan_line(plan)}")
    finetuned = next((k for k in ("select_acc_finetuned", "select_map_finetuned") if k in m), None)
    if finetuned and m.get("weights") == "warmup":
        kept = f"warmed-up head kept: fine-tuning reached {m[finetuned]:.4f}"
    elif "best_epoch" in m:
        kept = f"best epoch {m['best_epoch']}" + (", EMA weights" if m.get("weights") == "ema" else "")
    else:
        kept = f"{m.get('epochs')} epoch(s), weight decay {plan.get('weight_decay')}"
    lines.append(f"Chosen on:  {summary['selection']['protocol']}")
    lines += _multi_label_lines(summary, kept) if summary.get("task") == "multi-label" else _score_lines(summary, kept)
    lines += _audit_lines(summary)
    lines += [f"Model:      {summary['model_dir']}",
              f"Summary:    {summary['output']}/summary.json",
              f"MLflow run: {summary['mlflow_run_id']}  ({summary['mlflow_tracking_uri']})"]
    if summary.get("mlflow_pending"):
        lines.append(f"MLflow was unreachable; not yet logged: {summary['mlflow_pending']}. "
                     f"Send it later with:  finetune upload {summary['output']}")
    elif summary["mlflow_tracking_uri"].startswith("sqlite:"):
        lines.append(f"Open the UI with:  mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}")
    click.echo("\n".join(lines + next_steps(summary, data_dir)))


def next_steps(summary: dict[str, Any], data_dir: str) -> list[str]:
    """The last lines of `train`: the model's URIs, and the commands that use it, ready to paste."""
    if not summary.get("model_uri"):  # not logged (MLflow unreachable): `finetune upload` says when it is
        return []
    uri = f"runs:/{summary['mlflow_run_id']}/model"
    lines = ["", f"Model URI:  {uri}"]
    if reg := summary.get("registered_model"):
        uri = f"models:/{reg['name']}/{reg['version']}"
        lines.append(f"Registered: {uri}")
    quoted = shlex.quote(uri)
    return lines + ["Next:", f"  finetune evaluate {quoted} {shlex.quote(data_dir)}",
                    f"  finetune predict {quoted} ./new-images -o predictions.csv",
                    f"  finetune serve {quoted}"]


@cli.command()
@click.argument("data_dir", type=click.Path())
@click.option("--samples", default=20, show_default=True, type=int, help="Training images to overfit.")
@config_options("sanity", shows={"epochs": "30"})
def sanity(data_dir: str, config_file: str | None, samples: int, **options: Any) -> None:
    """Overfit a few training images (no augmentation, no regularization): should reach ~100% accuracy.

    If it cannot, something is broken (labels, preprocessing, LR) and a full run would waste hours.
    --epochs defaults to 30 here.
    """
    from finetune.workflows.tools import sanity as run_sanity

    epochs = options["epochs"] or 30
    cfg = build_config("sanity", data_dir, config_file, **{**options, "epochs": epochs})
    r = run_sanity(cfg, samples=samples, epochs=epochs)
    click.echo(f"initial loss {r['initial_loss']:.3f} (ln {r['classes']} = {r['expected_initial_loss']:.3f}); "
               f"after {r['epochs']} epochs on {r['samples']} images: loss {r['final_loss']:.4f}, "
               f"train accuracy {r['train_acc']:.3f}")
    if r["passed"]:
        click.echo(f"PASS: the model overfits {r['samples']} images (>= {r['target_acc']:.0%}).")
    else:
        click.echo(f"FAIL: train accuracy {r['train_acc']:.1%} < {r['target_acc']:.0%} on {r['samples']} images. "
                   "Check labels and preprocessing, try another --lr (see `finetune lr-find`) or more --epochs.")
        sys.exit(1)


@cli.command("lr-find")
@click.argument("data_dir", type=click.Path())
@click.option("--min-lr", default=1e-6, show_default=True, type=float, help="Start of the LR range.")
@click.option("--max-lr", default=1.0, show_default=True, type=float, help="End of the LR range.")
@click.option("--num-training", default=100, show_default=True, type=int, help="Steps of the range test.")
@config_options("lr-find", shows={"output": "outputs/lr-find-<time>"})
def lr_find(data_dir: str, config_file: str | None, min_lr: float, max_lr: float, num_training: int,
            **options: Any) -> None:
    """Learning-rate range test of the plan `train` would run: saves the loss-vs-LR plot, suggests train's --lr.

    The plan is decided first (as `train` and `plan` decide it). A feature plan (small-*) tests its linear
    head on the cached features (seconds); a network plan (large-*) the network with the plan's frozen
    groups and per-group LRs, after the head warm-up (the LR varied is the head's, the groups keep their
    ratios). Suggestion: the steepest point of the last sustained descent before the loss minimum.
    """
    from finetune.workflows.tools import lr_find as run_lr_find

    cfg = build_config("lr-find", data_dir, config_file, **options)
    r = run_lr_find(cfg, min_lr=min_lr, max_lr=max_lr, num_training=num_training)
    click.echo(f"plan {r['plan']} ({r['plan_source']}): measured {r['measured']}")
    click.echo(f"LR varied: {r['lr_of']}; {r['steps']} steps from {r['min_lr']:.3g} to {r['lrs'][-1]:.3g}")
    if r["curve_min_lr"] is not None:
        click.echo(f"loss minimum (smoothed) at lr {r['curve_min_lr']:.3g}")
    if r["suggested_lr"] is None:
        click.echo("No suggestion: the loss curve has no clear descent. Look at the plot.")
    else:
        click.echo(f"suggested lr: {r['suggested_lr']:.3g}  (use --lr {r['suggested_lr']:.3g} with train; "
                   f"{r['rule']})")
    click.echo(f"plot:       {r['plot']}")
    click.echo(f"MLflow run: {r['mlflow_run_id']}")


@cli.command()
@click.argument("data_dir", type=click.Path())
@click.option("--trials", default=10, show_default=True, type=int, help="Optuna trials (each a full training run).")
@click.option("--lr-range", nargs=2, type=float, default=(1e-5, 1e-1), show_default=True,
              help="Log-uniform learning-rate range.")
@click.option("--wd-range", nargs=2, type=float, default=None,
              help="Log-uniform weight-decay range (default 1e-6 0.1). Fine-tuning plans only: a feature plan's "
                   "head chooses its weight decay by cross-validation on train in every trial.")
@click.option("--search-augment", is_flag=True, help="Also search the augmentation preset (fine-tuning plans only).")
@config_options("sweep", shows={"output": "outputs/sweep-<data>-<time>"})
def sweep(data_dir: str, config_file: str | None, trials: int, lr_range: tuple[float, float],
          wd_range: tuple[float, float] | None, search_augment: bool, **options: Any) -> None:
    """Hyperparameter search (Optuna) of what acts in the data's plan; trials are child runs of one MLflow run.

    Fine-tuning plans: LR and weight decay (and, asked, the augmentation preset). Feature plans (a linear
    head on cached features): LR; the head chooses its weight decay by cross-validation in every trial.
    Trials are ranked on data inside train (select_acc); val is reported, never ranked on. With --register
    NAME the best trial's model is registered under NAME, as `train --register NAME` registers a run's.
    """
    from finetune.workflows.sweep import sweep as run_sweep

    cfg = build_config("sweep", data_dir, config_file, **options)
    r = run_sweep(cfg, trials, tuple(lr_range), tuple(wd_range) if wd_range else None, search_augment)
    val = "n/a" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f}"
    click.echo(f"best select_acc {r['best_select_acc']:.4f} (trial {r['best_trial']}, val_acc {val}): "
               + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_params"].items()))
    click.echo(f"best config: {r['best_config']}  (finetune train DATA_DIR --config {r['best_config']})")
    click.echo(f"MLflow parent run: {r['mlflow_run_id']}")
    if reg := r.get("registered_model"):
        click.echo(f"Registered the best trial's model: models:/{reg['name']}/{reg['version']}")


@cli.command()
@click.option("--workdir", default="outputs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the generated data, weights and outputs go.")
@click.option("--model", default="test_resnet", show_default=True, help="timm model for the demo.")
@click.option("--weights", default=None, help="'hub' or a file to skip the offline pretraining step.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1),
              help="Epochs of the two target runs (fine-tuned and from scratch alike).")
@click.option("--pretrain-epochs", default=12, show_default=True, type=click.IntRange(min=1),
              help="Epochs of the offline pretraining step.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the generated images, the splits and the training runs.")
def demo(workdir: str, model: str, weights: str | None, epochs: int, pretrain_epochs: int, seed: int) -> None:
    """Transfer learning side by side, offline on generated images (a few minutes on 2 CPU cores).

    Pretrains MODEL on a generated source task, then trains a small related target task twice with
    the same data, epochs and recipe: fine-tuned from the saved weights file (the plan `finetune
    train` measures) and from random init. Prints both runs' plan, val accuracy and wall time.
    """
    from finetune.demo import run_demo

    run_demo(Path(workdir), model, weights, epochs, pretrain_epochs, seed, say=click.echo)


# --- evaluation and registry commands -------------------------------------------------------------


@cli.command()
@click.argument("model_uri")
@click.argument("data_dir", type=click.Path())
@click.option("--tta", type=click.Choice(FIXED_TTA_MODES), help="Test-time crops (default: the model's).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Crops per forward pass (images per batch = this / crops per image).")
@click.option("--num-workers", type=click.IntRange(min=0), help="Data loader workers (default: from the cores).")
@click.option("--experiment", default="finetune-evaluate", show_default=True, help="MLflow experiment.")
@click.option("--output", help="Output folder (default: outputs/evaluate-<time>).")
@click.option("--exclude", type=click.Path(exists=True, dir_okay=False),
              help="A file listing images (one path a line) to leave out, e.g. an audit's reviewed list.")
def evaluate(model_uri: str, data_dir: str, tta: str | None, batch_size: int, num_workers: int | None,
             experiment: str, output: str | None, exclude: str | None) -> None:
    """Evaluate MODEL_URI (runs:/ID/model, models:/NAME@ALIAS) on the labelled folder DATA_DIR.

    A folder with train/ and val/ (and test/) is evaluated on val and test; a plain class-folder
    tree on all its images. Writes report.json, confusion_matrix.png and top_losses.png per split.
    """
    from finetune.workflows.evaluate import evaluate_model

    summary = evaluate_model(model_uri, data_dir, tta, batch_size, num_workers, experiment, output, exclude=exclude)
    for key, value in summary["metrics"].items():
        click.echo(f"{key} {value:.4f}")
    click.echo(f"report:     {summary['output']}")
    click.echo(f"MLflow run: {summary['mlflow_run_id']}")


@cli.command()
@click.argument("model_uri")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--output", help="Output folder (default: outputs/explain).")
@click.option("--target", help="Class (name or index) to explain (default: each image's predicted class).")
def explain(model_uri: str, images: tuple[str, ...], output: str | None, target: str | None) -> None:
    """Grad-CAM heatmaps of MODEL_URI's predictions for IMAGE...: one <stem>_cam.png per image.

    Each overlay shows the image as the model sees it (resized and centre-cropped), the regions that
    raised the explained class's score in warm colours, and the predicted label and score above it.
    """
    from finetune.workflows.explain import explain_images

    result = explain_images(model_uri, images, output, target)
    for path in result.written:
        click.echo(str(path))
    for error in result.errors:
        click.echo(f"Error: {error}", err=True)
    if result.errors:
        sys.exit(1)


@cli.command()
@click.argument("model_uri")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="Export format.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Also a static int8 model (ONNX Runtime), "
              "calibrated on training images and judged by its val accuracy.")
@click.option("--register", is_flag=False, flag_value="", default=None, metavar="[NAME]",
              help="Register the ONNX model in the MLflow registry: under NAME, or bare, beside the model's "
                   "registered version (tagged with the exported files).")
@click.option("--data", "data_dir", type=click.Path(), help="Labelled image folder to check the export on "
              "(default: the training run's).")
@click.option("--output", help="Output folder (default: outputs/export-<time>).")
@click.option("--max-loss", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Val accuracy points int8 may lose against fp32; more and it is refused.")
def export(model_uri: str, fmt: str, quantize: str | None, register: str | None, data_dir: str | None,
           output: str | None, max_loss: float) -> None:
    """Export MODEL_URI (runs:/ID/model, models:/NAME@ALIAS) to ONNX, checked against PyTorch.

    The fp32 file must give identical labels and probabilities within 1e-3 of PyTorch on real images
    (the training run's val images, or --data), else it is refused. The files are logged to the
    model's MLflow run under onnx/; with --register the ONNX model becomes a registered version too (of
    the model's registered model, linked to its version by tags, which also gets the tags onnx and
    onnx_int8; or of NAME), which `finetune predict` and `finetune serve` run with ONNX Runtime.
    Needs the onnx extra: uv sync --extra onnx (pip install 'finetune[onnx]').
    """
    from finetune.workflows.export import ExportOptions, export_model

    report = export_model(model_uri, ExportOptions(fmt=fmt, quantize=quantize, register=register,
                                                   data_dir=data_dir, output=output, max_loss=max_loss))
    fp32 = report["fp32"]
    click.echo(f"onnx fp32: labels identical on {fp32['images']} images, max |dprob| "
               f"{fp32['max_abs_prob_diff']:.2g} (tolerance {fp32['tolerance']:g})")
    if "int8" in report:
        q = report["int8"]
        click.echo(f"onnx int8: val acc {100 * q['val_acc_fp32']:.2f}% -> {100 * q['val_acc_int8']:.2f}% "
                   f"({-q['accuracy_loss_points']:+.2f} points, label agreement {q['label_agreement']:.3f})")
        if not q["accepted"]:
            click.echo(q["refused"])
    for key, uri in report["artifacts"].items():
        click.echo(f"{key}: {uri}")
    if "registered_model" in report:
        click.echo(f"tagged: {report['registered_model']['name']} version {report['registered_model']['version']}")
    if "registered_onnx" in report:
        onnx = report["registered_onnx"]
        click.echo(f"registered ONNX: models:/{onnx['name']}/{onnx['version']}  (finetune predict "
                   f"models:/{onnx['name']}/{onnx['version']} ./new-images -o predictions.csv)")
    click.echo(f"files: {report['output']}")


@cli.command()
@click.argument("name")
@click.argument("version")
def promote(name: str, version: str) -> None:
    """Point the `champion` alias of registered model NAME at VERSION."""
    from finetune.tracking.registry import promote as move_champion

    move_champion(name, version)
    click.echo(f"{name}@champion -> version {version}")


def _add_serving_commands() -> None:
    from finetune.cli_serving import predict, serve

    cli.add_command(predict)
    cli.add_command(serve)


_add_serving_commands()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

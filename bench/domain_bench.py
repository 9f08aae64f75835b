"""Every plan on every bench domain (issue 13): the rows bench/calibrate.py fits the thresholds on.

    uv run --frozen python -m bench domains variants .bench-data/pack .bench-data/domains
    uv run --frozen python -m bench domain_bench --manifest .bench-data/domains/domains.json --epochs 3 --jobs 4

For each dataset of the manifest (bench/domains.py writes it; the packed base sets are in it): scan, build the
backbone, measure and decide as `finetune train` does, then run every plan -- the four scenarios forced, and a
naive full fine-tune (`naive` below) -- with the executor `run_plan`, and report it with
`evaluate.after_training` (test when the dataset has a test split, else val). One JSON row per result is
appended to --out as soon as it exists (schema: bench/calibrate.py), so a killed run keeps what it measured.
A plan's row carries its per-image results on the reported split (`correct`), for bench/calibrate.py's intervals.
`--pilot-folds K` pilots on K folds of train (every training image scored once; `"folds"` in the pilot rows);
with `--plans ''` only the measurement and the pilots run. bench/decision.py runs this bench per backbone and
seed and replays the shipped rule over the rows.

Built for a bare, offline GPU machine without MLflow: nothing here imports it (checked at the end of a run).
`--jobs N` benches N datasets at a time in N processes, each owning cores // N cores (torch threads and loader
workers split as finetune does); `--max-seconds` stops starting new work after that wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench.common import DEFAULT_WEIGHTS, RESULTS, ROOT, append_jsonl
from finetune.strategy.decide import SCENARIO_NAMES  # pure: no torch

DEFAULT_MANIFEST = ROOT / ".bench-data" / "domains" / "domains.json"
DEFAULT_OUT = RESULTS / "domain_bench.jsonl"
# The four scenarios forced, then the naive baseline.
PLANS = (*SCENARIO_NAMES, "naive")
# The naive baseline's recipe (TrainConfig options, on top of large-different's): light augmentation, constant LR,
# nothing else.
NAIVE_RECIPE = dict(augment="light", mixup=0.0, cutmix=0.0, label_smoothing=0.0, schedule="constant",
                    warmup_epochs=0.0, dropout=0.0, drop_path=0.0, drop_connect=0.0, ema=0.0)


@dataclass(frozen=True)
class Options:
    """What one worker process needs (picklable: it crosses to the --jobs processes)."""

    model: str
    weights: str
    epochs: int
    head_epochs: int | None
    batch_size: int
    image_size: int | None
    tta: str
    seed: int
    plans: tuple[str, ...]
    out: str
    deadline: float  # time.time() after which no new work starts
    cores: int  # this process's share of the machine
    workers: int | None = None  # data loader workers (None: finetune's split of `cores`)
    pilot_folds: int = 1  # the pilot's selection folds (workflows/pilot.py run_pilot)


def pilot_rows(name: str, cfg, measured, backbone, splits, rt, folds: int = 1) -> list[dict[str, Any]]:
    """The pilot (workflows/pilot.py) run on all four scenarios, the measured cell first: one row per scenario
    ({"kind": "pilot", "dataset", "plan", "select_acc", "seconds"}), so bench/calibrate.py can replay the pilot
    of any candidate set a fitted rule would ask for."""
    from finetune.strategy.decide import SCENARIO_NAMES
    from finetune.workflows.pilot import run_pilot

    order = [measured.plan.scenario, *[s for s in SCENARIO_NAMES if s != measured.plan.scenario]]
    result = run_pilot(cfg, measured, order, ["bench: every scenario"], backbone, splits, rt, folds)
    return [{"kind": "pilot", "dataset": name, "plan": s, **v} for s, v in result.scores.items()]


def naive(plan, epochs: int):
    """Full fine-tune, one learning rate for every layer, plain BatchNorm, no warm-up, --epochs as given (and, in
    `bench_dataset`, a plain recipe: `NAIVE_RECIPE`)."""
    return dataclasses.replace(plan, scenario="naive", train_on_features=False, head_stage="final",
                               trainable_fraction=1.0, freeze_groups=None, backbone_lr_mult=1.0, layer_decay=1.0,
                               head_warmup_epochs=0, epochs=epochs, bn_policy="train",
                               reasons=["naive baseline: all layers, one LR, no warm-up"])


def read_correct(path: Path) -> str:
    """The reported split's per-image results in the model's crop mode, as a string of 1 (right), 0 (wrong) and
    - (unreadable), in the split's order (the same for every plan of a dataset): bench/calibrate.py resamples
    them to put an interval on auto's gap to the best forced plan."""
    import csv

    with open(path, newline="") as f:
        return "".join(r["correct"] or "-" for r in csv.DictReader(f))


def _configure(opts: Options):
    """This process's runtime: torch threads and loader workers within its share of the cores."""
    import torch

    from finetune import runtime

    split = runtime.split_cores(opts.cores, torch.cuda.is_available())
    workers = split.workers if opts.workers is None else opts.workers
    return runtime.configure("auto", "auto", "auto", None, workers, split.threads)


def bench_dataset(name: str, path: str, opts: Options) -> list[dict[str, Any]]:
    """Measure one dataset and run every plan on it; the rows, also appended to opts.out as they come."""
    from finetune.config import TrainConfig
    from finetune.strategy.decide import SCENARIO_NAMES, load_scenario_defaults, load_thresholds

    rows: list[dict[str, Any]] = []
    if time.time() > opts.deadline:
        return rows
    rt = _configure(opts)
    base = dict(data_dir=path, model=opts.model, weights=opts.weights, batch_size=opts.batch_size,
                image_size=opts.image_size, tta=opts.tta, seed=opts.seed, num_workers=rt.workers,
                experiment="bench-domains")

    def emit(row: dict[str, Any]) -> None:
        append_jsonl(opts.out, row)
        rows.append(row)

    cfg = TrainConfig(epochs=opts.epochs, **base)
    measured, backbone, splits = measure(name, cfg, rt, emit)
    if time.time() <= opts.deadline:
        for row in pilot_rows(name, cfg, measured, backbone, splits, rt, opts.pilot_folds):
            emit(row)
    thresholds = load_thresholds()
    defaults = {s: load_scenario_defaults(s) for s in SCENARIO_NAMES}
    for plan_name in opts.plans:
        if time.time() > opts.deadline:
            break
        small = plan_name.startswith("small-")
        epochs = opts.head_epochs if small and opts.head_epochs else opts.epochs
        # The naive baseline: large-different's settings replaced by one LR for all layers and a plain recipe.
        cfg = TrainConfig(epochs=epochs, scenario="large-different" if plan_name == "naive" else plan_name,
                          **base, **(NAIVE_RECIPE if plan_name == "naive" else {}))
        emit(plan_row(name, plan_name, cfg, measured, splits, rt, thresholds, defaults))
        print(f"  {name:<22} {plan_name:<16} {rows[-1]['reported_split']} acc {rows[-1]['acc']:.4f}  "
              f"{rows[-1]['seconds']:>7.1f}s", flush=True)
    return rows


def measure(name: str, cfg, rt, emit: Callable[[dict[str, Any]], None]):
    """Scan, build the backbone, measure and decide as `finetune train` does; emits the "measure" row and returns
    (the measured decision, the backbone, the splits)."""
    import pytorch_lightning as pl

    from finetune.data.folders import scan_folder
    from finetune.model.backbone import create_backbone
    from finetune.strategy.decide import load_thresholds, pilot_candidates
    from finetune.strategy.measure import measure_and_decide

    started = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
    measured = measure_and_decide(cfg, splits, backbone, rt)
    profile, similarity = measured.profile.to_dict(), measured.similarity.to_dict()
    candidates, _ = pilot_candidates(profile, similarity, load_thresholds())
    emit({"kind": "measure", "dataset": name, "profile": profile, "similarity": similarity,
          "seconds": round(time.perf_counter() - started, 2), "auto": measured.plan.scenario,
          "shipped_candidates": candidates, "layout": splits.layout, "counts": splits.counts()})
    return measured, backbone, splits


def plan_network(plan_name: str, cfg, measured, splits, thresholds, defaults):
    """The forced plan (or the naive baseline), its decision, recipe and a fresh network, as `train` builds them
    (workflows/train.py _recipe_and_network, not imported: that module pulls in MLflow)."""
    import pytorch_lightning as pl

    from finetune.model.backbone import create_backbone
    from finetune.model.heads import init_head
    from finetune.strategy.decide import decide
    from finetune.strategy.measure import with_plan
    from finetune.training.recipe import model_kwargs, resolve_recipe

    profile, similarity = measured.profile.to_dict(), measured.similarity.to_dict()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    net_backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size,
                                   keep_source_head=True)  # fresh weights: the last plan trained the old ones
    plan = decide(profile, similarity, thresholds, defaults, base_epochs=cfg.epochs, forced=cfg.scenario)
    plan = naive(plan, cfg.epochs) if plan_name == "naive" else plan
    decision = with_plan(measured, plan, net_backbone.model, cfg.lr)
    recipe = resolve_recipe(cfg, cfg.scenario)
    if model_kwargs(recipe) and not plan.train_on_features:
        net_backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size,
                                       keep_source_head=True, **model_kwargs(recipe))
        decision = with_plan(decision, plan, net_backbone.model, cfg.lr)
    init_head(net_backbone.model, recipe.drop_connect)
    return plan, decision, recipe, net_backbone


def plan_row(name: str, plan_name: str, cfg, measured, splits, rt, thresholds, defaults) -> dict[str, Any]:
    """Train one plan with the executor and report it as `train` does (test when there is one, else val)."""
    from finetune.evaluation import evaluate, trust
    from finetune.model.artifact import ModelSpec
    from finetune.model.stages import stage_index
    from finetune.training.distributed import QuietLogger
    from finetune.training.plan_context import RunContext
    from finetune.training.run_plan import run_plan

    t0 = time.perf_counter()
    plan, decision, recipe, net_backbone = plan_network(plan_name, cfg, measured, splits, thresholds, defaults)
    split = "test" if splits.test else "val"
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-{plan_name}-") as tmp:
        ctx = RunContext(run_id="bench", output=Path(tmp), logger=QuietLogger("bench"))
        fit = run_plan(cfg, decision, recipe, net_backbone, splits, ctx, rt)
        tta = trust.choose_after_training(cfg.tta, fit.heldout, net_backbone.data_config,
                                          batch_size=cfg.batch_size, max_pixels=cfg.max_image_pixels, rt=rt)
        spec = ModelSpec(architecture=net_backbone.model_name.split(".")[0], num_classes=len(splits.classes),
                         class_names=splits.classes, data_config=net_backbone.data_config,
                         create_kwargs=net_backbone.create_kwargs, weights_source=net_backbone.weights_source,
                         scenario=plan.scenario, default_tta=tta["mode"], head_stage=stage_index(plan.head_stage))
        metrics = {**fit.metrics, **evaluate.after_training(fit.net, spec, splits, cfg, Path(tmp), rt,
                                                            tta["mode"], fit.center_outputs)}
        correct = read_correct(Path(tmp) / "evaluation" / split / "predictions.csv")
    key = evaluate.metric_names(split, tta["mode"])[0]  # the model's own crop mode, chosen on train
    return {"kind": "plan", "dataset": name, "plan": plan_name, "acc": float(metrics[key]), "reported_split": split,
            "select_acc": float(fit.metrics["select_acc"]), "tta": tta["mode"],
            "seconds": round(time.perf_counter() - t0, 2), "epochs": plan.epochs,
            "is_auto": plan_name == measured.plan.scenario, "correct": correct,
            **{k: float(v) for k, v in metrics.items() if k.startswith(("val_acc", "test_acc"))}}


def _worker_main(name: str, path: str, opts: Options) -> tuple[str, int, list[str]]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch"):  # "GPU available" etc. for every plan
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    rows = bench_dataset(name, path, opts)
    return name, len(rows), [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]


def load_manifest(path: Path, only: list[str] | None) -> list[tuple[str, str, int]]:
    """(name, absolute path, images) of the manifest's datasets, `only` those when given."""
    data = json.loads(path.read_text())["datasets"]
    unknown = sorted(set(only or ()) - set(data))
    if unknown:
        raise SystemExit(f"unknown dataset(s) {', '.join(unknown)}; in {path}: {', '.join(data)}")
    return [(n, str((path.parent / d["path"]).resolve()), sum(d["splits"].values()))
            for n, d in data.items() if not only or n in only]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="domains.json (bench/domains.py)")
    parser.add_argument("--datasets", default="", help="comma-separated names (default: all in the manifest)")
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--head-epochs", type=int, default=None,
                        help="epochs of the small-* plans' heads on cached features (default: --epochs, as train)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--tta", default="auto")
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pilot-folds", type=int, default=1,
                        help="run the pilot once per fold of train and score it on every training image")
    parser.add_argument("--jobs", type=int, default=1, help="datasets benched at once, one process each")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader workers per process (default: finetune's split of its cores). 0 on the "
                             "gVisor GPU machine: forking a process that holds a CUDA context took ~50 s there")
    parser.add_argument("--max-seconds", type=float, default=None, help="start no new plan after this wall time")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL, appended to")
    args = parser.parse_args(argv)
    plans = tuple(p for p in args.plans.split(",") if p)
    bad = sorted(set(plans) - set(PLANS))
    if bad:
        raise SystemExit(f"unknown plan(s) {', '.join(bad)}; valid: {', '.join(PLANS)}")
    datasets = load_manifest(args.manifest, [n for n in args.datasets.split(",") if n] or None)
    if args.jobs > 1:
        datasets.sort(key=lambda d: -d[2])  # the biggest first: the last ones to finish are short
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from finetune import runtime

    started = time.time()
    opts = Options(args.model, args.weights, args.epochs, args.head_epochs, args.batch_size, args.image_size,
                   args.tta, args.seed, plans, str(args.out),
                   started + args.max_seconds if args.max_seconds is not None else float("inf"),
                   max(1, runtime.available_cores() // max(1, args.jobs)), args.workers, args.pilot_folds)
    print(f"{len(datasets)} dataset(s), plans {', '.join(plans)}, {args.jobs} process(es) of {opts.cores} core(s); "
          f"rows -> {args.out}", flush=True)
    mlflow_seen: dict[str, list[str]] = {}
    if args.jobs <= 1:
        for name, path, _ in datasets:
            _, _, seen = _worker_main(name, path, opts)
            mlflow_seen[name] = seen
    else:
        # spawn: CUDA does not survive fork, and each worker sets its own threads from scratch.
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(_worker_main, name, path, opts): name for name, path, _ in datasets}
            for fut in concurrent.futures.as_completed(futures):
                name, n_rows, seen = fut.result()
                mlflow_seen[name] = seen
                print(f"{name}: {n_rows} row(s)", flush=True)
    print(f"done in {time.time() - started:.0f}s; rows in {args.out}")
    pulled = {n: s for n, s in mlflow_seen.items() if s} or ({"main": ["mlflow"]} if "mlflow" in sys.modules else {})
    assert not pulled, f"mlflow was imported (the GPU machine has none): {pulled}"
    return 0

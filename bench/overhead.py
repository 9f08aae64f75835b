"""Where `finetune train`'s time goes, and what it costs over a plain Lightning fit of the same network.

    uv run python -m bench overhead --repeats 3 [--before ../wt-before] [--json bench/results/overhead.json]

Per repeat, interleaved (a load change on this shared machine hits every row alike), whole commands in fresh
processes, each timed from its start to its exit:

* ``plain Lightning fit``: this script's `--plain` mode: the same timm network and pretrained weights, the
  same `FolderDataModule` (the recipe's transforms, batch size, workers, decoding) and the same `Classifier`,
  in a default `pl.Trainer` (checkpointing and progress bar on, no logger) fitting the whole training split
  and validating on val after each epoch, for as many epochs as `train`'s plan fine-tunes (large-different:
  1.5 x --epochs): the bare loop that `train` adds its measurement, choices and reporting to.
* ``finetune train``: the CLI at equal epochs (a forced large-* scenario, `--image-size`, same seed), with a
  cold feature cache (a fresh FINETUNE_CACHE_DIR: a first run on the folder) and warm (the same folder
  again). The MLflow store exists before the first timed run (a user's second run onwards).
* ``--before DIR``: the same `train` command from another checkout (`uv run --project DIR`), e.g. a worktree
  of the commit before a change, so before and after are measured side by side.

Printed: the median seconds per row and the ratio to the plain fit; then `train`'s per-phase breakdown
(summary.json's `timing`, median over the repeats; nested phases are indented under their parent), with
``imports and CLI``: the process's time outside `train()`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DATA, DEFAULT_WEIGHTS, ROOT, write_text

DEFAULT_DATA = DATA / "hymenoptera"


def plain_fit(args: argparse.Namespace) -> None:
    """The plain Lightning fit (run in its own process by `main`)."""
    import warnings

    import pytorch_lightning as pl

    from finetune import runtime
    from finetune.config import TrainConfig
    from finetune.data.folders import scan_folder
    from finetune.model.backbone import create_backbone
    from finetune.model.heads import init_head
    from finetune.training.recipe import resolve_recipe
    from finetune.training.network_plans import network_classifier, network_datamodule

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    started = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    cfg = TrainConfig(data_dir=str(args.data), model=args.model, weights=str(args.weights), epochs=args.epochs,
                      image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
                      scenario=args.scenario)
    rt = runtime.configure(cfg.accelerator, runtime.parse_devices(cfg.devices), cfg.strategy, cfg.precision,
                           cfg.num_workers)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size)
    init_head(backbone.model)
    recipe = resolve_recipe(cfg, args.scenario)
    params = [{"name": "all", "params": [p for p in backbone.model.parameters()], "lr": recipe.lr}]
    module = network_classifier(cfg, recipe, backbone, splits, params)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=cfg.accelerator, precision=rt.precision, logger=False,
                         default_root_dir=args.workdir, enable_model_summary=False)
    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=network_datamodule(cfg, recipe, backbone, splits, rt))
    done = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    timing = {"total": done - started, "lightning fit": done - fit_started}
    (args.workdir / "timing.json").write_text(json.dumps(timing))


def _run(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); its output: {log}")
    return seconds


def _train_cmd(project: Path, args: argparse.Namespace, output: Path) -> list[str]:
    return ["uv", "run", "--frozen", "--project", str(project), "finetune", "train", str(args.data),
            "--model", args.model, "--weights", str(args.weights), "--scenario", args.scenario,
            "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--output", str(output)]


def _phases(output: Path, seconds: float) -> dict[str, float]:
    timing = json.loads((output / "summary.json").read_text())["timing"]
    return {"imports and CLI": seconds - timing["total"], **timing}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--scenario", default="large-similar", choices=["large-similar", "large-different"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout whose `train` is timed alongside")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="skip the warm-cache rows")
    parser.add_argument("--json", type=Path, help="also write the rows and phases here")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain:
        return plain_fit(args)
    if not args.data.is_dir() or not args.weights.is_file():
        sys.exit(f"Needs {args.data} and {args.weights} (../shared).")
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    projects = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    # The store exists before the first timed run, as it does from a user's second run on.
    subprocess.run(["uv", "run", "--frozen", "--project", str(ROOT), "python", "-c",
                    "from finetune import tracking; tracking.ensure_experiment('finetune')"],
                   env=env, cwd=work, check=True, capture_output=True)
    rows: dict[str, list[float]] = {}
    phases: dict[str, list[dict[str, float]]] = {}
    for r in range(args.repeats):
        for name, project in projects.items():
            cache = work / f"cache-{name}{r}"
            for temp in ("cold", "warm") if args.warm else ("cold",):
                key = f"finetune train ({name}, {temp} cache)" if args.before else f"finetune train ({temp} cache)"
                output = work / f"{name}-{temp}{r}"
                seconds = _run(_train_cmd(project, args, output), {**env, "FINETUNE_CACHE_DIR": str(cache)}, work,
                               work / f"{name}-{temp}{r}.log")
                rows.setdefault(key, []).append(seconds)
                phases.setdefault(key, []).append(_phases(output, seconds))
        # Equal epochs: the plan's fine-tuning epochs (large-different runs 1.5 x --epochs), read from this
        # repeat's first run.
        epochs = json.loads((work / f"after-cold{r}" / "summary.json").read_text())["plan"]["epochs"]
        plain_cmd = ["uv", "run", "--frozen", "--project", str(ROOT), "python", "-m", "bench", "overhead",
                     "--plain", "--workdir", str(work / f"plain{r}"), *_shared_args(args), "--epochs", str(epochs)]
        # `-m bench` from the work folder: the repository on the path, as from its root.
        seconds = _run(plain_cmd, {**env, "PYTHONPATH": str(ROOT)}, work, work / f"plain{r}.log")
        rows.setdefault("plain Lightning fit", []).append(seconds)
        plain_timing = json.loads((work / f"plain{r}" / "timing.json").read_text())
        phases.setdefault("plain Lightning fit", []).append({"imports and CLI": seconds - plain_timing["total"],
                                                             **plain_timing})
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows.items()),
              flush=True)
    _report(args, rows, phases)


def _shared_args(args: argparse.Namespace) -> list[str]:
    return ["--data", str(args.data), "--model", args.model, "--weights", str(args.weights), "--scenario",
            args.scenario, "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size",
            str(args.batch_size), "--seed", str(args.seed)]


def _report(args: argparse.Namespace, rows: dict[str, list[float]], phases: dict[str, list[dict[str, float]]]
            ) -> None:
    plain = statistics.median(rows["plain Lightning fit"])
    order = ["plain Lightning fit", *[n for n in rows if n != "plain Lightning fit"]]
    print(f"\n{args.data.name}, {args.model}, {args.scenario}, --epochs {args.epochs} (the plain fit: the plan's "
          f"fine-tuning epochs) at {args.image_size} px, median of {args.repeats} (whole commands, interleaved)\n")
    print(f"{'':44s} {'seconds':>8s} {'x plain':>8s}")
    for name in order:
        values = rows[name]
        print(f"{name:44s} {statistics.median(values):8.1f} {statistics.median(values) / plain:8.2f}")
    medians = {name: _median_phases(phases[name]) for name in order}
    names = list(medians)
    print("\nPer phase (seconds; nested phases indented under their parent):\n")
    print(f"{'':44s} " + " ".join(f"{_short(n):>16s}" for n in names))
    for key in _tree_order(list(dict.fromkeys(k for m in medians.values() for k in m))):
        depth, label = key.count("/"), key.split("/")[-1]
        print(f"{'  ' * depth + label:44s} " + " ".join(
            f"{medians[n][key]:16.1f}" if key in medians[n] else f"{'-':>16s}" for n in names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps({"setting": {k: str(v) for k, v in vars(args).items()}, "seconds": rows,
                                         "phases_median": medians}, indent=1))
        print(f"\nwrote {args.json}")


def _short(row: str) -> str:
    return "plain fit" if row.startswith("plain") else row.split("(")[-1].rstrip(")").replace(" cache", "")[:16]


def _tree_order(keys: list[str]) -> list[str]:
    """Phase paths with each parent before its children (a phase is recorded when it ends, after them)."""
    first = {}
    for i, key in enumerate(keys):
        parts = key.split("/")
        for depth in range(1, len(parts) + 1):
            first.setdefault("/".join(parts[:depth]), i)
    return sorted(keys, key=lambda k: [first["/".join(k.split("/")[:d])] for d in range(1, k.count("/") + 2)])


def _median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for run in runs for k in run))
    return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}

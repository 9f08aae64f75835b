"""Calibrated scores and unknown images on the shared data (issue 15): ECE before/after, and unknown detection.

One run: a model is trained with `finetune train` (the product's own path: the temperature and the unknown
threshold are fitted on held-out training images) on hymenoptera and on clothing, with the shared
mobilenetv2_100 weights. Then, through the saved model (`load_model` + `load_scoring`, the code the pyfunc
model runs):

* ECE (15 bins) of the uncalibrated and the calibrated probabilities on the report split (clothing: test,
  hymenoptera: val);
* unknown detection: the model's report split (in-distribution) against at most --ood-images images of each
  other shared dataset (its val/test, else train), for several scores -- maximum softmax (1 - max p),
  energy (-T logsumexp(z / T)), and the k-th nearest neighbour cosine distance to the training features
  (k = 1, 5, 10, 20; the product uses `trust.KNN_K`) -- AUROC (unknown = positive) and FPR at 95% TPR
  (the share of unknown images kept when 95% of in-distribution images are kept); and with the model's own
  threshold (set on held-out training images): the share of in-distribution images kept and of unknown ones
  flagged.

ECE with 15 bins moves by about 0.01 when a handful of a few hundred images cross a bin edge, so each model's
row also gives the negative log-likelihood (a proper score, no bins) before and after, and a 95% paired bootstrap
interval of ECE after minus before (resampling the report images).

    uv run python -m bench trust                           # the product's defaults: auto, 10 epochs (46 min of CPU)
    uv run python -m bench trust --scenario small-similar  # a head on cached features (12 min of CPU)
    uv run python -m bench trust --epochs 3
    uv run python -m bench trust --workdir W --reuse       # score the models a run left in W again, no training
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import DATA, DEFAULT_WEIGHTS, write_text
from finetune.config import TrainConfig
from finetune.data.folders import scan_folder
from finetune.data.profile import stratified_subset
from finetune.evaluation.trust import KNN_K, ece
from finetune.evaluation.tta import source_outputs
from finetune.model.artifact import load_model, load_scoring
from finetune.model.scoring import knn_score, pooled_features

DATASETS = ("hymenoptera", "clothing", "omniglot")
KS = (1, 5, 10, 20)


def train_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    from finetune.workflows.train import train

    if args.reuse:
        path = workdir / name / "summary.json"
        if not path.is_file():
            raise SystemExit(f"--reuse: {path} does not exist; run once with --workdir {workdir} first.")
        return json.loads(path.read_text())
    cfg = TrainConfig(data_dir=str(DATA / name), model="mobilenetv2_100", weights=str(DEFAULT_WEIGHTS),
                      scenario=args.scenario, epochs=args.epochs, output=str(workdir / name), seed=args.seed,
                      experiment="bench-trust")
    return train(cfg)


def report_split(name: str) -> tuple[str, list]:
    splits = scan_folder(str(DATA / name))
    return ("test", splits.test) if splits.test else ("val", splits.val)


def other_images(name: str, limit: int) -> list[str]:
    splits = scan_folder(str(DATA / name))
    pool = splits.test or splits.val or splits.train
    return [s.path for s in stratified_subset(list(pool), limit)]


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def ece_change_interval(before: np.ndarray, after: np.ndarray, labels: np.ndarray, draws: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of ECE(after) - ECE(before) over the report images."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        i = rng.integers(0, len(labels), len(labels))
        diffs.append(ece(after[i], labels[i]) - ece(before[i], labels[i]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float(lo), float(hi)


def scores_of(out, scoring, bank: torch.Tensor) -> dict[str, np.ndarray]:
    """Unknown scores, higher = more unknown, per candidate."""
    z = out.logits.float()
    t = scoring.temperature
    probs = scoring.probs(z)
    pooled = pooled_features(out.features)
    result = {"max softmax": (1 - probs.max(dim=1).values).numpy(),
              "energy": (-t * torch.logsumexp(z / t, dim=-1).mean(dim=1)).numpy()}
    for k in KS:
        result[f"knn k={k}"] = knn_score(pooled, bank, k).numpy()
    return result


def auroc_fpr(known: np.ndarray, unknown: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    auroc = float(roc_auc_score(y, np.r_[known, unknown]))
    keep = np.quantile(known, 0.95)
    return auroc, float((unknown <= keep).mean())


def bench_model(name: str, summary: dict, ood_images: int) -> dict:
    model_dir = summary["model_dir"]
    net, spec = load_model(model_dir)
    scoring = load_scoring(model_dir, spec)
    split, samples = report_split(name)
    mode = spec.default_tta
    known_out = source_outputs(net, [s.path for s in samples], spec.data_config, mode, 8, pool=True)
    labels = np.array([s.label for s in samples])
    raw = known_out.logits.softmax(dim=-1).mean(dim=1).numpy()
    calibrated = scoring.probs(known_out.logits).numpy()
    row = {"dataset": name, "split": split, "images": len(samples), "scenario": summary["scenario"], "tta": mode,
           "weights": summary.get("metrics", {}).get("weights"), "temperature": scoring.temperature,
           "heldout_images": summary.get("calibration", {}).get("heldout_images"),
           "accuracy": float((raw.argmax(1) == labels).mean()),
           "ece_before": ece(raw, labels), "ece_after": ece(calibrated, labels),
           "ece_change_95": ece_change_interval(raw, calibrated, labels),
           "nll_before": nll(raw, labels), "nll_after": nll(calibrated, labels), "threshold": scoring.threshold,
           "bank_images": len(scoring.bank), "ood": {}}
    known = scores_of(known_out, scoring, scoring.bank)
    row["kept_at_model_threshold"] = float((known[f"knn k={KNN_K}"] <= scoring.threshold).mean())
    for other in DATASETS:
        if other == name:
            continue
        out = source_outputs(net, other_images(other, ood_images), spec.data_config, mode, 8, pool=True)
        unknown = scores_of(out, scoring, scoring.bank)
        row["ood"][other] = {m: dict(zip(("auroc", "fpr95"), auroc_fpr(known[m], unknown[m]))) for m in known}
        row["ood"][other]["flagged_at_model_threshold"] = float((unknown[f"knn k={KNN_K}"] > scoring.threshold).mean())
    return row


def print_rows(rows: list[dict]) -> None:
    print("\n| model | split | T (held-out images) | ECE before | ECE after | after - before, 95% | NLL before | "
          "NLL after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["ece_change_95"]
        kind = r["scenario"] + (f", {r['weights']}" if r.get("weights") else "")
        print(f"| {r['dataset']} ({kind}, {r['tta']}) | {r['split']} ({r['images']}, acc {r['accuracy']:.3f}) | "
              f"{r['temperature']:.2f} ({r['heldout_images']}) | {r['ece_before']:.4f} | {r['ece_after']:.4f} | "
              f"{lo:+.3f} .. {hi:+.3f} | {r['nll_before']:.4f} | {r['nll_after']:.4f} |")
    methods = list(next(iter(rows[0]["ood"].values())))[:-1]
    print("\n| model vs unknown images | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for r in rows:
        for other, res in r["ood"].items():
            cells = [f"{res[m]['auroc']:.3f} / {res[m]['fpr95']:.2f}" for m in methods]
            print(f"| {r['dataset']} vs {other} | " + " | ".join(cells) + " |")
    print("(AUROC / FPR at 95% TPR)")
    for m in methods:
        mean = np.mean([res[m]["auroc"] for r in rows for o, res in r["ood"].items()])
        print(f"mean AUROC {m}: {mean:.3f}")
    for r in rows:
        flagged = {o: round(res["flagged_at_model_threshold"], 3) for o, res in r["ood"].items()}
        print(f"{r['dataset']}: model threshold {r['threshold']:.4f} keeps {r['kept_at_model_threshold']:.3f} of "
              f"{r['split']}, flags {flagged}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="auto")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ood-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--workdir", help="keep the training outputs (evaluation reports, sheets) here")
    parser.add_argument("--reuse", action="store_true", help="score the models already in --workdir again")
    args = parser.parse_args(argv)
    if args.reuse and not args.workdir:
        parser.error("--reuse scores the models of an earlier run: give its --workdir")
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work.resolve()}/mlflow.db")
        rows = [bench_model(name, train_model(name, args, work), args.ood_images)
                for name in ("hymenoptera", "clothing")]
    print_rows(rows)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0

"""Which backbone? `finetune rank`'s scores of the shared backbones against their fine-tuned accuracy, per bench set.

    uv run --frozen python -m bench backbone scores --seed 0          # rank rows: the product's ranking per set
    uv run --frozen python -m bench backbone cost ../shared/data/hymenoptera  # rank vs one extraction
    uv run --frozen python -m bench backbone report .bench-data/backbone/ranks.jsonl FINETUNE_ROWS...

`scores` runs `finetune rank` (workflows/rank.py `rank_backbones`) on each set of the domain bench's manifest
with every backbone of --candidates, at --image-size, and appends one row per set. The fine-tuned accuracies
come from domain-bench rows (`python -m bench domain_bench ... --plans large-different`), one file per backbone
and seed named MODEL_sSEED.jsonl (the decision bench's files are such files). `report` averages them over the
seeds and prints, per score and per choice rule: Kendall tau with the fine-tuned accuracy (per set, then the
mean), the regret of the backbone it picks (best seed-averaged accuracy minus the picked one's, in points), and
the share of sets where the pick is within 1 point of the best. Scores: k-NN and LogME (the ranking), the
measurement's linear probe on the final features (`similarity.probes`, computed by every run anyway), and the
parameter count ("always the largest").
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from bench.common import ROOT, WEIGHTS, append_jsonl
from bench.decision import DATASETS

PLAN = "large-different"  # the fine-tune every backbone gets: every layer, the full recipe
Scores = dict[str, dict[str, float]]  # score name -> backbone -> value


def scores(args: argparse.Namespace) -> int:
    """One rank row per set: every candidate's scores, size, latency and the ranking's cost."""
    from finetune.config import TrainConfig
    from finetune.workflows.rank import rank_backbones

    manifest = json.loads(args.manifest.read_text())
    for name in args.datasets:
        path = str((args.manifest.parent / manifest["datasets"][name]["path"]).resolve())
        cfg = TrainConfig(data_dir=path, image_size=args.image_size, seed=args.seed, experiment="bench-backbone")
        result = rank_backbones(cfg, str(args.candidates))
        append_jsonl(args.out, {"kind": "rank", "dataset": name, "seed": args.seed, **result})
        print(f"  {name:<22} best {result['best']:<24} {result['seconds']:>6.1f}s", flush=True)
    return 0


def cost(args: argparse.Namespace) -> int:
    """`finetune rank` over --candidates against one feature extraction of the largest candidate, each with an
    empty feature cache, alternating, --repeats times: the ratio of the medians."""
    import os
    import tempfile

    from finetune.config import TrainConfig
    from finetune.data.folders import scan_folder
    from finetune.model.backbone import create_backbone
    from finetune.strategy.measure import train_features
    from finetune.workflows.rank import parse_candidates, rank_backbones

    cfg = TrainConfig(data_dir=str(args.data), image_size=args.image_size, experiment="bench-backbone")
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels)
    built = [create_backbone(n, w, len(splits.classes), cfg.image_size, keep_source_head=True)
             for n, w in parse_candidates(str(args.candidates))]
    largest = max(built, key=lambda b: sum(p.numel() for p in b.model.parameters()))
    times: dict[str, list[float]] = {"rank": [], "one extraction": []}
    for _ in range(args.repeats):
        for what in times:
            with tempfile.TemporaryDirectory() as cache:
                os.environ["FINETUNE_CACHE_DIR"] = cache
                started = time.perf_counter()
                if what == "rank":
                    rank_backbones(cfg, str(args.candidates))
                else:
                    train_features(cfg, largest, splits)
                times[what].append(time.perf_counter() - started)
                print(f"  {what:<16} {times[what][-1]:7.1f} s", flush=True)
    rank_s, one_s = (statistics.median(v) for v in times.values())
    print(f"{len(splits.train)} training images, {len(built)} candidates, largest {largest.model_name}: rank "
          f"{rank_s:.1f} s = {rank_s / one_s:.2f} x one extraction of the largest ({one_s:.1f} s), medians of "
          f"{args.repeats}")
    return 0


def load_accuracy(files: list[Path]) -> tuple[dict[str, dict[str, float]], Scores]:
    """Seed-averaged test accuracy of PLAN per set and backbone, and each backbone's linear-probe score per set
    (the measurement's final-stage probe, seed-averaged) as {set: {backbone: value}}."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    probe: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in files:
        match = re.fullmatch(r"(.+)_s\d+\.jsonl", f.name)
        if not match:
            raise SystemExit(f"{f}: expected MODEL_sSEED.jsonl")
        model = match.group(1)
        for row in map(json.loads, f.read_text().splitlines()):
            if row["kind"] == "plan" and row["plan"] == PLAN:
                acc[row["dataset"]][model].append(row["acc"])
            elif row["kind"] == "measure":
                final = [p for p in row["similarity"]["probes"] if p["key"] == "final"]
                probe[row["dataset"]][model].extend(p["balanced_accuracy"] for p in final)
    mean = lambda d: {s: {m: statistics.mean(v) for m, v in by.items() if v} for s, by in d.items()}  # noqa: E731
    return mean(acc), mean(probe)


def load_ranks(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{set: {backbone: candidate row}} from `scores` rows (the last row of a set wins)."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for row in map(json.loads, path.read_text().splitlines()):
        found[row["dataset"]] = {c["name"]: c for c in row["candidates"]}
    return found


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two equally long lists (scipy's definition)."""
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return 0.0 if tau != tau else float(tau)  # NaN (a constant list): no information


def rules(ranks: dict[str, dict[str, Any]], probe: dict[str, float]) -> dict[str, Callable[[str], float]]:
    """Each score as a function of the backbone's name (higher: predicted better)."""
    return {"k-NN": lambda m: ranks[m]["knn"], "LogME": lambda m: ranks[m]["logme"],
            "linear probe": lambda m: probe[m], "parameters (always the largest)": lambda m: ranks[m]["params"]}


def per_set(acc: dict[str, float], ranks: dict[str, dict[str, Any]], probe: dict[str, float],
            shipped: str) -> dict[str, tuple[float, float | None]]:
    """Per rule: (regret of its pick in points, Kendall tau with accuracy or None for a fixed choice)."""
    models = sorted(acc)
    best = max(acc.values())
    out: dict[str, tuple[float, float | None]] = {}
    for name, key in rules(ranks, probe).items():
        pick = max(models, key=key)
        out[name] = (100 * (best - acc[pick]), kendall_tau([key(m) for m in models], [acc[m] for m in models]))
    out["finetune rank's pick"] = (100 * (best - acc[shipped]), None)
    if "mobilenetv2_100" in acc:
        out["always mobilenetv2_100"] = (100 * (best - acc["mobilenetv2_100"]), None)
    return out


def shipped_pick(ranks: dict[str, dict[str, Any]]) -> str:
    """What `finetune rank` picks among these candidates: `strategy.rank.rank` replayed on their rows."""
    from finetune.strategy.rank import Candidate, rank

    return rank([Candidate(**c) for c in ranks.values()])[0].name


TOLERANCES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 1.0)  # k-NN accuracy


def largest_within(ranks: dict[str, dict[str, Any]], tolerance: float) -> str:
    """A prior checked by the data: the largest candidate whose k-NN accuracy is within `tolerance` of the best
    (Renggli et al. 2022: a shortlist by a prior, then a cheap check). 0: the k-NN ranking; 1: always the largest."""
    top = max(c["knn"] for c in ranks.values())
    return max((c for c in ranks.values() if c["knn"] >= top - tolerance - 1e-9), key=lambda c: c["params"])["name"]


def tolerance_lines(sets: list[str], acc: dict[str, dict[str, float]], ranks: dict[str, dict[str, dict[str, Any]]]
                    ) -> list[str]:
    """Mean / worst regret of `largest_within` per tolerance, and with the tolerance chosen on the other sets."""
    def regret(d: str, t: float) -> float:
        return 100 * (max(acc[d][m] for m in ranks[d]) - acc[d][largest_within(ranks[d], t)])

    lines = ["", "| largest candidate within t of the best k-NN: t | mean regret (pt) | worst regret (pt) |",
             "|---|---|---|"]
    for t in TOLERANCES:
        r = [regret(d, t) for d in sets]
        lines.append(f"| {t:g} | {statistics.mean(r):.2f} | {max(r):.2f} |")
    held = {d: min(TOLERANCES, key=lambda t: (statistics.mean(regret(o, t) for o in sets if o != d), t))
            for d in sets}
    r = [regret(d, t) for d, t in held.items()]
    lines.append(f"| leave-one-set-out ({', '.join(sorted({f'{t:g}' for t in held.values()}))}) | "
                 f"{statistics.mean(r):.2f} | {max(r):.2f} |")
    return lines


def report(args: argparse.Namespace) -> int:
    acc, probe = load_accuracy(args.files)
    ranks = load_ranks(args.ranks)
    # The backbones with a fine-tuned accuracy on every set that has rank rows (all of them once the bench is done).
    models = sorted(set.intersection(*(set(ranks[d]) & set(acc.get(d, {})) & set(probe.get(d, {})) for d in ranks)))
    sets = [d for d in [*DATASETS, *sorted(set(ranks) - set(DATASETS))] if d in ranks]
    if len(models) < 2 or not sets:
        raise SystemExit("fewer than two backbones have rank rows and a fine-tuned accuracy on every set")
    if len(models) < len(next(iter(ranks.values()))):
        print(f"(only {', '.join(models)}: the other candidates have no fine-tuned accuracy on every set yet)")
    ranks = {d: {m: ranks[d][m] for m in models} for d in sets}
    picks = {d: shipped_pick(ranks[d]) for d in sets}
    rows = {d: per_set({m: acc[d][m] for m in models}, ranks[d], probe[d], picks[d]) for d in sets}
    print(f"### {len(sets)} sets, {PLAN} fine-tunes averaged over seeds", "",
          "| rule | mean regret (pt) | worst regret (pt) | within 1 pt of the best | mean Kendall tau |",
          "|---|---|---|---|---|", sep="\n")
    for name in rows[sets[0]]:
        regrets = [rows[d][name][0] for d in sets]
        taus = [rows[d][name][1] for d in sets if rows[d][name][1] is not None]
        tau = f"{statistics.mean(taus):+.2f}" if taus else "-"
        print(f"| {name} | {statistics.mean(regrets):.2f} | {max(regrets):.2f} | "
              f"{sum(r <= 1.0 for r in regrets)}/{len(sets)} | {tau} |")
    if len(sets) > 1:
        print("\n".join(tolerance_lines(sets, {d: {m: acc[d][m] for m in models} for d in sets}, ranks)))
    print("", "| set | " + " | ".join(models) + " | rank's pick |", "|---" * (len(models) + 2) + "|", sep="\n")
    for d in sets:
        print(f"| {d} | " + " | ".join(f"{100 * acc[d][m]:.1f} (k-NN {ranks[d][m]['knn']:.2f})" for m in models)
              + f" | {picks[d]} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scores", help="`finetune rank` on every set; one row per set")
    s.add_argument("--manifest", type=Path, default=ROOT / ".bench-data" / "domains" / "domains.json")
    s.add_argument("--candidates", type=Path, default=WEIGHTS, help="what `finetune rank --candidates` is given")
    s.add_argument("--datasets", type=lambda v: v.split(","), default=list(DATASETS))
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=ROOT / ".bench-data" / "backbone" / "ranks.jsonl")
    c = sub.add_parser("cost", help="the ranking's time against one feature extraction of the largest candidate")
    c.add_argument("data", type=Path)
    c.add_argument("--candidates", type=Path, default=WEIGHTS)
    c.add_argument("--image-size", type=int, default=None, help="default: every candidate's own")
    c.add_argument("--repeats", type=int, default=3)
    r = sub.add_parser("report", help="Kendall tau and regret of each score and of the ranking's pick")
    r.add_argument("ranks", type=Path, help="the rows `scores` wrote")
    r.add_argument("files", nargs="+", type=Path, help="domain-bench rows, MODEL_sSEED.jsonl")
    args = parser.parse_args(argv)
    return {"scores": scores, "cost": cost, "report": report}[args.command](args)

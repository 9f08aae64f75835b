"""Fit the four-scenario thresholds on bench results, and check them leave-one-dataset-out (issue 13).

    uv run --frozen python -m bench calibrate bench/results/domain_bench.jsonl --out bench/results/calibrate.md

Reads the JSONL that bench/domain_bench.py appends (one object per line):

* ``{"kind": "measure", "dataset", "profile": {"n_train", "per_class_median", ...}, "similarity": {"score",
  "components", ...}, "seconds"}``
* ``{"kind": "plan", "dataset", "plan": small-similar | small-different | large-similar | large-different | naive,
  "acc" (test when the dataset has a test split, else val), "reported_split", "select_acc", "seconds"}``
* ``{"kind": "pilot", "dataset", "plan": scenario, "select_acc", "seconds"}``: a budgeted short run scored inside
  train.

A plan row may carry ``"correct"``: its per-image results on the reported split ("1" right, "0" wrong, "-" not
scored), in the same image order for every plan of a dataset. Then each dataset's gap gets a paired bootstrap
interval: the reported images are resampled, and in each resample auto's accuracy is compared with the best
forced plan *of that resample*, so the interval shows how far test-set noise alone moves the gap (the best of four
noisy accuracies is biased upward).

The rule is what `finetune train` does: the cell from the pure `finetune.strategy.decide.decide`, then, where
`pilot_candidates(profile, similarity, thresholds)` names more than one scenario, the candidate whose pilot
scored best. Fitting searches `similar_min_score`, `large_min_images` and `large_min_per_class` over the
midpoints between the fitting datasets' observed values plus the current config value, maximising the mean
accuracy of the plan the rule picks (ties: the candidate nearest the current config). For each dataset the
rule is fitted *without* it and judged on it; the last line is the rule fitted on all of them, the values for
finetune/configs/strategy.yaml. Pure analysis: no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from bench.common import write_text
from finetune.strategy.decide import (SCENARIO_NAMES, Thresholds, decide, load_scenario_defaults,
                                      load_thresholds)

PLANS = (*SCENARIO_NAMES, "naive")
FITTED = ("similar_min_score", "large_min_images", "large_min_per_class")
CandidatesFn = Callable[[Mapping[str, Any], Mapping[str, Any], Thresholds], Sequence[str]]


@dataclass
class DatasetResults:
    """Everything the bench measured on one dataset (a later row for the same thing replaces an earlier one)."""

    name: str
    profile: dict[str, Any] | None = None
    similarity: dict[str, Any] | None = None
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan -> its row
    pilots: dict[str, dict[str, Any]] = field(default_factory=dict)  # scenario -> its row

    @property
    def complete(self) -> bool:
        """Measured, and every forced scenario has an accuracy: only then can a rule be scored on it."""
        return self.profile is not None and all(s in self.plans for s in SCENARIO_NAMES)

    def acc(self, plan: str) -> float:
        return float(self.plans[plan]["acc"])


def read_results(*paths: Path) -> dict[str, DatasetResults]:
    """The rows of one or more bench JSONL files, in order: a later row replaces an earlier one of the same
    dataset, kind and plan (e.g. a pilots-only run's rows over a full run's)."""
    out: dict[str, DatasetResults] = {}
    for path, i, line in ((p, i, line) for p in paths for i, line in enumerate(p.read_text().splitlines(), 1)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            d = out.setdefault(row["dataset"], DatasetResults(row["dataset"]))
            kind = row["kind"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{i}: not a result row ({e}): {line[:120]}") from None
        if kind == "measure":
            d.profile, d.similarity = row["profile"], row["similarity"]
        elif kind == "plan":
            d.plans[row["plan"]] = row
        elif kind == "pilot":
            d.pilots[row["plan"]] = row
        else:
            raise SystemExit(f"{path}:{i}: unknown kind {kind!r} (valid: measure, plan, pilot)")
    return out


def read_run(spec: str) -> tuple[str, dict[str, DatasetResults]]:
    """One bench run named on the command line: a JSONL path, or `A+B` (B's rows over A's, e.g. the pilots of a
    `--plans '' --pilot-folds 5` run over a full run's); with its name (the files' stems, joined by +)."""
    paths = [Path(p) for p in spec.split("+")]
    return "+".join(p.stem for p in paths), read_results(*paths)


def emit(text: str, out: Path | None) -> None:
    """Print the markdown, and write it to `out` too when given."""
    print(text, end="")
    if out:
        write_text(out, text)


def default_candidates() -> CandidatesFn:
    """`finetune.strategy.decide.pilot_candidates`, its candidates only (not its reasons)."""
    from finetune.strategy.decide import pilot_candidates

    return lambda profile, similarity, thresholds: pilot_candidates(profile, similarity, thresholds)[0]


def no_pilot(profile: Mapping[str, Any], similarity: Mapping[str, Any], thresholds: Thresholds) -> list[str]:
    """The rule without pilots: every case counts as clear."""
    return []


@dataclass(frozen=True)
class Pick:
    cell: str  # the table's cell (decide)
    candidates: tuple[str, ...]  # the pilot's candidates when the case is unclear, else ()
    auto: str  # what the rule runs: the cell, or the candidate whose pilot scored best


class Rule:
    """The decision as `train` makes it, for any thresholds: decide's cell, then a pilot where unclear."""

    def __init__(self, candidates: CandidatesFn, base: Thresholds | None = None, base_epochs: int = 10):
        self.candidates = candidates
        self.base = base or load_thresholds()
        self.defaults = {s: load_scenario_defaults(s) for s in SCENARIO_NAMES}
        self.base_epochs = base_epochs

    def thresholds(self, values: Mapping[str, float]) -> Thresholds:
        return dataclasses.replace(self.base, **values)

    def pick(self, d: DatasetResults, t: Thresholds) -> Pick:
        cell = decide(d.profile, d.similarity, t, self.defaults, base_epochs=self.base_epochs).scenario
        cands = tuple(self.candidates(d.profile, d.similarity, t))
        if len(cands) <= 1:
            return Pick(cell, (), cell)
        piloted = [c for c in cands if c in d.pilots]
        if not piloted:  # a run killed before its pilots: score the cell rather than guess a pilot's outcome
            return Pick(cell, cands, cell)
        best = max(piloted, key=lambda c: float(d.pilots[c]["select_acc"]))  # max keeps the first of ties
        return Pick(cell, cands, best)


def candidate_values(datasets: Iterable[DatasetResults], current: Thresholds) -> dict[str, list[float]]:
    """Per fitted threshold: midpoints between the datasets' sorted distinct values, plus the current value."""
    observed = {"similar_min_score": [], "large_min_images": [], "large_min_per_class": []}
    for d in datasets:
        observed["similar_min_score"].append(float(d.similarity["score"]))
        observed["large_min_images"].append(float(d.profile["n_train"]))
        observed["large_min_per_class"].append(float(d.profile["per_class_median"]))
    out = {}
    for name, values in observed.items():
        v = sorted(set(values))
        mids = [(a + b) / 2 for a, b in zip(v, v[1:])]
        if name == "large_min_images":  # an image count: n >= 322.5 and n >= 323 split the same integers
            mids = [float(math.ceil(m)) for m in mids]
        out[name] = sorted(set(mids) | {float(getattr(current, name))})
    return out


def _distance(values: Mapping[str, float], current: Thresholds) -> float:
    return sum(abs(v - getattr(current, k)) / max(abs(getattr(current, k)), 1e-9) for k, v in values.items())


@dataclass
class Fit:
    values: dict[str, float]
    mean_acc: float
    datasets: list[str]


def fit(rule: Rule, datasets: Sequence[DatasetResults]) -> Fit:
    """The thresholds maximising the mean accuracy of the rule's pick over `datasets`."""
    grid = candidate_values(datasets, rule.base)
    best: tuple[float, float] | None = None
    chosen: dict[str, float] = {}
    for combo in itertools.product(*(grid[k] for k in FITTED)):
        values = dict(zip(FITTED, combo))
        t = rule.thresholds({**values, "large_min_images": int(values["large_min_images"])})
        score = statistics.fmean(d.acc(rule.pick(d, t).auto) for d in datasets)
        key = (score, -_distance(values, rule.base))
        if best is None or key > best:
            best, chosen = key, values
    chosen["large_min_images"] = int(chosen["large_min_images"])
    return Fit(chosen, best[0] if best else float("nan"), [d.name for d in datasets])


@dataclass
class Row:
    """One held-out dataset: the rule fitted without it, and how it fares on it."""

    dataset: str
    n_train: int
    per_class_median: float
    similarity: float
    fitted: dict[str, float]
    pick: Pick
    accs: dict[str, float]  # plan -> acc (what the bench has)
    split: str
    pilot_share: float | None
    interval: "GapInterval | None" = None
    oracle: "GapInterval | None" = None  # the same bootstrap for the best forced plan as if auto had picked it

    @property
    def auto_acc(self) -> float:
        return self.accs[self.pick.auto]

    @property
    def best_forced(self) -> str:
        return max(SCENARIO_NAMES, key=lambda s: self.accs[s])

    @property
    def gap(self) -> float:
        """Auto minus the best forced plan, in points (<= 0)."""
        return (self.auto_acc - self.accs[self.best_forced]) * 100


def within_1pt(gap: float | np.ndarray):
    """Auto's gap (points, <= 0) is within 1 point of the best forced plan (a gap of exactly one image of 100
    counts, whatever the floating point of the division)."""
    return gap >= -1.0 - 1e-9


@dataclass(frozen=True)
class GapInterval:
    low: float  # 2.5th percentile of the resampled gap, points
    high: float  # 97.5th
    within_1pt: float  # share of the resamples where auto is within 1 point of that resample's best forced plan
    images: int


BOOTSTRAP_SAMPLES = 4000


def gap_interval(d: DatasetResults, auto: str, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
                 ) -> GapInterval | None:
    """Paired bootstrap of auto's gap to the best forced plan over the reported images; None without the
    per-image results of auto and every forced scenario (or when their image counts differ)."""
    strings = [d.plans.get(p, {}).get("correct") for p in (auto, *SCENARIO_NAMES)]
    if any(not isinstance(c, str) for c in strings) or len({len(c) for c in strings}) != 1:
        return None
    chars = np.array([list(c) for c in strings])
    scored = (chars != "-").all(axis=0)
    right = (chars[:, scored] == "1").astype(float)  # row 0: auto; rows 1..4: the forced scenarios
    n = right.shape[1]
    if n == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    accs = right[:, idx].mean(axis=2)  # [plans, samples]
    gaps = (accs[0] - accs[1:].max(axis=0)) * 100
    return GapInterval(float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5)),
                       float(within_1pt(gaps).mean()), n)


def pilot_share(d: DatasetResults, pick: Pick) -> float | None:
    """Pilot seconds of the candidates / (those + the picked plan's seconds); None without a pilot."""
    if not pick.candidates:
        return None
    pilot_s = sum(float(d.pilots[c]["seconds"]) for c in pick.candidates if c in d.pilots)
    total = pilot_s + float(d.plans[pick.auto].get("seconds", 0.0))
    return pilot_s / total if total > 0 else None


def leave_one_out(rule: Rule, datasets: Sequence[DatasetResults]) -> list[Row]:
    rows = []
    for held in datasets:
        f = fit(rule, [d for d in datasets if d.name != held.name])
        pick = rule.pick(held, rule.thresholds(f.values))
        rows.append(Row(held.name, int(held.profile["n_train"]), float(held.profile["per_class_median"]),
                        float(held.similarity["score"]), f.values, pick,
                        {p: held.acc(p) for p in PLANS if p in held.plans},
                        str(held.plans[pick.auto].get("reported_split", "")), pilot_share(held, pick),
                        gap_interval(held, pick.auto),
                        gap_interval(held, max(SCENARIO_NAMES, key=held.acc))))
    return rows


def _interval_text(i: GapInterval | None) -> str:
    return "-" if i is None else f"{i.low:+.1f} .. {i.high:+.1f} ({i.within_1pt:.0%})"


def _thresholds_text(v: Mapping[str, float]) -> str:
    return f"{v['similar_min_score']:.3f} / {v['large_min_images']} / {v['large_min_per_class']:g}"


def markdown(rows: Sequence[Row], all_fit: Fit, skipped: Sequence[str], current: Thresholds) -> str:
    head = ["dataset", "n_train", "/class", "similarity", "fitted without it (sim / images / per class)", "cell",
            "pilot candidates", "auto", "auto acc", *SCENARIO_NAMES, "naive", "best forced", "gap (pt)",
            "gap 95% interval (within 1 pt)", "pilot time share", "split"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = [f"{r.accs[p]:.3f}" if p in r.accs else "-" for p in PLANS]
        share = f"{r.pilot_share:.0%}" if r.pilot_share is not None else "-"
        lines.append("| " + " | ".join([
            r.dataset, str(r.n_train), f"{r.per_class_median:g}", f"{r.similarity:.3f}", _thresholds_text(r.fitted),
            r.pick.cell, ", ".join(r.pick.candidates) or "-", r.pick.auto, f"{r.auto_acc:.3f}", *accs,
            r.best_forced, f"{r.gap:+.1f}", _interval_text(r.interval), share, r.split]) + " |")
    gaps = [r.gap for r in rows]
    close = [r.dataset for r in rows if within_1pt(r.gap)]
    intervals = [r for r in rows if r.interval is not None]
    cur = {k: getattr(current, k) for k in FITTED}
    out = ["## Leave-one-dataset-out", "", *lines, ""]
    if rows:
        out.append(f"Summary: worst gap {min(gaps):+.1f} pt, mean gap {statistics.fmean(gaps):+.1f} pt; auto within "
                   f"1 point of the best forced plan on {len(close)}/{len(rows)} datasets ({', '.join(close)}).")
    if intervals:
        consistent = [r.dataset for r in intervals if within_1pt(r.interval.high)]
        out.append(f"Paired bootstrap over the reported images ({BOOTSTRAP_SAMPLES} resamples): the 95% interval "
                   f"of the gap reaches -1 pt or above on {len(consistent)}/{len(intervals)} datasets "
                   f"({', '.join(consistent)}); expected number within 1 point under test-set noise alone: "
                   f"{sum(r.interval.within_1pt for r in intervals):.1f}.")
    oracles = [r.oracle for r in rows if r.oracle is not None]
    if oracles and len(oracles) == len(rows):
        expected = sum(o.within_1pt for o in oracles)
        out.append(f"The noise floor of the criterion: a chooser that always picked each dataset's best forced plan "
                   f"(as measured here) is within 1 point of the resampled best on {expected:.1f}/{len(oracles)} "
                   f"datasets on average, and on all of them in "
                   f"{float(np.prod([o.within_1pt for o in oracles])):.0%} of the resamples.")
    out += ["", f"Fitted on all {len(all_fit.datasets)} datasets (mean acc of the rule's pick {all_fit.mean_acc:.3f}; "
            f"current config {_thresholds_text(cur)}): {_thresholds_text(all_fit.values)}", "",
            "For finetune/configs/strategy.yaml:", "", "```yaml",
            f"large_min_images: {all_fit.values['large_min_images']}",
            f"large_min_per_class: {all_fit.values['large_min_per_class']:g}",
            f"similar_min_score: {all_fit.values['similar_min_score']:.3f}", "```"]
    if skipped:
        out += ["", f"Not scored (not measured, or a forced scenario missing): {', '.join(skipped)}."]
    return "\n".join(out) + "\n"


def calibrate(results: Mapping[str, DatasetResults], candidates: CandidatesFn,
              base: Thresholds | None = None) -> tuple[list[Row], Fit, list[str]]:
    rule = Rule(candidates, base)
    complete = [d for d in results.values() if d.complete]
    if len(complete) < 2:
        raise SystemExit(f"{len(complete)} dataset(s) with a measurement and all four forced plans: "
                         "leave-one-out needs at least 2")
    skipped = [d.name for d in results.values() if not d.complete]
    return leave_one_out(rule, complete), fit(rule, complete), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="JSONL written by bench/domain_bench.py")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--no-pilot", action="store_true",
                        help="score the table's cell alone (no pilot_candidates, no pilot rows needed)")
    args = parser.parse_args(argv)
    candidates = no_pilot if args.no_pilot else default_candidates()
    rows, all_fit, skipped = calibrate(read_results(args.results), candidates)
    emit(markdown(rows, all_fit, skipped, load_thresholds()), args.out)
    return 0

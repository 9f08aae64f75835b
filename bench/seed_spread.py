"""How much of auto's gap is the training seed's? Domain-bench runs that differ only in `--seed` (issue 13).

    uv run --frozen python -m bench seed_spread docs/results/domain_bench_cpu.jsonl \
        docs/results/domain_bench_cpu_seed1.jsonl --out docs/results/seed_spread_cpu.md

Each argument is one bench run (bench/domain_bench.py; `A+B` reads B's rows over A's, as the replay script did
does). The bench's datasets have their reported split in a folder, so two seeds score the same images (a set
without a val folder would have val carved by the seed as well). What the seed changes is the training: the
selection split carved from train, the head's initialisation, the data order and the augmentation.
Per dataset measured completely in every run:

* each forced scenario's accuracy in every run, and which scenario is best in each;
* auto's pick in each run (calibrate.py's rule with the shipped thresholds: the table's cell, then the pilot of
  the candidates) and its gap to that run's best forced plan;
* the best plan of one run scored in another run: what a chooser that knew the answer of one full training of
  every plan would get. Its gap is training noise alone: a rule that sees one run of each plan cannot be
  expected to do better;
* on the runs' mean accuracies: auto's mean accuracy against the best scenario's mean.

Pure analysis: no torch.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bench import calibrate
from finetune.strategy.decide import SCENARIO_NAMES, load_thresholds


@dataclass
class Spread:
    """One dataset over several runs."""

    dataset: str
    accs: dict[str, list[float]]  # scenario -> its accuracy in each run
    autos: list[str]  # auto's pick in each run

    @property
    def runs(self) -> int:
        return len(self.autos)

    def best(self, run: int) -> str:
        return max(SCENARIO_NAMES, key=lambda s: self.accs[s][run])

    def gap(self, plan: str, run: int) -> float:
        """`plan`'s accuracy in `run` minus that run's best forced plan, in points (<= 0)."""
        return (self.accs[plan][run] - self.accs[self.best(run)][run]) * 100

    def auto_gaps(self) -> list[float]:
        return [self.gap(a, i) for i, a in enumerate(self.autos)]

    def cross_gaps(self) -> list[float]:
        """For every ordered pair of runs (i, j): run i's best plan, scored in run j."""
        return [self.gap(self.best(i), j) for i, j in itertools.permutations(range(self.runs), 2)]

    def mean_gap(self) -> float:
        """Auto's mean accuracy over the runs minus the best scenario's mean, in points."""
        auto = statistics.fmean(self.accs[a][i] for i, a in enumerate(self.autos))
        return (auto - max(statistics.fmean(v) for v in self.accs.values())) * 100

    def plan_moves(self) -> list[float]:
        """Each scenario's largest move between two runs, in points."""
        return [(max(v) - min(v)) * 100 for v in self.accs.values()]


def spreads(runs: Sequence[dict[str, calibrate.DatasetResults]]) -> list[Spread]:
    """The datasets complete (measured, all four forced scenarios) in every run, in the first run's order."""
    rule = calibrate.Rule(calibrate.default_candidates())
    thresholds = load_thresholds()
    out = []
    for name in runs[0]:
        ds = [r.get(name) for r in runs]
        if not all(d is not None and d.complete for d in ds):
            continue
        out.append(Spread(name, {s: [d.acc(s) for d in ds] for s in SCENARIO_NAMES},
                          [rule.pick(d, thresholds).auto for d in ds]))
    return out


def _count(gaps: Sequence[float]) -> str:
    return f"{sum(bool(calibrate.within_1pt(g)) for g in gaps)}/{len(gaps)}"


def markdown(rows: Sequence[Spread], names: Sequence[str]) -> str:
    head = ["dataset", *SCENARIO_NAMES, "best per run", "auto per run", "auto gap per run (pt)",
            "one run's best, scored in another (pt)", "auto on mean accuracy (pt)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r.dataset, *(" / ".join(f"{a:.3f}" for a in r.accs[s]) for s in SCENARIO_NAMES),
            " / ".join(r.best(i) for i in range(r.runs)), " / ".join(r.autos),
            " / ".join(f"{g:+.1f}" for g in r.auto_gaps()), " / ".join(f"{g:+.1f}" for g in r.cross_gaps()),
            f"{r.mean_gap():+.1f}"]) + " |")
    out = [f"## Seed spread ({len(names)} runs: {', '.join(names)})", "", *lines, ""]
    if not rows:
        return "\n".join(out + ["No dataset is complete in every run."]) + "\n"
    same = [r.dataset for r in rows if len({r.best(i) for i in range(r.runs)}) == 1]
    per_run = ", ".join(_count([r.auto_gaps()[i] for r in rows]) for i in range(len(names)))
    moves = [m for r in rows for m in r.plan_moves()]
    out += [f"The best forced scenario is the same in every run on {len(same)}/{len(rows)} datasets"
            f"{' (' + ', '.join(same) + ')' if same else ''}.",
            f"A scenario's accuracy moves between runs by a median of {statistics.median(moves):.1f} points "
            f"(largest {max(moves):.1f}).",
            f"Auto within 1 point of its run's best forced plan: {per_run} (per run).",
            f"One run's best plan, scored in another run (a chooser that knew one full training of every plan): "
            f"within 1 point in {_count([g for r in rows for g in r.cross_gaps()])} (dataset, run pair) cases, "
            f"mean gap {statistics.fmean(g for r in rows for g in r.cross_gaps()):+.1f} pt.",
            f"On the runs' mean accuracies, auto within 1 point of the best scenario on "
            f"{_count([r.mean_gap() for r in rows])} datasets (mean gap "
            f"{statistics.fmean(r.mean_gap() for r in rows):+.1f} pt)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="bench JSONL, one per seed (A+B: B's rows over A's)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise SystemExit("give at least two runs (one JSONL per seed)")
    names, runs = zip(*map(calibrate.read_run, args.runs))
    calibrate.emit(markdown(spreads(runs), names), args.out)
    return 0

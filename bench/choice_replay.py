"""Replay other ways for `auto` to choose its plan on domain-bench results (issue 13), without training anything.

    uv run --frozen python -m bench choice_replay docs/results/domain_bench_gpu.jsonl \
        docs/results/domain_bench_cpu.jsonl

Every bench run (bench/domain_bench.py) trains all four scenarios in full and runs the pilot of all four, so the
choice of any rule below can be read off its rows. With the shipped thresholds (finetune/configs/strategy.yaml), per rule:
how many dataset-runs it gets within 1 point of the best forced plan, its mean and worst gap. Only datasets with
all four forced plans and all four pilots count. Pure analysis: no torch.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Sequence

from bench import calibrate
from finetune.strategy.decide import SCENARIO_NAMES, load_thresholds, pilot_candidates


Chooser = Callable[[object, Sequence[str]], str]  # (DatasetResults, candidates, the cell first) -> scenario


def _best(d, among: Sequence[str], score: Callable[[object, str], float], prefer: Callable[[str], bool]) -> str:
    return max(among, key=lambda s: (score(d, s), prefer(s), -list(among).index(s)))


def pilot(d, s):
    return float(d.pilots[s]["select_acc"])


def full(d, s):
    return float(d.plans[s]["select_acc"])


RULES: dict[str, Chooser] = {
    "shipped: the pilot of the candidates, a tie to the cell":
        lambda d, c: _best(d, c, pilot, lambda s: False),
    "the pilot of all four scenarios":
        lambda d, c: _best(d, [*c, *[s for s in SCENARIO_NAMES if s not in c]], pilot, lambda s: False),
    "the candidates' full runs, by their selection accuracy":
        lambda d, c: _best(d, c, full, lambda s: False),
    "all four full runs, by their selection accuracy":
        lambda d, c: _best(d, [*c, *[s for s in SCENARIO_NAMES if s not in c]], full, lambda s: False),
    "all four, pilot + full-run selection accuracy":
        lambda d, c: _best(d, [*c, *[s for s in SCENARIO_NAMES if s not in c]], lambda d, s: pilot(d, s) + full(d, s),
                           lambda s: False),
    "the pilot of the candidates, a tie to a fine-tuning plan":
        lambda d, c: _best(d, c, pilot, lambda s: s.startswith("large-")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+",
                        help="JSONL files written by bench/domain_bench.py; A+B: one run, B's rows replacing A's "
                             "(e.g. the pilots of a `--plans '' --pilot-folds 5` run over a full run's)")
    args = parser.parse_args(argv)
    thresholds = load_thresholds()
    runs = [(name, d) for name, results in map(calibrate.read_run, args.results) for d in results.values()
            if d.complete and all(s in d.pilots for s in SCENARIO_NAMES)]
    if not runs:
        raise SystemExit("no dataset with all four forced plans and all four pilots")
    print(f"{len(runs)} dataset-runs: " + ", ".join(f"{name}:{d.name}" for name, d in runs))
    for rule, choose in RULES.items():
        gaps = []
        for _, d in runs:
            candidates, _ = pilot_candidates(d.profile, d.similarity, thresholds)
            best = max(d.acc(s) for s in SCENARIO_NAMES)
            gaps.append((d.acc(choose(d, candidates) if len(candidates) > 1 else candidates[0]) - best) * 100)
        within = sum(bool(calibrate.within_1pt(g)) for g in gaps)
        print(f"| {rule} | {within}/{len(gaps)} | {statistics.fmean(gaps):+.1f} | {min(gaps):+.1f} | "
              + " ".join(f"{g:+.1f}" for g in gaps) + " |")
    return 0

"""Does `auto` beat every fixed policy? Several backbones x seeds of the domain bench, then regret and cost per policy.

    uv run --frozen python -m bench decision run --out-dir .bench-data/decision        # hours on a 2-core CPU
    uv run --frozen python -m bench decision report .bench-data/decision/*.jsonl

`run` calls bench/domain_bench.py once per backbone and seed (files `MODEL_sSEED.jsonl` in --out-dir): every
scenario forced on each bench set, and the pilot of all four, so the choice of any rule can be read off the rows.
It goes on where a killed run stopped: a set whose four plans are in its file is skipped, a set cut short is
benched again from its measurement.

`report` reads those files and prints, per backbone, for each policy: the seed-averaged regret (the best plan's
seed-averaged accuracy minus the policy's, in points; mean and worst over the sets), its wall time relative to
"always large-different" (the measurement, which `finetune train` makes whatever the scenario, + the pilots the
policy runs + the plan it picks), and auto's largest pilot share of a run. Policies: the four scenarios fixed; `auto (before)`,
the rule the rows were benched with (the pilot of the measure row's `shipped_candidates`, ties to the first);
`auto` (the shipped `decide.pilot_candidates` and `decide.settle_pilot`, replayed with the shipped thresholds);
and `auto, leave-one-set-out`: `linear_min_select_acc` and `earlier_head_min_gain` refitted on the other sets for
each set. Below the table,
the bound: the wall time of the cheapest per-set choice whose regret matches the best fixed policy's, chosen
knowing the test accuracies (no rule choosing among the four plans can be cheaper at that regret).
Pure analysis (no torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from bench.common import ROOT, WEIGHTS
from finetune.strategy.decide import SCENARIO_NAMES, Thresholds, load_thresholds, pilot_candidates, settle_pilot

DATASETS = ("hymenoptera", "hymenoptera-gray", "hymenoptera-edges", "clothing-small", "clothing-edges-small",
            "omniglot-small", "patterns-small", "patterns")
MODELS = {"mobilenetv2_100": "mobilenetv2_100.coral_in1k", "tf_efficientnet_lite0": "tf_efficientnet_lite0.in1k"}
TAU_GRID = tuple(round(0.70 + 0.01 * i, 2) for i in range(30))
GAIN_GRID = (0.0, 0.02, 0.05, 0.1, 1.0)  # earlier_head_min_gain (1.0: the earlier stage's head never goes on)


# --- run -------------------------------------------------------------------------------------------

def finished(out: Path) -> set[str]:
    """Sets whose four forced plans are all in `out`."""
    plans: dict[str, set[str]] = defaultdict(set)
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == "plan":
                plans[row["dataset"]].add(row["plan"])
    return {d for d, p in plans.items() if set(SCENARIO_NAMES) <= p}


def drop_unfinished(out: Path, todo: list[str]) -> None:
    """Rows of sets that will be benched again (a killed run's measurement or pilots) leave `out` first."""
    if out.exists():
        keep = [line for line in out.read_text().splitlines(keepends=True) if json.loads(line)["dataset"] not in todo]
        out.write_text("".join(keep))


def run(args: argparse.Namespace) -> int:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for model in args.models:
            out = args.out_dir / f"{model}_s{seed}.jsonl"
            todo = [d for d in args.datasets if d not in finished(out)]
            if not todo:
                continue
            drop_unfinished(out, todo)
            print(f"== {model} seed {seed}: {', '.join(todo)}", flush=True)
            cmd = [sys.executable, "-m", "bench", "domain_bench", "--manifest", str(args.manifest), "--model", model,
                   "--weights", str(WEIGHTS / f"{MODELS[model]}.safetensors"), "--epochs", str(args.epochs),
                   "--image-size", str(args.image_size), "--seed", str(seed), "--plans", ",".join(SCENARIO_NAMES),
                   "--datasets", ",".join(todo), "--out", str(out)]
            subprocess.run(cmd, cwd=ROOT, check=True)
    return 0


# --- report ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class SetRun:
    """One bench set at one seed: the measurement, the pilot of every scenario, every forced plan."""

    measure: dict[str, Any]
    pilots: dict[str, dict[str, Any]]
    plans: dict[str, dict[str, Any]]


Policy = Callable[[SetRun], tuple[str, list[str]]]  # -> (the plan it runs, the scenarios it pilots)


def load(path: Path) -> dict[str, SetRun]:
    """The complete sets of one results file (measurement, four pilots, four plans)."""
    found: dict[str, SetRun] = defaultdict(lambda: SetRun({}, {}, {}))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        run_ = found[row["dataset"]]
        if row["kind"] == "measure":
            run_.measure = row
        else:
            getattr(run_, row["kind"] + "s")[row["plan"]] = row
    return {d: r for d, r in found.items()
            if r.measure and set(SCENARIO_NAMES) <= set(r.pilots) and set(SCENARIO_NAMES) <= set(r.plans)}


def fixed(scenario: str) -> Policy:
    return lambda r: (scenario, [])


def before(r: SetRun) -> tuple[str, list[str]]:
    """The rule the rows were benched with: the pilot's best of the shipped candidates, a tie to the first."""
    c = r.measure["shipped_candidates"]
    if len(c) < 2:
        return c[0], []
    return max(c, key=lambda s: (r.pilots[s]["select_acc"], -c.index(s))), c


def shipped(thresholds: Thresholds) -> Policy:
    """`decide.pilot_candidates` and `decide.settle_pilot` on the rows (the table's cell: the measure row's)."""
    def choose(r: SetRun) -> tuple[str, list[str]]:
        candidates, _ = pilot_candidates(r.measure["profile"], r.measure["similarity"], thresholds)
        if len(candidates) < 2:
            return candidates[0], []
        domain = r.measure["auto"].split("-")[1]
        return settle_pilot(domain, {s: r.pilots[s]["select_acc"] for s in candidates}, thresholds)[0], candidates
    return choose


@dataclasses.dataclass
class Score:
    mean: float
    worst: float
    per_set: dict[str, float]
    wall: float  # seconds over every set and seed
    pilot_share: float  # the largest share of one run's wall spent in the pilot


def score(runs: list[dict[str, SetRun]], sets: list[str], policy: Policy) -> Score:
    """Every policy pays the measurement (`finetune train` measures whatever the scenario, and a fine-tuning plan's
    head warm-up reads the features it cached); auto pays its pilots too."""
    regrets, wall, share = {}, 0.0, 0.0
    for d in sets:
        best = max(statistics.mean(r[d].plans[s]["acc"] for r in runs) for s in SCENARIO_NAMES)
        accs = []
        for r in runs:
            plan, piloted = policy(r[d])
            accs.append(r[d].plans[plan]["acc"])
            pilot_s = sum(r[d].pilots[s]["seconds"] for s in piloted)
            total = r[d].measure["seconds"] + pilot_s + r[d].plans[plan]["seconds"]
            wall += total
            share = max(share, pilot_s / total)
        regrets[d] = 100 * (best - statistics.mean(accs))
    return Score(statistics.mean(regrets.values()), max(regrets.values()), regrets, wall, share)


def leave_one_out(runs: list[dict[str, SetRun]], sets: list[str], thresholds: Thresholds) -> tuple[Score, dict]:
    """`linear_min_select_acc` and `earlier_head_min_gain` chosen together on the other sets for each set: the
    lowest mean regret there, a tie to the higher values (fine-tuning and the final features' head, the safer
    choices, left only on stronger evidence)."""
    grid = [dataclasses.replace(thresholds, linear_min_select_acc=t, earlier_head_min_gain=g)
            for t, g in itertools.product(TAU_GRID, GAIN_GRID)]
    picked: dict[str, Thresholds] = {}
    for held in sets:
        others = [d for d in sets if d != held]
        picked[held] = min(grid, key=lambda th: (round(score(runs, others, shipped(th)).mean, 6),
                                                  -th.linear_min_select_acc, -th.earlier_head_min_gain))
    per_set: dict[str, float] = {}
    wall, share = 0.0, 0.0
    for held, th in picked.items():
        s = score(runs, [held], shipped(th))
        per_set[held], wall, share = s.per_set[held], wall + s.wall, max(share, s.pilot_share)
    return Score(statistics.mean(per_set.values()), max(per_set.values()), per_set, wall, share), picked


def cheapest_within(runs: list[dict[str, SetRun]], sets: list[str], mean: float, worst: float) -> Score | None:
    """The cheapest choice of one of the four plans per set whose seed-averaged regret is at most `mean` (mean over
    the sets) and `worst` (any set): what a policy that knew the test accuracies would pay for that regret. The
    bound on what any rule choosing among these plans can reach; None where no choice meets it (or > 10 sets)."""
    if len(sets) > 10:
        return None
    options = []
    for d in sets:
        best = max(statistics.mean(r[d].plans[s]["acc"] for r in runs) for s in SCENARIO_NAMES)
        options.append([(100 * (best - statistics.mean(r[d].plans[s]["acc"] for r in runs)),
                         sum(r[d].measure["seconds"] + r[d].plans[s]["seconds"] for r in runs)) for s in SCENARIO_NAMES])
    found: Score | None = None
    for combo in itertools.product(*options):
        regrets = [c[0] for c in combo]
        if statistics.mean(regrets) <= mean + 1e-9 and max(regrets) <= worst + 1e-9:
            wall = sum(c[1] for c in combo)
            if found is None or wall < found.wall:
                found = Score(statistics.mean(regrets), max(regrets), dict(zip(sets, regrets)), wall, 0.0)
    return found


def report_model(model: str, files: list[Path], thresholds: Thresholds) -> list[str]:
    runs = [load(f) for f in files]
    sets = [d for d in DATASETS if all(d in r for r in runs)] + sorted(
        set.intersection(*(set(r) for r in runs)) - set(DATASETS))
    if not sets:
        return [f"{model}: no set is complete in every seed"]
    policies: dict[str, Policy] = {f"always {s}": fixed(s) for s in SCENARIO_NAMES}
    if all("shipped_candidates" in r[d].measure for r in runs for d in sets):  # older rows lack them
        policies["auto (before)"] = before
    policies["auto"] = shipped(thresholds)
    scores = {name: score(runs, sets, p) for name, p in policies.items()}
    picked: dict[str, Thresholds] = {}
    if len(sets) > 1:  # a threshold fitted on no set says nothing
        scores["auto, leave-one-set-out"], picked = leave_one_out(runs, sets, thresholds)
    base = scores["always large-different"].wall
    seeds = ", ".join(re.sub(r".*_s(\d+)\.jsonl$", r"\1", f.name) for f in files)
    lines = [f"### {model}: {len(sets)} sets x seeds {seeds}", "",
             "| policy | mean regret (pt) | worst regret (pt) | wall vs always large-different | largest pilot share |",
             "|---|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s.mean:.2f} | {s.worst:.2f} | {s.wall / base:.2f} | {s.pilot_share:.0%} |")
    lines += ["", "| set | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|"]
    lines += [f"| {d} | " + " | ".join(f"{s.per_set[d]:.1f}" for s in scores.values()) + " |" for d in sets]
    fixed_scores = [scores[f"always {s}"] for s in SCENARIO_NAMES]
    bound = cheapest_within(runs, sets, min(f.mean for f in fixed_scores), min(f.worst for f in fixed_scores))
    if bound is not None:
        lines += ["", f"Knowing the test accuracies, the cheapest plan per set with regret no worse than the best fixed "
                      f"policy's (mean and worst) costs {bound.wall / base:.2f} of always large-different "
                      f"({bound.mean:.2f} / {bound.worst:.2f})."]
    taus = sorted({th.linear_min_select_acc for th in picked.values()})
    gains = sorted({th.earlier_head_min_gain for th in picked.values()})
    lines += ["", f"leave-one-set-out `linear_min_select_acc`: {', '.join(f'{t:g}' for t in taus) or 'not fitted'} "
                  f"(shipped {thresholds.linear_min_select_acc:g}); `earlier_head_min_gain`: "
                  f"{', '.join(f'{g:g}' for g in gains) or 'not fitted'} (shipped {thresholds.earlier_head_min_gain:g})",
              ""]
    return lines


def report(args: argparse.Namespace) -> int:
    by_model: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(args.files):
        match = re.fullmatch(r"(.+)_s\d+\.jsonl", f.name)
        if not match:
            raise SystemExit(f"{f}: expected MODEL_sSEED.jsonl (as `run` names them)")
        by_model[match.group(1)].append(f)
    thresholds = load_thresholds()
    for model, files in by_model.items():
        print("\n".join(report_model(model, files, thresholds)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="bench every backbone x seed (domain_bench), going on where it stopped")
    r.add_argument("--out-dir", type=Path, default=ROOT / ".bench-data" / "decision")
    r.add_argument("--manifest", type=Path, default=ROOT / ".bench-data" / "domains" / "domains.json")
    r.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    r.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS))
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--image-size", type=int, default=128)
    p = sub.add_parser("report", help="regret and cost of each policy, per backbone")
    p.add_argument("files", nargs="+", type=Path, help="MODEL_sSEED.jsonl files written by `run`")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)

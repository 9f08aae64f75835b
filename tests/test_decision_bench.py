"""bench/decision.py: regret and cost of each policy, read off the domain bench's rows of several seeds."""

from __future__ import annotations

import json
from pathlib import Path

from bench import decision
from finetune.strategy.decide import SCENARIO_NAMES, load_thresholds

SIM = {"score": 0.7, "components": {"probe": 0.7}}  # similar (>= 0.62)


def rows(name: str, n_train: int, acc: dict[str, float], pilot: dict[str, float], seconds: dict[str, float]):
    cell = ("large" if n_train >= 1000 else "small") + "-similar"
    yield {"kind": "measure", "dataset": name, "seconds": 10.0, "auto": cell, "shipped_candidates": [cell],
           "profile": {"n_train": n_train, "per_class_median": n_train / 2}, "similarity": SIM}
    for s in SCENARIO_NAMES:
        yield {"kind": "pilot", "dataset": name, "plan": s, "select_acc": pilot.get(s, 0.5), "seconds": 1.0}
        yield {"kind": "plan", "dataset": name, "plan": s, "acc": acc[s], "seconds": seconds[s]}


def write(path: Path, *sets) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for rs in sets for r in rs))
    return path


COST = {"small-similar": 5.0, "small-different": 5.0, "large-similar": 60.0, "large-different": 90.0}


def test_regret_and_cost_are_read_off_every_seed(tmp_path: Path):
    # "easy": little data, a linear head gets 95% of the selection images and is as good as fine-tuning.
    # "hard": little data, the heads get 60%: fine-tuning (large-similar here, a similar domain) is 20 points better.
    easy = {"small-similar": 0.9, "small-different": 0.88, "large-similar": 0.9, "large-different": 0.89}
    hard = {"small-similar": 0.6, "small-different": 0.6, "large-similar": 0.8, "large-different": 0.78}
    files = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        files.append(write(tmp_path / f"net_s{seed}.jsonl",
                           rows("easy", 200, {k: v + shift for k, v in easy.items()},
                                {"small-similar": 0.95, "small-different": 0.9}, COST),
                           rows("hard", 200, hard, {"small-similar": 0.6, "small-different": 0.55}, COST)))
    runs = [decision.load(f) for f in files]
    thresholds = load_thresholds()
    auto = decision.score(runs, ["easy", "hard"], decision.shipped(thresholds))
    # auto: the linear head on "easy" (best there), fine-tuning (large-similar) on "hard" (best there)
    assert auto.per_set == {"easy": 0.0, "hard": 0.0}
    ld = decision.score(runs, ["easy", "hard"], decision.fixed("large-different"))
    assert round(ld.per_set["easy"], 6) == 1.0 and round(ld.per_set["hard"], 6) == 2.0
    assert round(ld.mean, 6) == 1.5 and round(ld.worst, 6) == 2.0
    # wall: every policy pays the measurement (10 s); auto pays its two pilots (1 s each) too
    assert ld.wall == 2 * (10 + 90) * 2
    assert auto.wall == 2 * ((10 + 2 + 5) + (10 + 2 + 60))
    assert auto.pilot_share == 2 / 17
    report = "\n".join(decision.report_model("net", files, thresholds))
    assert "| auto | 0.00 | 0.00 |" in report and "| always large-different | 1.50 | 2.00 | 1.00 |" in report
    assert "leave-one-set-out" in report


def test_sets_missing_from_a_seed_are_left_out(tmp_path: Path):
    acc = dict.fromkeys(SCENARIO_NAMES, 0.5)
    a = write(tmp_path / "net_s0.jsonl", rows("one", 200, acc, {}, COST), rows("two", 200, acc, {}, COST))
    b = write(tmp_path / "net_s1.jsonl", rows("one", 200, acc, {}, COST))
    report = "\n".join(decision.report_model("net", [a, b], load_thresholds()))
    assert "1 sets x seeds 0, 1" in report and "| one |" in report and "| two |" not in report


def test_the_bound_is_the_cheapest_choice_that_matches_the_best_fixed_regret(tmp_path: Path):
    # "a": the cheap head is as good as the best plan; "b": only large-different is best (by 4 points).
    a = {"small-similar": 0.9, "small-different": 0.8, "large-similar": 0.9, "large-different": 0.88}
    b = {"small-similar": 0.7, "small-different": 0.7, "large-similar": 0.76, "large-different": 0.8}
    runs = [decision.load(write(tmp_path / "net_s0.jsonl", rows("a", 200, a, {}, COST), rows("b", 200, b, {}, COST)))]
    # best fixed: large-different (mean 1.0, worst 2.0) and large-similar (mean 2.0, worst 4.0): bounds 1.0 / 2.0
    bound = decision.cheapest_within(runs, ["a", "b"], mean=1.0, worst=2.0)
    assert bound is not None and {k: round(v, 6) for k, v in bound.per_set.items()} == {"a": 0.0, "b": 0.0}
    assert bound.wall == (10 + 5) + (10 + 90)  # small-similar on a, large-different on b
    assert decision.cheapest_within(runs, ["a", "b"], mean=0.0, worst=0.0).wall == bound.wall
    assert decision.cheapest_within(runs, ["b"], mean=0.0, worst=-1.0) is None  # no choice has negative regret
    report = "\n".join(decision.report_model("net", [tmp_path / "net_s0.jsonl"], load_thresholds()))
    assert f"costs {bound.wall / 200:.2f} of always large-different" in report

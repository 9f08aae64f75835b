"""`python -m bench calibrate`: leave-one-dataset-out fitting of the scenario thresholds, on synthetic bench results."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest


def _load_bench(name: str):
    """bench/NAME.py, the module `python -m bench NAME` runs."""
    return importlib.import_module(f"bench.{name}")


calibrate = _load_bench("calibrate")

# name: (n_train, per-class median, similarity score, the scenario that does best on it)
DATASETS = {
    "A": (200, 20.0, 0.70, "small-similar"),
    "B": (3000, 300.0, 0.90, "large-similar"),
    "C": (2500, 500.0, 0.40, "large-different"),
    "D": (300, 60.0, 0.50, "small-different"),
}
PLAN_SECONDS = 60.0


def _rows(best: dict[str, str], pilots: dict[str, dict[str, tuple[float, float]]] | None = None) -> list[dict]:
    """A bench JSONL: per dataset a measure row and one plan row per plan; the `best` plan scores 0.9, the others
    lower (naive lowest), so which plan is best is known."""
    rows = []
    for name, (n, per_class, score, _) in DATASETS.items():
        rows.append({"kind": "measure", "dataset": name, "seconds": 5.0,
                     "profile": {"n_train": n, "per_class_median": per_class},
                     "similarity": {"score": score, "components": {"probe": score}, "best_stage": "stage3",
                                    "best_earlier_stage": "stage3", "probes": []}})
        for i, plan in enumerate(calibrate.PLANS):
            acc = 0.9 if plan == best[name] else 0.5 - 0.1 * i
            rows.append({"kind": "plan", "dataset": name, "plan": plan, "acc": acc, "reported_split": "test",
                         "select_acc": acc, "seconds": PLAN_SECONDS})
        for plan, (select_acc, seconds) in (pilots or {}).get(name, {}).items():
            rows.append({"kind": "pilot", "dataset": name, "plan": plan, "select_acc": select_acc,
                         "seconds": seconds})
    return rows


def _results(tmp_path: Path, rows: list[dict]):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return calibrate.read_results(path)


def _by_name(rows):
    return {r.dataset: r for r in rows}


def test_leave_one_out_fit_ignores_the_held_out_dataset(tmp_path):
    best = {name: d[3] for name, d in DATASETS.items()}
    rows, all_fit, _ = calibrate.calibrate(_results(tmp_path, _rows(best)), calibrate.no_pilot)
    # A's accuracies now say it is a different domain (small-different far ahead): only fits that see A may move.
    changed = _by_name(calibrate.calibrate(_results(tmp_path, _rows({**best, "A": "small-different"})),
                                           calibrate.no_pilot)[0])
    before = _by_name(rows)
    assert changed["A"].fitted == before["A"].fitted
    # ... and they do move (the check above could not pass by the fit ignoring accuracies altogether).
    assert any(changed[n].fitted != before[n].fitted for n in "BCD")
    # Every dataset in its own right cell: the thresholds separating them, ties broken towards the config.
    assert all_fit.values == {"similar_min_score": pytest.approx(0.62), "large_min_images": 1000,
                              "large_min_per_class": 100}
    assert all_fit.mean_acc == pytest.approx(0.9)


def test_pick_and_gap_columns(tmp_path):
    best = {**{name: d[3] for name, d in DATASETS.items()}, "A": "small-different"}
    rows = _by_name(calibrate.calibrate(_results(tmp_path, _rows(best)), calibrate.no_pilot)[0])
    a = rows["A"]
    # Fitted without A (B, C, D all in their own cells): A's score 0.70 is similar, its 200 images little data.
    assert (a.pick.cell, a.pick.auto, a.pick.candidates) == ("small-similar", "small-similar", ())
    assert a.best_forced == "small-different"
    assert a.auto_acc == pytest.approx(0.5)  # small-similar is PLANS[0]: 0.5 - 0.1 * 0
    assert a.gap == pytest.approx(-40.0)
    assert a.pilot_share is None
    for name in "BCD":
        assert rows[name].pick.auto == rows[name].best_forced == DATASETS[name][3]
        assert rows[name].gap == pytest.approx(0.0)
    text = calibrate.markdown(list(rows.values()), calibrate.fit(calibrate.Rule(calibrate.no_pilot),
                              list(calibrate.read_results(tmp_path / "results.jsonl").values())), [],
                              calibrate.load_thresholds())
    assert "worst gap -40.0 pt, mean gap -10.0 pt" in text
    assert "on 3/4 datasets (B, C, D)" in text


def test_a_pilot_picks_the_candidate_that_scored_best_inside_train(tmp_path):
    pilots = {"C": {"large-similar": (0.95, 10.0), "large-different": (0.70, 30.0)}}
    best = {name: d[3] for name, d in DATASETS.items()}

    def candidates(profile, similarity, thresholds):  # C is the unclear case; the others are clear
        return ["large-similar", "large-different"] if profile["n_train"] == 2500 else ["ignored"]

    rows = _by_name(calibrate.calibrate(_results(tmp_path, _rows(best, pilots)), candidates)[0])
    c = rows["C"]
    assert c.pick.cell == "large-different"
    assert c.pick.candidates == ("large-similar", "large-different")
    assert c.pick.auto == "large-similar"  # the pilot's choice, not the cell
    assert c.auto_acc == pytest.approx(0.5 - 0.1 * calibrate.PLANS.index("large-similar"))
    assert c.gap == pytest.approx((c.auto_acc - 0.9) * 100)
    assert c.pilot_share == pytest.approx(40.0 / (40.0 + PLAN_SECONDS))
    assert rows["A"].pick.candidates == ()  # one candidate: a clear case, no pilot


def test_cli_writes_the_table_and_needs_pilot_candidates(tmp_path, monkeypatch, capsys):
    best = {name: d[3] for name, d in DATASETS.items()}
    rows = _rows(best)
    rows.append({"kind": "measure", "dataset": "E", "profile": {"n_train": 10, "per_class_median": 5},
                 "similarity": {"score": 0.5, "components": {}}, "seconds": 1.0})  # killed before its plans ran
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "calibrate.md"
    assert calibrate.main([str(path), "--no-pilot", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "similar_min_score: 0.620" in text and "Not scored" in text and "| E |" not in text
    # The default rule is the shipped one: pilot_candidates' candidates (its reasons dropped).
    fn = calibrate.default_candidates()
    profile, similarity = {"n_train": 5000, "per_class_median": 500}, {"score": 0.95, "components": {}}
    from finetune.strategy.decide import load_thresholds, pilot_candidates

    assert fn(profile, similarity, load_thresholds()) == pilot_candidates(profile, similarity, load_thresholds())[0]


def _with_correct(name: str, per_plan: dict[str, str]):
    d = calibrate.DatasetResults(name, profile={"n_train": 10, "per_class_median": 5.0}, similarity={"score": 0.5})
    for plan, correct in per_plan.items():
        d.plans[plan] = {"acc": correct.count("1") / sum(c != "-" for c in correct), "correct": correct}
    return d


def test_gap_interval_resamples_the_reported_images_paired():
    forced = [p for p in calibrate.PLANS if p != "naive"]
    # auto is the best plan on every image: every resample's gap is 0.
    same = _with_correct("same", {p: "1" * 90 + "0" * 10 for p in forced})
    i = calibrate.gap_interval(same, forced[0])
    assert (i.low, i.high, i.within_1pt, i.images) == (0.0, 0.0, 1.0, 100)
    # Another plan is right on 20 more images: the gap is -20 points, and resampling moves it a few points only.
    worse = _with_correct("worse", {**{p: "1" * 60 + "0" * 40 for p in forced}, forced[1]: "1" * 80 + "0" * 20})
    i = calibrate.gap_interval(worse, forced[0])
    assert -30 < i.low < -20 < i.high < -10 and i.within_1pt == 0.0
    # A plan right on two more images out of 100: the observed gap (-2) is within test-set noise of -1.
    close = _with_correct("close", {**{p: "10" * 50 for p in forced}, forced[2]: "1111" + "10" * 48})
    i = calibrate.gap_interval(close, forced[0])
    assert i.low <= -2.0 and i.high == 0.0 and 0.2 < i.within_1pt < 0.9
    # Unreadable images ("-") are left out for every plan; missing per-image results give no interval.
    holes = _with_correct("holes", {p: "-1" + "1" * 8 for p in forced})
    assert calibrate.gap_interval(holes, forced[0]).images == 9
    del same.plans[forced[3]]["correct"]
    assert calibrate.gap_interval(same, forced[0]) is None


def test_the_noise_floor_is_the_bootstrap_of_the_best_forced_plan_as_if_auto_had_picked_it():
    forced = [p for p in calibrate.PLANS if p != "naive"]
    similarity = {"score": 0.5, "components": {"probe": 0.5}, "best_stage": "stage3", "best_earlier_stage": "stage3",
                  "probes": []}
    clear = _with_correct("clear", {**{p: "1" * 60 + "0" * 40 for p in forced}, forced[1]: "1" * 80 + "0" * 20})
    # the best plan is right on 52 images, another on 50 mostly different ones: resamples often rank them the other way
    close = _with_correct("close", {**{p: "0" * 100 for p in forced}, forced[2]: "1" * 52 + "0" * 48,
                                    forced[3]: "0" * 48 + "1" * 50 + "00"})
    for d in (clear, close):
        d.similarity = similarity
    rows = calibrate.leave_one_out(calibrate.Rule(calibrate.no_pilot), [clear, close])
    by = _by_name(rows)
    assert by["clear"].oracle.within_1pt == 1.0  # 20 points ahead: the best stays best in every resample
    assert 0.2 < by["close"].oracle.within_1pt < 0.9  # 2 images ahead: often not, whoever picks it
    text = calibrate.markdown(rows, calibrate.fit(calibrate.Rule(calibrate.no_pilot), [clear, close]), [],
                              calibrate.load_thresholds())
    floor = by["close"].oracle.within_1pt
    assert f"on {1 + floor:.1f}/2 datasets on average, and on all of them in {floor:.0%}" in text


def test_seed_spread_compares_runs_that_differ_only_in_the_seed(tmp_path, capsys):
    spread = _load_bench("seed_spread")
    best = {name: d[3] for name, d in DATASETS.items()}
    one, two = tmp_path / "seed0.jsonl", tmp_path / "seed1.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in _rows(best)))
    # In the second run D's best scenario changes (large-different wins there); D is missing from a third run.
    two.write_text("".join(json.dumps(r) + "\n" for r in _rows({**best, "D": "large-different"})))
    rows = {r.dataset: r for r in spread.spreads([calibrate.read_results(one), calibrate.read_results(two)])}
    assert set(rows) == set(DATASETS)
    d = rows["D"]
    assert [d.best(0), d.best(1)] == ["small-different", "large-different"]
    # Each run's best, scored in the other run: 0.9 against what that scenario got there.
    lower = {p: (0.5 - 0.1 * calibrate.PLANS.index(p)) for p in calibrate.PLANS}
    assert d.cross_gaps() == pytest.approx([(lower["small-different"] - 0.9) * 100,
                                            (lower["large-different"] - 0.9) * 100])
    assert rows["A"].cross_gaps() == [0.0, 0.0] and rows["A"].plan_moves() == [0.0] * 4
    # Auto is calibrate.py's rule with the shipped thresholds, run by run; its mean-accuracy gap uses both runs.
    rule = calibrate.Rule(calibrate.default_candidates())
    autos = [rule.pick(calibrate.read_results(p)["D"], calibrate.load_thresholds()).auto for p in (one, two)]
    assert d.autos == autos
    mean_auto = (d.accs[autos[0]][0] + d.accs[autos[1]][1]) / 2
    assert d.mean_gap() == pytest.approx((mean_auto - max(sum(v) / 2 for v in d.accs.values())) * 100)
    three = tmp_path / "seed2.jsonl"
    three.write_text("".join(json.dumps(r) + "\n" for r in _rows(best) if r["dataset"] != "D"))
    assert spread.main([str(one), str(two), str(three)]) == 0
    out = capsys.readouterr().out
    assert "| D |" not in out and "3 runs: seed0, seed1, seed2" in out
    assert "The best forced scenario is the same in every run on 3/3 datasets" in out
    with pytest.raises(SystemExit, match="at least two runs"):
        spread.main([str(one)])

"""`finetune plan` and the plan in `finetune train`, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from finetune.model.artifact import load_model
from finetune.cli import cli
from finetune.strategy.decide import load_thresholds
from tests.conftest import TINY_MODEL, tiny_train_args


def _plan_args(data: Path, weights: Path, *extra: str) -> list[str]:
    return ["plan", str(data), "--model", TINY_MODEL, "--weights", str(weights), "--image-size", "32",
            "--num-workers", "0", "--batch-size", "4", *extra]


def test_plan_json_and_report(image_folder: Path, weights_file: Path):
    runner = CliRunner()
    result = runner.invoke(cli, _plan_args(image_folder, weights_file, "--json"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # 12 training images: little data, so the two linear heads are piloted, the measured small-* cell first.
    pilot = out["pilot"]
    cell = pilot["candidates"][0]
    assert sorted(pilot["candidates"]) == ["small-different", "small-similar"] and cell in pilot["candidates"]
    assert set(pilot["scores"]) == set(pilot["candidates"]) and pilot["seconds"] > 0
    best = max(pilot["scores"][c]["select_acc"] for c in pilot["candidates"])
    # The better head goes on only where it is good enough; else the network is fine-tuned (decide.settle_pilot).
    linear = best >= load_thresholds().linear_min_select_acc
    assert out["scenario"] == pilot["winner"]
    if linear:
        assert pilot["scores"][pilot["winner"]]["select_acc"] == best and ">=" in pilot["choice"]
    else:
        assert pilot["winner"] == "large-" + cell.split("-")[1] and "fine-tuned" in pilot["choice"]
        assert pilot["unresolved"] == {}
    assert out["plan"]["source"] == "pilot" and out["plan"]["reasons"][0].startswith("pilot")
    assert pilot["choice"] in out["plan"]["reasons"][0]
    assert out["timings"]["pilot_s"] == pilot["seconds"]
    # A handful of selection images cannot separate two heads (4 disagreements all one way are the fewest
    # that can): where a head goes on, the plan says the choice between them is within their noise.
    assert pilot["select_images"] <= 3
    assert all(w + o <= pilot["select_images"] for w, o in pilot["unresolved"].values())
    assert ("cannot separate" in out["plan"]["reasons"][0]) == bool(pilot["unresolved"])
    assert out["plan"]["scenario"] == out["scenario"] and out["plan"]["reasons"]
    assert out["profile"]["n_train"] == 12 and out["profile"]["n_classes"] == 2
    sim = out["similarity"]
    assert 0.0 <= sim["score"] <= 1.0
    assert {"probe", "depth", "source_confidence", "bn_match"} <= set(sim["components"])
    assert [p["key"] for p in sim["probes"]][-1] == "final"
    assert [g["name"] for g in out["layer_groups"]][-1] == "fc"
    assert out["timings"]["features_cached"] is False

    report = runner.invoke(cli, _plan_args(image_folder, weights_file))
    assert report.exit_code == 0, report.output
    for heading in ("Dataset profile", "Domain similarity", f"Scenario  {out['scenario']}", "Pilot", "<- goes on",
                    pilot["choice"][:40], "Layer groups"):
        assert heading in report.output
    # The second run read the features from the cache.
    again = runner.invoke(cli, _plan_args(image_folder, weights_file, "--json"))
    assert json.loads(again.stdout)["timings"]["features_cached"] is True


def test_source_components_are_measured_at_the_weights_input_size(image_folder: Path, weights_file: Path):
    """probe and depth at the training size; source_confidence and bn_match at the weights' own (test_resnet:
    160 px), so they do not move with --image-size, and the plan says so when the sizes differ."""
    runner = CliRunner()
    small, native = (json.loads(runner.invoke(cli, _plan_args(image_folder, weights_file, "--json",
                                                               "--image-size", size)).stdout) for size in ("32", "160"))
    for key in ("source_confidence", "bn_match"):
        assert small["similarity"]["components"][key] == native["similarity"]["components"][key]
    assert small["similarity"]["details"]["image_size"] == 32
    assert small["similarity"]["details"]["source_image_size"] == native["similarity"]["details"]["image_size"] == 160
    assert any("measured at 32 px" in r and "at 160 px" in r for r in small["plan"]["reasons"])
    assert not any("pretraining size" in r for r in native["plan"]["reasons"])


def test_plan_forced_scenario_and_overrides(image_folder: Path, weights_file: Path):
    runner = CliRunner()
    result = runner.invoke(cli, _plan_args(image_folder, weights_file, "--json", "--scenario", "large-similar",
                                           "--freeze-groups", "3", "--backbone-lr-mult", "0.2"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["scenario"] == "large-similar" and out["plan"]["source"] == "forced"
    assert [g["frozen"] for g in out["groups"]] == [True, True, True, False, False, False]
    assert out["groups"][-2]["lr"] == pytest.approx(1e-3 * 0.2)

    bad = runner.invoke(cli, _plan_args(image_folder, weights_file, "--scenario", "small-similar",
                                        "--freeze-groups", "1"))
    assert bad.exit_code == 2 and "--freeze-groups applies to fine-tuning plans" in bad.output


@pytest.mark.parametrize("scenario", ["small-similar", "small-different", "large-similar"])
def test_train_runs_the_plan_and_reports_it(image_folder: Path, weights_file: Path, tmp_path: Path,
                                            isolated_mlflow: str, scenario: str):
    out = tmp_path / "out"
    args = tiny_train_args(image_folder, out, "--scenario", scenario)
    args[args.index("--weights") + 1] = str(weights_file)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == scenario and summary["plan"]["scenario"] == scenario
    assert summary["plan"]["reasons"] and "similarity" in summary and "profile" in summary
    net, spec = load_model(out / "model")
    assert spec.scenario == scenario
    head_stage = summary["plan"]["head_stage"]
    assert spec.head_stage == (None if head_stage == "final" else int(head_stage.removeprefix("stage")))
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    if scenario.startswith("small"):
        assert summary["plan"]["weight_decay"] in summary["plan"]["weight_decay_grid"]
    else:
        assert "warmup" in summary["plan"]
        groups = summary["plan"]["groups"]
        assert not any(g["frozen"] for g in groups)  # a lot of data: every group fine-tunes ...
        lrs = [g["lr"] for g in groups]
        assert lrs == sorted(lrs) and lrs[0] < lrs[-1]  # ... the lower ones more slowly

    run = MlflowClient(isolated_mlflow).get_run(summary["mlflow_run_id"])
    assert run.data.params["scenario"] == scenario
    assert "similarity.score" in run.data.params and "profile.n_train" in run.data.params
    assert "plan.json" in {a.path for a in MlflowClient(isolated_mlflow).list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("command", ["plan", "audit", "sanity", "lr-find"])
def test_options_only_train_acts_on_are_refused_elsewhere(tmp_path: Path, command: str):
    from click.testing import CliRunner

    from finetune.cli import cli

    result = CliRunner().invoke(cli, [command, str(tmp_path), "--model", "test_resnet", "--tta", "10crop"])
    assert result.exit_code == 2 and "No such option '--tta'" in result.output
    assert "--tta" not in CliRunner().invoke(cli, [command, "--help"]).output  # not offered either
    # A config file serves every command: there the key is left out, not used.
    from finetune.config import resolve_config

    assert resolve_config({"tta": "10crop"}, {"data_dir": str(tmp_path)}, command).tta == "auto"

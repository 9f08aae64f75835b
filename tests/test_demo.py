"""`finetune demo` runs offline end to end: generated data, pretraining, then the target task fine-tuned
from the saved file and from scratch, side by side.

The accuracy margin is a measurement (README), not asserted here: at one epoch it means nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from click.testing import CliRunner

from finetune.cli import cli
from finetune.demo import PLAIN_RECIPE, TARGET_CLASSES, demo_configs, make_image_folder
from finetune.training.recipe import check_feature_plan_options, resolve_recipe


def test_the_two_target_runs_differ_only_in_their_weights_and_plain_recipe_options(tmp_path: Path):
    pretrain, tuned, scratch = demo_configs(tmp_path, "test_resnet", None, epochs=7, pretrain_epochs=3,
                                            seed=5)
    assert pretrain is not None and pretrain.weights == "none" and pretrain.epochs == 3
    assert tuned.weights == str(tmp_path / "weights" / "test_resnet.demo.safetensors")
    assert scratch.weights == "none"
    differ = {f.name for f in dataclasses.fields(tuned) if getattr(tuned, f.name) != getattr(scratch, f.name)}
    # The from-scratch network is given the plain recipe; the fine-tuned run's feature plan has it already
    # (and refuses the options that do not act on a linear head): the resolved recipes are the same.
    assert differ == {"weights", "output", "run_name", *PLAIN_RECIPE}
    assert resolve_recipe(tuned, "small-different") == resolve_recipe(scratch, "large-different")
    check_feature_plan_options(tuned, "small-different")  # the measured plan of the fine-tuned run: accepted
    assert tuned.epochs == 7 and tuned.seed == 5 and tuned.data_dir == str(tmp_path / "target")


def test_generated_tasks_are_seeded(tmp_path: Path):
    a = make_image_folder(tmp_path / "a", "target", 2, seed=0)
    b = make_image_folder(tmp_path / "b", "target", 2, seed=0)
    c = make_image_folder(tmp_path / "c", "target", 2, seed=1)
    name = "circle/circle_001.jpg"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == sorted(TARGET_CLASSES)


def test_demo_compares_finetuned_and_from_scratch_runs(tmp_path: Path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(workdir), "--epochs", "1", "--pretrain-epochs", "1",
                                      "--seed", "3"])
    assert result.exit_code == 0, result.output
    weights = workdir / "weights" / "test_resnet.demo.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()

    runs = {}
    (stamp,) = list((workdir / "runs").iterdir())  # this demo's runs, in a folder of their own
    for name in ("finetuned", "scratch"):
        summary = json.loads((stamp / name / "summary.json").read_text())
        spec = json.loads(Path(summary["model_dir"], "model.json").read_text())
        assert spec["class_names"] == list(TARGET_CLASSES)
        runs[name] = (summary, spec)
    (tuned, tuned_spec), (scratch, scratch_spec) = runs["finetuned"], runs["scratch"]
    assert tuned_spec["weights_source"] == f"file:{weights}"
    assert scratch_spec["weights_source"] == "none"
    assert tuned["data"] == scratch["data"]  # same images, same split
    assert tuned["data"]["layout"] == "split-folders" and tuned["data"]["train"] == 72 and tuned["data"]["val"] == 180
    assert scratch["scenario"] == "large-different" and not scratch["plan"]["train_on_features"]
    # 72 training images: little data, so the linear heads are piloted (and a head goes on only where it is good).
    assert tuned["plan"]["source"] == "pilot" and tuned["scenario"] in tuned["plan"]["reasons"][0]

    # The side-by-side table: a header and one row per run, with its weights, plan and numbers.
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run ") and "val acc" in line)
    assert "wall time" in lines[header] and "scenario: plan" in lines[header]
    rows = lines[header + 2:header + 4]
    assert rows[0].startswith("fine-tuned") and f"file:{weights.name}" in rows[0]
    assert tuned["scenario"] in rows[0] and f"{tuned['metrics']['val_acc']:.2f}" in rows[0]
    assert rows[1].startswith("from scratch") and "none (random init)" in rows[1]
    assert "large-different" in rows[1] and f"{scratch['metrics']['val_acc']:.2f}" in rows[1]
    assert "mlflow ui" in result.output

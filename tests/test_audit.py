"""`finetune audit` and `--exclude` on tiny generated folders (TINY_MODEL, a 'pretrained' weights file)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from finetune.cli import cli
from finetune.config import TrainConfig
from finetune.data.folders import read_exclude_list, scan_folder
from finetune.strategy import audit as audit_mod
from finetune.strategy.audit import AuditTable, similar_pairs
from finetune.workflows.audit import audit_folder
from tests.conftest import TINY_MODEL, tiny_train_args

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def textured(path: Path, colour: tuple[int, int, int], rng: random.Random, size: int = 40) -> Path:
    """A class colour under a random coarse pattern: the class shows, and no two images look alike."""
    grid = np.array([[rng.uniform(0.4, 1.0) for _ in range(5)] for _ in range(5)])
    pattern = np.kron(grid, np.ones((size // 5, size // 5)))[..., None]
    pixels = np.clip(pattern * np.array(colour)[None, None, :], 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_textured(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    for name, n in per_class.items():
        for i in range(n):
            textured(root / name / f"{name}_{i}.png", COLOURS[name], rng)
    return root


def audit_config(data: Path, weights: Path, out: Path, **extra) -> TrainConfig:
    return TrainConfig(data_dir=str(data), model=TINY_MODEL, weights=str(weights), image_size=32, batch_size=8,
                       num_workers=0, output=str(out), **extra)


def test_a_flipped_label_is_ranked_first(tmp_path: Path, weights_file: Path):
    data = make_textured(tmp_path / "data", {"red": 10, "green": 10, "blue": 10})
    flipped = data / "blue" / "red_3.png"
    shutil.move(data / "red" / "red_3.png", flipped)  # a red image filed as blue
    result = audit_folder(audit_config(data, weights_file, tmp_path / "out", val_fraction=0.1))
    assert result["label_issues"], result["notes"]
    top = result["label_issues"][0]
    assert Path(top["path"]).resolve() == flipped.resolve()
    assert (top["given"], top["suggested"]) == ("blue", "red")
    assert top["score"] < 0.5
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["label_issues"][0]["path"] == top["path"]
    assert (tmp_path / "out" / "label_issues.png").stat().st_size > 0


def test_a_copy_across_splits_is_leakage(tmp_path: Path, weights_file: Path):
    data = tmp_path / "data"
    make_textured(data / "train", {"red": 8, "green": 8})
    make_textured(data / "val", {"red": 3, "green": 3}, seed=1)
    original = data / "train" / "green" / "green_2.png"
    img = Image.open(original)
    copy = data / "val" / "green" / "copy.jpg"  # re-encoded, resized and slightly cropped
    img.resize((36, 36)).crop((1, 1, 35, 35)).save(copy, quality=85)
    result = audit_folder(audit_config(data, weights_file, tmp_path / "out"))
    leakage = [p for p in result["duplicates"] if p["kind"] == "leakage"]
    assert leakage, result["duplicates"][:5]
    first = leakage[0]
    assert {Path(first["a"]).name, Path(first["b"]).name} == {"green_2.png", "copy.jpg"}
    assert (first["a_split"], first["b_split"]) == ("train", "val")
    assert first["match"] == "near"


def test_an_identical_file_is_an_exact_duplicate(tmp_path: Path, weights_file: Path):
    data = make_textured(tmp_path / "data", {"red": 6, "green": 6})
    shutil.copyfile(data / "red" / "red_0.png", data / "green" / "dup.png")  # same bytes, other class
    result = audit_folder(audit_config(data, weights_file, tmp_path / "out"))
    exact = [p for p in result["duplicates"] if p["match"] == "exact"]
    assert len(exact) == 1 and exact[0]["similarity"] == 1.0
    assert {Path(exact[0]["a"]).name, Path(exact[0]["b"]).name} == {"red_0.png", "dup.png"}
    assert exact[0]["kind"] in ("conflicting", "leakage")  # which split each lands in is the split's choice


def test_one_class_says_what_it_cannot_do(tmp_path: Path, weights_file: Path):
    data = make_textured(tmp_path / "data", {"red": 6})
    result = audit_folder(audit_config(data, weights_file, tmp_path / "out"))
    assert result["label_issues"] == []
    assert any("One class" in n for n in result["notes"])
    assert (tmp_path / "out" / "audit.json").is_file()


def test_classes_of_one_or_two_images_are_skipped_with_a_note(tmp_path: Path, weights_file: Path):
    data = make_textured(tmp_path / "data", {"red": 8, "green": 2, "blue": 1})
    result = audit_folder(audit_config(data, weights_file, tmp_path / "out"))
    note = next(n for n in result["notes"] if "too few to cross-validate" in n)
    assert "green" in note and "blue" in note
    assert any("Fewer than 2 classes" in n for n in result["notes"])  # only red is left to cross-validate
    assert result["profile"]["per_class_min"] == 1


def test_the_cli_prints_the_summary_and_writes_audit_json(tmp_path: Path, weights_file: Path):
    data = make_textured(tmp_path / "data", {"red": 6, "green": 6})
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["audit", str(data), "--model", TINY_MODEL, "--weights", str(weights_file),
                                   "--image-size", "32", "--batch-size", "8", "--num-workers", "0",
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    for line in ("Label issues:", "Duplicates, leakage:", "Duplicates, conflicting:", "Outliers:", "audit.json"):
        assert line in res.output
    report = json.loads((out / "audit.json").read_text())
    assert set(report["counts"]) >= {"label_issues", "leakage", "conflicting", "redundant", "outliers"}
    assert report["thresholds"]["near_duplicate_cosine"] == audit_mod.NEAR_DUPLICATE_COSINE
    assert {p.name for p in out.glob("*.png")} == {"label_issues.png", "duplicates.png", "outliers.png"}


def test_similar_pairs_in_chunks_match_the_full_matrix(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(0)
    x = audit_mod.normalized(rng.normal(size=(50, 8)) + 2.0)
    full = x @ x.T
    expected = {(i, j) for i in range(50) for j in range(i + 1, 50) if full[i, j] >= 0.9}
    monkeypatch.setattr(audit_mod, "CHUNK_ELEMENTS", 50 * 7)  # 7 rows at a time
    pairs, total = similar_pairs(x, 0.9)
    assert {(i, j) for i, j, _ in pairs} == expected and total == len(expected)
    few, total = similar_pairs(x, 0.9, limit=5)
    assert total == len(expected) and [s for *_, s in few] == sorted((full[i, j] for i, j in expected), reverse=True)[:5]


def test_outliers_are_far_from_every_class():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(20, 16)) * 0.1 + np.eye(16)[0], rng.normal(size=(20, 16)) * 0.1 + np.eye(16)[1],
                        [np.eye(16)[5]]]).astype(np.float32)
    labels = np.array([0] * 20 + [1] * 20 + [0])
    table = AuditTable([f"img{i}" for i in range(41)], labels, ["train"] * 41, x, np.ones(41, bool), ["a", "b"])
    outliers, _ = audit_mod.find_outliers(table)
    assert [o.path for o in outliers] == ["img40"]


# --- --exclude -----------------------------------------------------------------------------------

def test_exclude_leaves_out_exactly_the_listed_files(tmp_path: Path):
    data = make_textured(tmp_path / "data", {"red": 6, "green": 6})
    listed = tmp_path / "exclude.txt"
    listed.write_text(f"# reviewed\n{data / 'red' / 'red_1.png'}\n\nred/red_2.png\n")  # absolute, and relative to DATA
    assert read_exclude_list(listed) == [str(data / "red" / "red_1.png"), "red/red_2.png"]
    splits = scan_folder(data, exclude=read_exclude_list(listed))
    everything = scan_folder(data)
    names = {Path(s.path).name for s in splits.train + splits.val}
    assert names == {Path(s.path).name for s in everything.train + everything.val} - {"red_1.png", "red_2.png"}
    assert len(splits.excluded) == 2


def test_an_unknown_path_in_the_exclude_list_is_one_clear_error(tmp_path: Path):
    data = make_textured(tmp_path / "data", {"red": 4, "green": 4})
    listed = tmp_path / "exclude.txt"
    listed.write_text("red/nope.png\n")
    res = CliRunner().invoke(cli, ["plan", str(data), "--model", TINY_MODEL, "--weights", "none",
                                   "--exclude", str(listed)])
    assert res.exit_code == 2
    assert "red/nope.png" in res.output and "not image files" in res.output
    assert res.exc_info is None or isinstance(res.exc_info[1], SystemExit)


def test_train_with_exclude_logs_the_list(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    data = make_textured(tmp_path / "data", {"red": 6, "green": 6})
    listed = tmp_path / "exclude.txt"
    listed.write_text("red/red_1.png\ngreen/green_4.png\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, tiny_train_args(data, out, "--exclude", str(listed)))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["excluded"] == 2
    assert summary["data"]["train"] + summary["data"]["val"] == 10
    text = Path(MlflowClient().download_artifacts(summary["mlflow_run_id"], "excluded.txt", str(tmp_path))).read_text()
    assert sorted(Path(line).name for line in text.split()) == ["green_4.png", "red_1.png"]


# --- the audit inside `train` and `plan` ---------------------------------------------------------

def _leaky_folder(root: Path) -> tuple[Path, Path]:
    """train/ and val/ folders, with an exact copy of a training image planted in val."""
    make_textured(root / "train", {"red": 8, "green": 8})
    make_textured(root / "val", {"red": 3, "green": 3}, seed=1)
    copy = root / "val" / "green" / "copy.png"
    shutil.copyfile(root / "train" / "green" / "green_2.png", copy)
    return root, copy


def _pretrained_train_args(data: Path, out: Path, weights: Path) -> list[str]:
    args = tiny_train_args(data, out, "--scenario", "small-similar")
    args[args.index("--weights") + 1] = str(weights)
    return args


@pytest.fixture
def exact_duplicates_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """TINY_MODEL's features put every val image near some training image: count exact copies only."""
    import functools

    from finetune.workflows import audit as audit_workflow

    monkeypatch.setattr(audit_workflow, "run_audit", functools.partial(audit_mod.run_audit, near_threshold=1.01))


def test_train_reports_val_accuracy_without_the_leaked_image(tmp_path: Path, weights_file: Path,
                                                             exact_duplicates_only: None):
    import torch
    from mlflow.tracking import MlflowClient

    from finetune.evaluation.tta import predict_sources
    from finetune.model.artifact import load_model

    data, copy = _leaky_folder(tmp_path / "data")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, _pretrained_train_args(data, out, weights_file))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["val_leaked_images"] == 1
    assert [Path(p).name for p in summary["audit"]["leaked"]["val"]] == ["copy.png"]
    assert summary["audit"]["counts"]["leakage_pairs"] >= 1
    # val_acc_no_leakage: the same model's predictions over the other 6 val images.
    net, spec = load_model(out / "model")
    others = sorted(p for p in (data / "val").rglob("*.png") if p != copy)
    with torch.no_grad():
        probs = predict_sources(net, [str(p) for p in others], spec.data_config, "center", 8)[0].numpy()
    labels = np.array([spec.class_names.index(p.parent.name) for p in others])
    assert m["val_acc_no_leakage"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert "Leakage:    1 val image(s)" in res.output and "val_acc_no_leakage" in res.output
    assert (out / "audit.json").is_file() and (out / "duplicates.png").is_file()
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert "audit.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"audit/duplicates.png", "audit/label_issues.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "audit")}
    assert run.data.params["audit.leakage_pairs"] == str(summary["audit"]["counts"]["leakage_pairs"])
    assert run.data.metrics["val_leaked_images"] == 1


def test_a_failing_audit_does_not_fail_training(tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch):
    from finetune.workflows import audit as audit_workflow

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(audit_workflow, "audit_splits", broken)
    data, _ = _leaky_folder(tmp_path / "data")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, _pretrained_train_args(data, out, weights_file))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert "planted failure" in summary["audit"]["skipped"]
    assert "val_acc_no_leakage" not in summary["metrics"] and "val_acc" in summary["metrics"]
    assert "Audit:      skipped" in res.output


def test_plan_shows_the_audit(tmp_path: Path, weights_file: Path):
    data, _ = _leaky_folder(tmp_path / "data")
    args = ["plan", str(data), "--model", TINY_MODEL, "--weights", str(weights_file), "--image-size", "32",
            "--batch-size", "4", "--num-workers", "0", "--scenario", "small-similar", "--output", str(tmp_path / "out")]
    res = CliRunner().invoke(cli, args + ["--json"])
    assert res.exit_code == 0, res.output
    audit = json.loads(res.stdout)["audit"]
    assert audit["counts"]["leakage"] >= 1 and (tmp_path / "out" / "audit.json").is_file()
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "Audit" in text.output and "Duplicates, leakage:" in text.output


def test_accuracy_without_leaked_images():
    from finetune.evaluation.evaluate import without_leaked

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [np.nan, np.nan]])
    labels = np.array([0, 0, 1, 1])
    result = without_leaked(probs, labels, ["a", "b", "c", "d"], {"b"})
    assert result == {"leaked_images": 1, "images": 2, "top1": 0.5}

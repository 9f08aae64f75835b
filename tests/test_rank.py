"""`finetune rank`: transferability scores where the right order is known, the latency budget, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.errors import UserError
from finetune.strategy.rank import Candidate, knn_accuracy, logme, rank
from finetune.workflows.rank import parse_candidates, table
from tests.conftest import make_folder


def features(separation: float, n_per_class: int = 40, classes: int = 3, dim: int = 32, seed: int = 0):
    """Features of `classes` Gaussian clusters whose centres lie `separation` apart (in units of the noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), dim)), y


def test_the_scores_order_features_by_how_well_they_separate_the_classes():
    separations = [0.0, 0.3, 1.0, 3.0]
    knn = [knn_accuracy(*features(s)) for s in separations]
    evidence = [logme(*features(s)) for s in separations]
    assert knn == sorted(knn) and knn[-1] == 1.0 and knn[0] < 0.55  # chance is 1/3
    assert evidence == sorted(evidence) and evidence[0] < evidence[-1]


def _logme_full(f: np.ndarray, y: np.ndarray, iterations: int = 11) -> float:
    """LogME with the full d x d eigendecomposition of F^T F, whatever the shape: the oracle of the thin path."""
    f = f.astype(np.float64)
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)
    out = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        alpha, beta, p = 1.0, 1.0, vh @ (f.T @ t)
        for _ in range(iterations):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (p * beta / (alpha + beta * s))
            a_de, b_de = (m * m).sum(), ((t - f @ m) ** 2).sum()
            na, nb = gamma / (a_de + 1e-5), (n - gamma) / (b_de + 1e-5)
            done = abs(na / nb - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = na, nb
            if done:
                break
        out.append((d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
                    - beta / 2 * b_de - alpha / 2 * a_de - n / 2 * np.log(2 * np.pi)) / n)
    return float(np.mean(out))


@pytest.mark.parametrize("per_class, dim", [(10, 200), (60, 40)])  # fewer images than channels, and more
def test_logme_on_fewer_images_than_channels_equals_the_full_eigendecomposition(per_class, dim):
    x, y = features(1.0, dim=dim, n_per_class=per_class)
    assert logme(x, y) == pytest.approx(_logme_full(x, y), rel=1e-6, abs=1e-6)


def test_knn_is_balanced_over_classes_and_leaves_each_image_out():
    x, y = features(3.0)
    # duplicating every image would make a nearest neighbour of each image itself, if it were not left out
    assert knn_accuracy(np.concatenate([x, x]), np.concatenate([y, y]), k=1) == 1.0
    noise, labels = features(0.0)
    labels = np.where(np.arange(len(labels)) < 10, 1, 0)  # 10 images of class 1, 110 of class 0
    assert knn_accuracy(noise, labels) <= 0.6  # predicting the majority everywhere scores 0.5, not 0.92


def candidate(name: str, knn: float, ms: float, logme_: float = 0.0) -> Candidate:
    return Candidate(name, "hub", 224, 1_000_000, knn, logme_, {"batch1": ms, "batch32": ms / 4}, 1.0)


def test_the_ranking_is_by_knn_with_the_latency_budget_and_the_front():
    ranked = rank([candidate("small", 0.80, 5.0), candidate("large", 0.90, 40.0), candidate("mid", 0.85, 50.0)])
    assert [c.name for c in ranked] == ["large", "mid", "small"]
    assert [c.pareto for c in ranked] == [True, False, True]  # mid: large is better and faster
    assert "best k-NN" in ranked[0].reasons[0] and "10.0 points below large" in ranked[2].reasons[0]
    budget = rank([candidate("small", 0.80, 5.0), candidate("large", 0.90, 40.0)], max_latency_ms=20.0)
    assert [c.name for c in budget] == ["small", "large"]  # the one over budget goes last, marked
    assert budget[1].excluded and "40.0 ms > --max-latency-ms 20" in budget[1].reasons[0]
    assert budget[0].pareto and not budget[1].pareto
    tie = rank([candidate("a", 0.9, 5.0, logme_=-1.0), candidate("b", 0.9, 5.0, logme_=-0.5)])
    assert [c.name for c in tie] == ["b", "a"]  # equal k-NN: LogME decides


def save_weights(folder: Path, arch: str, seed: int) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=10)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": arch, "num_classes": 10}))
    return path


def test_candidates_come_from_a_folder_a_list_or_names(tmp_path: Path):
    a = save_weights(tmp_path / "w", "test_resnet", 0)
    (tmp_path / "w" / "notes.txt").write_text("not weights")
    assert parse_candidates(str(tmp_path / "w")) == [("test_resnet", str(a))]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# candidates\ntest_vit\n{a}\ntest_convnext {a}  # a name and a file\n")
    assert parse_candidates(str(listing)) == [("test_vit", "hub"), ("test_resnet", str(a)), ("test_convnext", str(a))]
    assert parse_candidates("test_vit, test_resnet") == [("test_vit", "hub"), ("test_resnet", "hub")]
    with pytest.raises(UserError, match="no weights file with a sidecar"):
        parse_candidates(str(tmp_path))
    with pytest.raises(UserError, match="not a folder or file"):
        parse_candidates("missing/folder")


def test_rank_two_tiny_backbones_end_to_end_and_plan_reads_their_features(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=10)
    save_weights(tmp_path / "w", "test_resnet", 0)
    save_weights(tmp_path / "w", "test_efficientnet", 1)
    runner = CliRunner()
    args = ["rank", str(data), "--candidates", str(tmp_path / "w"), "--num-workers", "0", "--batch-size", "8"]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert sorted(c["name"] for c in out["candidates"]) == ["test_efficientnet", "test_resnet"]
    knn = [c["knn"] for c in out["candidates"]]
    assert knn == sorted(knn, reverse=True) and out["best"] == out["candidates"][0]["name"]
    for c in out["candidates"]:
        assert 0 <= c["knn"] <= 1 and c["params"] > 0 and c["latency_ms"]["batch1"] > 0 and c["latency_ms"]["batch32"] > 0
    assert out["train_images"] == 16  # train only: val is not read
    # the table: best first, the front marked, the command that trains the best
    text = table(out)
    assert text.index(out["candidates"][0]["name"]) < text.index(out["candidates"][1]["name"])
    assert f"Next: finetune train {data} --model {out['best']} --weights {out['best_weights']}" in text
    # `plan` with the best candidate reads the features rank cached
    best = runner.invoke(cli, ["plan", str(data), "--model", out["best"], "--weights", out["best_weights"],
                               "--scenario", "large-different", "--num-workers", "0", "--batch-size", "8", "--json"])
    assert best.exit_code == 0, best.output
    assert json.loads(best.stdout)["timings"]["features_cached"] is True
    # --image-size: every candidate measured at the size it would be trained at, and that cache entry read too
    sized = json.loads(runner.invoke(cli, [*args, "--image-size", "48", "--json"]).stdout)
    assert {c["image_size"] for c in sized["candidates"]} == {48}
    assert table(sized).endswith(f"--weights {sized['best_weights']} --image-size 48")
    best = runner.invoke(cli, ["plan", str(data), "--model", sized["best"], "--weights", sized["best_weights"],
                               "--image-size", "48", "--scenario", "large-different", "--num-workers", "0",
                               "--batch-size", "8", "--json"])
    assert json.loads(best.stdout)["timings"]["features_cached"] is True


def test_a_long_candidate_list_is_extracted_in_passes_bounded_by_parameters(tmp_path: Path, monkeypatch):
    import finetune.workflows.rank as workflow
    from finetune.config import TrainConfig

    data = make_folder(tmp_path / "data", per_class=6)
    save_weights(tmp_path / "w", "test_resnet", 0)
    save_weights(tmp_path / "w", "test_efficientnet", 1)
    passes = []
    real = workflow.train_features_many
    monkeypatch.setattr(workflow, "train_features_many",
                        lambda cfg, backbones, *a: passes.append(len(backbones)) or real(cfg, backbones, *a))
    cfg = TrainConfig(data_dir=str(data), batch_size=8, num_workers=0)
    results = []
    for bound, cache in ((10**9, "together"), (1, "apart")):  # 1 parameter: every candidate in its own pass
        monkeypatch.setattr(workflow, "JOINT_MAX_PARAMS", bound)
        monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / cache))
        results.append(workflow.rank_backbones(cfg, str(tmp_path / "w")))
    assert passes == [2, 1, 1]
    scores = [{c["name"]: (c["knn"], c["logme"]) for c in r["candidates"]} for r in results]
    assert scores[0] == scores[1] and results[0]["best"] == results[1]["best"]


def test_a_latency_budget_no_candidate_meets_is_a_clear_error(tmp_path: Path, monkeypatch):
    import finetune.workflows.rank as workflow

    data = make_folder(tmp_path / "data", per_class=4)
    monkeypatch.setattr(workflow, "create_backbone", lambda name, *a, **k: name)
    monkeypatch.setattr(workflow, "_params", lambda backbone: 1)
    monkeypatch.setattr(workflow, "_measure_group",
                        lambda cfg, group, splits, rt: [candidate(name, 0.9, 8.0) for name, _, _ in group])
    result = CliRunner().invoke(cli, ["rank", str(data), "--candidates", "test_resnet,test_vit",
                                      "--max-latency-ms", "5"])
    assert result.exit_code == 2 and "No candidate is within --max-latency-ms 5: the fastest takes 8.0 ms" in result.output
    kept = CliRunner().invoke(cli, ["rank", str(data), "--candidates", "test_resnet,test_vit", "--max-latency-ms", "9",
                                    "--json"])
    assert kept.exit_code == 0 and json.loads(kept.stdout)["best"] == "test_resnet"


def test_rank_needs_candidates(tmp_path: Path):
    data = make_folder(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(cli, ["rank", str(data)])
    assert result.exit_code == 2 and "needs --candidates" in result.output


@pytest.mark.slow
def test_train_with_model_auto_ranks_trains_the_best_and_logs_the_ranking(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    data = make_folder(tmp_path / "data", per_class=6)
    save_weights(tmp_path / "w", "test_resnet", 0)
    save_weights(tmp_path / "w", "test_efficientnet", 1)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", str(data), "--model", "auto", "--candidates", str(tmp_path / "w"),
                                      "--scenario", "small-similar", "--epochs", "1", "--batch-size", "4",
                                      "--num-workers", "0", "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    choice = summary["backbone_choice"]
    assert [c["name"] for c in choice["candidates"]][0] == choice["best"]
    config = json.loads((out / "config.json").read_text())  # what the run trained, and what --resume reads
    assert config["model"] == choice["best"] and config["weights"] == choice["best_weights"]
    spec = json.loads((Path(summary["model_dir"]) / "model.json").read_text())
    assert spec["architecture"] == choice["best"]
    logged = MlflowClient().download_artifacts(summary["mlflow_run_id"], "backbone_choice.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["best"] == choice["best"]


@pytest.mark.parametrize("args, message", [
    (["--model", "auto"], "--model auto chooses among --candidates"),
    (["--candidates", "test_resnet,test_vit"], "--candidates choose the backbone with --model auto"),
    (["--max-latency-ms", "5"], "--max-latency-ms choose the backbone with --model auto"),
])
def test_model_auto_and_its_options_come_together(tmp_path: Path, args, message):
    data = make_folder(tmp_path / "data", per_class=4)
    result = CliRunner().invoke(cli, ["train", str(data), "--weights", "none", *args])
    assert result.exit_code == 2 and message in result.output

"""GPU smoke tests (`make test-gpu`, `pytest -m gpu`): every plan, evaluation, batch prediction and the pyfunc model on CUDA.

Without CUDA every test here is skipped ("CUDA not available") at collection time, so they cost
nothing in `make test`. With CUDA each runs in seconds: a tiny timm net (`test_resnet`) "pretrained"
as a local weights file, on 16 generated 48-px images at 32 px. Nothing is forced onto the GPU:
`--accelerator auto` (the default) must pick it, and each test checks that the work allocated CUDA
memory (PyTorch's cumulative allocation counter grew), so a silent fallback to the CPU fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, make_folder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")]

SCENARIOS = ["small-similar", "small-different", "large-similar", "large-different"]


def cuda_allocations() -> int:
    """How many CUDA allocations this process has made so far (never decreases)."""
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0)


def train(data: Path, weights: Path, out: Path, scenario: str, *extra: str) -> dict:
    """`finetune train` in this process on the default accelerator; returns summary.json."""
    from click.testing import CliRunner

    from finetune.cli import cli

    result = CliRunner().invoke(cli, ["train", str(data), "--model", TINY_MODEL, "--weights", str(weights),
                                      "--scenario", scenario, "--epochs", "1", "--batch-size", "4",
                                      "--image-size", "32", "--num-workers", "0", "--output", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_train_each_plan_on_cuda(tmp_path: Path, weights_file: Path, scenario: str):
    data = make_folder(tmp_path / "data", per_class=8)
    before = cuda_allocations()
    summary = train(data, weights_file, tmp_path / "out", scenario)
    assert cuda_allocations() > before, "nothing was allocated on the GPU: did training fall back to the CPU?"

    assert summary["scenario"] == scenario and summary["plan"]["scenario"] == scenario
    assert 0.0 <= summary["metrics"]["val_acc"] <= 1.0
    assert summary["model_uri"]
    plan = summary["plan"]
    if scenario.startswith("small"):
        assert plan["train_on_features"] is True  # a head on cached features, no backbone forward per epoch
    else:
        assert plan["train_on_features"] is False and plan["head_warmup_epochs"] >= 1 and "warmup" in plan
        assert not all(g["frozen"] for g in plan["groups"])  # after the warm-up the backbone learns

    from finetune.model.artifact import load_model

    net, spec = load_model(Path(summary["model_dir"]))
    assert spec.scenario == scenario
    head_stage = plan["head_stage"]  # small-different: the best-probing stage (final when none beats it)
    assert spec.head_stage == (None if head_stage == "final" else int(head_stage.removeprefix("stage")))
    with torch.no_grad():
        assert net.cuda()(torch.randn(2, 3, 32, 32, device="cuda")).shape == (2, 2)


@pytest.fixture
def trained(tmp_path: Path, weights_file: Path) -> tuple[dict, Path]:
    """A model fine-tuned on the GPU (head warm-up, then every layer group) on split folders."""
    data = tmp_path / "split"
    for part, seed in (("train", 1), ("val", 2)):
        make_folder(data / part, per_class=8 if part == "train" else 4, seed=seed)
    return train(data, weights_file, tmp_path / "out", "large-similar"), data


def test_evaluate_10crop_on_cuda(tmp_path: Path, trained: tuple[dict, Path]):
    from click.testing import CliRunner

    from finetune.cli import cli

    summary, data = trained
    out = tmp_path / "eval"
    before = cuda_allocations()
    result = CliRunner().invoke(cli, ["evaluate", summary["model_uri"], str(data), "--tta", "10crop",
                                      "--num-workers", "0", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert cuda_allocations() > before, "evaluation did not run on the GPU"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert 0.0 <= evaluation["metrics"]["val_acc_tta"] <= 1.0
    report = json.loads((out / "evaluation" / "val" / "report.json").read_text())
    assert report["tta"] == "10crop" and report["images"] == 8
    assert sum(map(sum, report["confusion_matrix"])) == 8


def test_batch_prediction_on_cuda_matches_cpu(tmp_path: Path, trained: tuple[dict, Path]):
    import pandas as pd

    from serve.batch_predict import predict_to_file

    summary, _ = trained
    images = make_folder(tmp_path / "images", per_class=5, seed=7)
    files = sorted(str(p) for p in images.rglob("*.png"))
    frames = {}
    for tta in ("center", "10crop"):
        before = cuda_allocations()
        out = tmp_path / f"preds-{tta}.csv"
        counts = predict_to_file(summary["model_uri"], str(images), out, tta=tta, batch_size=4, num_workers=0,
                                 progress=False)
        assert cuda_allocations() > before, f"batch prediction ({tta}) did not run on the GPU"
        frame = pd.read_csv(out, keep_default_na=False)
        assert counts["predicted"] == len(files) == 10
        assert sorted(frame["path"]) == files  # one row per image
        assert (frame["error"] == "").all() and frame["label"].isin(summary["classes"]).all()
        assert frame["score"].between(0.0, 1.0).all()
        frames[tta] = frame.set_index("path")

    # The same model on the CPU gives the same scores (up to TF32 convolutions on the GPU).
    cpu_out = tmp_path / "preds-cpu.csv"
    predict_to_file(summary["model_uri"], str(images), cpu_out, tta="center", batch_size=4, num_workers=0,
                    accelerator="cpu", progress=False)
    cpu = pd.read_csv(cpu_out, keep_default_na=False).set_index("path")
    gpu = frames["center"].loc[cpu.index]
    for cls in summary["classes"]:
        gpu_p = gpu.apply(lambda r: r["score"] if r["label"] == cls else 1 - r["score"], axis=1)
        cpu_p = cpu.apply(lambda r: r["score"] if r["label"] == cls else 1 - r["score"], axis=1)
        assert gpu_p.tolist() == pytest.approx(cpu_p.tolist(), abs=2e-2)  # two classes: p(other) = 1 - score


def test_pyfunc_model_runs_on_cuda(tmp_path: Path, trained: tuple[dict, Path]):
    import mlflow
    import pandas as pd

    from finetune.model.artifact import load_model
    from finetune.data.images import load_rgb
    from finetune.data.crops import CropViews

    summary, _ = trained
    model = mlflow.pyfunc.load_model(summary["model_uri"])
    net = model.unwrap_python_model().net
    params = list(net.parameters())
    assert params and all(p.is_cuda for p in params), {str(p.device) for p in params}

    images = make_folder(tmp_path / "images", per_class=3, seed=5)
    files = sorted(str(p) for p in images.rglob("*.png"))
    before = cuda_allocations()
    predicted = model.predict(pd.DataFrame({"image": [Path(f).read_bytes() for f in files]}),
                              params={"tta": "10crop", "top_k": 2})
    assert cuda_allocations() > before
    assert len(predicted) == len(files) == 6
    assert predicted["label"].isin(summary["classes"]).all()
    assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-4) for p in predicted["probabilities"])

    # Same probabilities as the saved network run on the CPU by hand (centre crop).
    center = model.predict(pd.DataFrame({"image": [Path(f).read_bytes() for f in files]}),
                           params={"tta": "center"})
    cpu_net, spec = load_model(Path(summary["model_dir"]))
    with torch.no_grad():
        probs = cpu_net.cpu().eval()(torch.cat([CropViews(spec.data_config, "center")(load_rgb(f))
                                                for f in files])).softmax(1)
    for row, expected in zip(center["probabilities"], probs.tolist()):
        assert [row[c] for c in spec.class_names] == pytest.approx(expected, abs=2e-2)

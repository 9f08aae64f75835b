"""finetune export: ONNX files that match PyTorch for every plan kind, a broken export refused, int8
judged by its val accuracy, the registry tagged, and the install message without the extra."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from finetune.cli import cli
from finetune.errors import UserError
from finetune.model import onnx as onnx_export
from finetune.tracking.pyfunc import load_logged_model
from finetune import tracking
from finetune.model.artifact import ModelSpec, build_network
from finetune.model.heads import StageClassifier
from finetune.model.outputs import LogitsAndFeatures
from finetune.tracking import registry
from finetune.workflows.resume import DATA_TAG
from tests.conftest import TINY_MODEL, make_folder, tiny_train_args
from tests.model_helpers import DATA_CONFIG, logged_model

pytest.importorskip("onnxruntime", reason="the onnx extra (uv sync --extra onnx)")


def train(tmp_path: Path, scenario: str, *extra: str) -> dict:
    data = make_folder(tmp_path / "data", classes=("red", "blue", "green"), per_class=6)
    out = tmp_path / f"run-{scenario}"
    result = CliRunner().invoke(cli, tiny_train_args(data, out, "--scenario", scenario, "--tta", "center", *extra))
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def logged_with_data(tmp_path: Path, register: str | None = None) -> tuple[str, str]:
    """A logged (untrained) model whose run records a data folder of its classes, as train's runs do."""
    import mlflow

    data = make_folder(tmp_path / "data", classes=("cat", "dog"), per_class=10)
    uri = logged_model(tmp_path)
    run_id = mlflow.models.get_model_info(uri).run_id
    tracking.client().set_tag(run_id, DATA_TAG, str(data))
    if register:
        registry.register(uri, register, {})
    return uri, run_id


def generated_images(spec, n: int = 12, seed: int = 0) -> torch.Tensor:
    """Normalised inputs of the model's size, spread like real preprocessed pixels."""
    torch.manual_seed(seed)
    return torch.randn(n, *spec.data_config["input_size"]).clamp(-2.5, 2.5)


def check_export(net, spec, tmp_path: Path) -> None:
    path = onnx_export.export_onnx(net, spec, tmp_path / "model.onnx")
    runner = onnx_export.OnnxRunner(path, threads=1)
    images = generated_images(spec)
    report = onnx_export.verify(net, runner, images)
    assert report["passed"] and report["labels_identical"] and report["max_abs_prob_diff"] <= 1e-3
    logits, features = runner(images[:5])  # dynamic batch: 5, not the traced 2
    ref_logits, ref_features = LogitsAndFeatures(net.eval())(images[:5])
    assert logits.shape == ref_logits.shape and features.shape == ref_features.shape
    assert onnx_export.read_spec(path).class_names == spec.class_names
    assert json.loads(runner.metadata["preprocessing"]) == json.loads(json.dumps(spec.data_config))


@pytest.mark.parametrize("scenario", ["small-similar", "large-similar"])
def test_a_trained_feature_head_and_fine_tuned_network_export_like_pytorch(tmp_path, scenario):
    """small-similar: a linear head on the final features; large-similar: the fine-tuned network."""
    summary = train(tmp_path, scenario)
    assert summary["scenario"] == scenario
    model = load_logged_model(summary["model_uri"])
    check_export(model.net, model.spec, tmp_path)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_head_on_an_earlier_stage_exports_like_pytorch(tmp_path, stage):
    """The small-different plans' network; built directly, as which stage wins is measured on real data."""
    torch.manual_seed(stage)
    spec = ModelSpec(architecture=TINY_MODEL, num_classes=3, class_names=["a", "b", "c"],
                     data_config=DATA_CONFIG, scenario="small-different", head_stage=stage)
    net = build_network(spec).eval()
    assert isinstance(net, StageClassifier)
    check_export(net, spec, tmp_path)


@pytest.mark.parametrize("architecture, create_kwargs", [("test_vit", {}), ("test_efficientnet", {"pad_type": "same"})])
def test_other_architectures_export_like_pytorch(tmp_path, architecture, create_kwargs):
    """A transformer (attention, no fused kernel in the graph) and TF-style same padding (fixed in the graph)."""
    torch.manual_seed(0)
    size = 160 if architecture == "test_vit" else 48  # the ViT at its own size: no position-embedding resampling
    spec = ModelSpec(architecture=architecture, num_classes=3, class_names=["a", "b", "c"], create_kwargs=create_kwargs,
                     data_config={**DATA_CONFIG, "input_size": [3, size, size]})
    check_export(build_network(spec).eval(), spec, tmp_path)
    if create_kwargs:
        onnx = pytest.importorskip("onnx")
        ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
        assert "Pad" in ops and not ops & {"Shape", "Ceil"}  # padding as constants, no shape maths


def test_an_operator_onnx_lacks_is_a_clear_error(tmp_path):
    """A ViT fed another size resamples its position embeddings with antialiased bicubic: not in ONNX."""
    spec = ModelSpec(architecture="test_vit", num_classes=2, class_names=["a", "b"],
                     create_kwargs={"dynamic_img_size": True}, data_config={**DATA_CONFIG, "input_size": [3, 64, 64]})
    with pytest.raises(UserError, match=r"test_vit at input size .* cannot be exported to ONNX opset 17: .*upsample"):
        onnx_export.export_onnx(build_network(spec), spec, tmp_path / "model.onnx")


def test_a_broken_export_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    torch.manual_seed(0)
    spec = ModelSpec(architecture=TINY_MODEL, num_classes=3, class_names=["a", "b", "c"], data_config=DATA_CONFIG)
    net = build_network(spec).eval()
    path = onnx_export.export_onnx(net, spec, tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    # The classifier's weight (the last Gemm's) reversed and scaled: the graph runs but says something else.
    gemm = [n for n in graph.graph.node if n.op_type == "Gemm"][-1]
    weight = next(t for t in graph.graph.initializer if t.name == gemm.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight)[::-1].copy() * 5, weight.name))
    onnx.save(graph, str(path))
    with pytest.raises(UserError, match=r"does not match PyTorch on 24 images: \d+ label\(s\) differ, max \|Δprob\|"):
        onnx_export.verify(net, onnx_export.OnnxRunner(path), generated_images(spec, 24))


def test_export_command_checks_logs_quantizes_and_tags_the_registered_version(tmp_path):
    _, run_id = logged_with_data(tmp_path, register="pets")
    result = CliRunner().invoke(cli, ["export", "models:/pets@champion", "--quantize", "int8", "--register",
                                      "--max-loss", "100", "--output", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    assert "onnx fp32: labels identical" in result.output and "onnx int8: val acc" in result.output
    report = json.loads((tmp_path / "export" / "onnx" / "export.json").read_text())
    assert report["fp32"]["passed"] and report["int8"]["accepted"]
    assert report["int8"]["calibration_images"] == 16 and report["int8"]["val_images"] == 4
    c = tracking.client()
    assert {f.path for f in c.list_artifacts(run_id, "onnx")} == {"onnx/model.onnx", "onnx/model.int8.onnx",
                                                                  "onnx/export.json"}
    tags = c.get_model_version("pets", "1").tags
    assert tags["onnx"] == f"runs:/{run_id}/onnx/model.onnx"
    assert tags["onnx_int8"] == f"runs:/{run_id}/onnx/model.int8.onnx"
    # The ONNX pyfunc model: a linked version (tags both ways), aliases left on the trained model's version.
    assert sorted(int(v.version) for v in c.search_model_versions("name = 'pets'")) == [1, 2]
    assert tags["onnx_version"] == "2"
    linked = c.get_model_version("pets", "2").tags
    assert linked["format"] == "onnx" and linked["source_version"] == "1"
    assert c.get_registered_model("pets").aliases == {"candidate": 1, "champion": 1}
    assert "registered ONNX: models:/pets/2" in result.output
    int8 = onnx_export.OnnxRunner(tmp_path / "export" / "onnx" / "model.int8.onnx")
    assert int8.metadata["quantization"].startswith("int8") and json.loads(int8.metadata["class_names"]) == ["cat", "dog"]


def test_int8_losing_more_than_max_loss_is_refused_and_not_registered(tmp_path, monkeypatch):
    from finetune.workflows import export as workflow

    uri, run_id = logged_with_data(tmp_path, register="pets")
    tracking.client().set_model_version_tag("pets", "1", "onnx_int8", "runs:/earlier/onnx/model.int8.onnx")
    real = workflow.val_accuracy
    calls = []

    def int8_worse(runner, *args):  # the int8 model's accuracy 5 points below the fp32 one's
        acc, pred = real(runner, *args)
        calls.append(runner.path.name)
        return (acc - 0.05 if runner.path.name == workflow.INT8_FILE else acc), pred

    monkeypatch.setattr(workflow, "val_accuracy", int8_worse)
    result = CliRunner().invoke(cli, ["export", uri, "--quantize", "int8", "--register",
                                      "--output", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    assert calls == ["model.onnx", "model.int8.onnx"]
    assert "int8 refused: it loses 5.00 accuracy points on val" in result.output
    assert "more than --max-loss 1; not logged or registered" in result.output
    tags = tracking.client().get_model_version("pets", "1").tags
    assert "onnx" in tags and "onnx_int8" not in tags
    assert "onnx/model.int8.onnx" not in {f.path for f in tracking.client().list_artifacts(run_id, "onnx")}


def test_export_needs_real_images(tmp_path):
    uri = logged_model(tmp_path)  # its run records no data folder
    result = CliRunner().invoke(cli, ["export", uri])
    assert result.exit_code == 2
    assert "checked on real images, but the run records no data folder: pass --data DIR" in result.output
    result = CliRunner().invoke(cli, ["export", uri, "--data", str(tmp_path / "gone")])
    assert result.exit_code == 2 and "gone" in result.output


def test_register_needs_a_registered_version(tmp_path):
    uri, _ = logged_with_data(tmp_path)
    result = CliRunner().invoke(cli, ["export", uri, "--register"])
    assert result.exit_code == 2 and "has no registered version to tag" in result.output


def test_register_name_registers_the_onnx_model_of_an_unregistered_run(tmp_path):
    uri, run_id = logged_with_data(tmp_path)
    result = CliRunner().invoke(cli, ["export", uri, "--register", "pets-onnx", "--output", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    version = tracking.client().get_model_version("pets-onnx", "1")
    assert version.run_id == run_id and version.tags["format"] == "onnx"
    assert "registered ONNX: models:/pets-onnx/1" in result.output and "tagged:" not in result.output


def test_register_name_must_be_the_registered_model_of_the_source(tmp_path):
    logged_with_data(tmp_path, register="pets")
    result = CliRunner().invoke(cli, ["export", "models:/pets/1", "--register", "other"])
    assert result.exit_code == 2 and "is registered as 'pets'" in result.output and "Traceback" not in result.output


def test_without_onnxruntime_the_message_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)
    with pytest.raises(UserError, match=r"uv sync --extra onnx \(pip install 'finetune\[onnx\]'\)"):
        onnx_export.require_onnxruntime()
    result = CliRunner().invoke(cli, ["export", "runs:/0123/model"])
    assert result.exit_code == 2
    assert "ONNX Runtime is not installed (it is an optional extra): uv sync --extra onnx" in result.output


def test_the_onnx_module_imports_no_lightning_nor_mlflow():
    import subprocess
    import sys

    code = ("import sys, finetune.model.onnx; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_export_help_and_bad_format():
    result = CliRunner().invoke(cli, ["export", "--help"])
    assert result.exit_code == 0 and "--quantize [int8]" in result.output and "--max-loss" in result.output
    result = CliRunner().invoke(cli, ["export", "runs:/x/model", "--format", "tflite"])
    assert result.exit_code == 2 and "'tflite' is not 'onnx'" in result.output


def test_the_onnx_version_predicts_like_torch_with_the_same_columns(tmp_path):
    import mlflow
    import pandas as pd

    from serve.batch_predict import predict_to_file

    logged_with_data(tmp_path, register="pets")
    result = CliRunner().invoke(cli, ["export", "models:/pets/1", "--register", "--output", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    images = sorted((tmp_path / "data").rglob("*.png"))
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images]})
    torch_model, onnx_model = mlflow.pyfunc.load_model("models:/pets/1"), mlflow.pyfunc.load_model("models:/pets/2")
    assert torch_model.unwrap_python_model().runtime_name == "torch"
    assert onnx_model.unwrap_python_model().runtime_name == "onnx"  # auto: the graph is there
    a, b = torch_model.predict(frame), onnx_model.predict(frame)
    assert list(a.columns) == list(b.columns) and a["label"].tolist() == b["label"].tolist()
    assert a["score"].tolist() == pytest.approx(b["score"].tolist(), abs=1e-3)
    assert a["ood_score"].tolist() == pytest.approx(b["ood_score"].tolist(), abs=1e-3, nan_ok=True)
    # Batch prediction: the same columns and labels on both runtimes; forcing torch on the ONNX version works.
    outs = {}
    for name, uri, runtime_name in (("t", "models:/pets/1", None), ("o", "models:/pets/2", "onnx"),
                                    ("f", "models:/pets/2", "torch")):
        predict_to_file(uri, str(tmp_path / "data"), tmp_path / f"{name}.csv", num_workers=0, progress=False,
                        runtime_name=runtime_name)
        outs[name] = pd.read_csv(tmp_path / f"{name}.csv")
    assert list(outs["t"].columns) == list(outs["o"].columns) == list(outs["f"].columns)
    assert outs["t"]["label"].tolist() == outs["o"]["label"].tolist() == outs["f"]["label"].tolist()


def test_runtime_onnx_needs_a_graph_and_onnx_runtime(tmp_path, monkeypatch):
    from serve.batch_predict import predict_to_file

    uri, _ = logged_with_data(tmp_path)
    with pytest.raises(UserError, match="has no model.onnx: export it"):
        predict_to_file(uri, str(tmp_path / "data"), tmp_path / "p.csv", num_workers=0, runtime_name="onnx")
    # A model that carries a graph, where ONNX Runtime is missing: --runtime onnx names the extra, auto says so
    # in a log line and runs on torch.
    monkeypatch.setattr(onnx_export, "require_onnxruntime",
                        lambda: (_ for _ in ()).throw(UserError(onnx_export.INSTALL_MESSAGE)))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError, match=r"uv sync --extra onnx"):
        onnx_export.choose_runtime("onnx", tmp_path / "m")
    assert onnx_export.choose_runtime("auto", tmp_path / "m") == "torch"
    assert onnx_export.choose_runtime(None, tmp_path) == "torch"  # no graph
    with pytest.raises(UserError, match="Invalid runtime"):
        onnx_export.choose_runtime("tensorrt", tmp_path)


def test_auto_on_a_gpu_uses_onnx_runtime_only_with_its_cuda_provider(tmp_path, monkeypatch):
    class FakeOrt:
        providers = ["CPUExecutionProvider"]

        def get_available_providers(self):
            return self.providers

    ort = FakeOrt()
    monkeypatch.setattr(onnx_export, "require_onnxruntime", lambda: ort)
    (tmp_path / "model.onnx").write_bytes(b"")
    assert onnx_export.choose_runtime("auto", tmp_path, "cpu") == "onnx"
    assert onnx_export.choose_runtime("auto", tmp_path, "cuda") == "torch"  # a CPU-only onnxruntime on a GPU machine
    ort.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_export.choose_runtime("auto", tmp_path, "cuda") == "onnx"
    assert onnx_export.choose_runtime("onnx", tmp_path, "cuda") == "onnx"  # asked for: OnnxRunner says what is missing


def test_a_graph_exported_from_another_model_is_refused_at_load(tmp_path, caplog):
    import shutil

    import mlflow

    from finetune.model.artifact import load_model, save_model, weights_sha256

    def model_dir(name: str, seed: int, classes=("cat", "dog")) -> Path:
        spec = ModelSpec(architecture=TINY_MODEL, num_classes=2, class_names=list(classes), data_config=DATA_CONFIG)
        torch.manual_seed(seed)
        net = build_network(spec)
        folder = save_model(tmp_path / name, net, spec)
        onnx_export.export_onnx(net, spec, folder / "model.onnx", weights_digest=weights_sha256(folder))
        return folder

    def load(folder: Path, classes=("cat", "dog")):
        run = tracking.client().create_run(tracking.ensure_experiment("test"))
        uri = registry.log_pyfunc(run.info.run_id, folder, list(classes), "center", {})
        return mlflow.pyfunc.load_model(uri, model_config={"runtime": "onnx"}).unwrap_python_model()

    own, other, ants = model_dir("own", 0), model_dir("other", 1), model_dir("ants", 0, ("ant", "bee"))
    assert load(own).runtime_name == "onnx"  # its own graph
    shutil.copyfile(own / "model.onnx", other / "model.onnx")  # what a reused export folder shipped
    with pytest.raises(UserError, match="model.onnx does not belong to this model: it was exported from other "
                                        "weights than this model's model.safetensors.*export this model again"):
        load(other)
    shutil.copyfile(own / "model.onnx", ants / "model.onnx")
    with pytest.raises(UserError, match=r"its classes \['cat', 'dog'\] are not the model's \['ant', 'bee'\]"):
        load(ants, ("ant", "bee"))
    # A graph exported before the weights were recorded: its classes are checked, and a log line says so.
    spec = ModelSpec(architecture=TINY_MODEL, num_classes=2, class_names=["cat", "dog"], data_config=DATA_CONFIG)
    onnx_export.export_onnx(load_model(own)[0], spec, own / "model.onnx")
    assert load(own).runtime_name == "onnx" and "records no weights digest" in caplog.text


def test_export_refuses_a_used_output_folder_so_no_stale_graph_is_logged(tmp_path):
    import mlflow

    from finetune.model.artifact import weights_sha256

    uri, run_id = logged_with_data(tmp_path)
    stale = tmp_path / "export" / "onnx" / "model" / "model.int8.onnx"  # an earlier export of another model
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"another model's int8 graph")
    result = CliRunner().invoke(cli, ["export", uri, "--output", str(tmp_path / "export")])
    assert result.exit_code == 2 and f"--output {tmp_path / 'export'} is not empty" in result.output
    assert not tracking.client().list_artifacts(run_id, "onnx")

    result = CliRunner().invoke(cli, ["export", uri, "--output", str(tmp_path / "fresh")])
    assert result.exit_code == 0, result.output
    logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model_onnx"))
    names = {p.name for p in logged.rglob("*")}
    assert "model.onnx" in names and "model.int8.onnx" not in names
    assert not [p for p in (tmp_path / "fresh").rglob("*") if p.name.endswith(".tmp")]  # written atomically
    graph = onnx_export.OnnxRunner(tmp_path / "fresh" / "onnx" / "model.onnx")
    assert graph.metadata[onnx_export.WEIGHTS_KEY] == weights_sha256(tmp_path / "fresh" / "onnx" / "model")

"""`finetune demo` runs offline end to end: generated data, pretraining, fine-tuning from the file."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from finetune.cli import cli


def test_demo_pretrains_then_finetunes_from_the_saved_file(tmp_path: Path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(workdir), "--epochs", "1", "--pretrain-epochs", "1"])
    assert result.exit_code == 0, result.output
    weights = workdir / "weights" / "mobilenetv3_small_100.demo.safetensors"
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    summary = json.loads((workdir / "finetune" / "summary.json").read_text())
    spec = json.loads(Path(summary["model_dir"], "model.json").read_text())
    assert spec["weights_source"] == f"file:{weights}"
    assert spec["class_names"] == ["circle", "square", "triangle"]
    assert "mlflow ui" in result.output

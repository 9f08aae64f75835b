"""Config precedence (defaults < YAML < flags), unknown keys, bad values, and --help of every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.config import TrainConfig, load_yaml, resolve_config
from finetune.errors import UserError
from tests.conftest import tiny_train_args


def test_flags_override_file_which_overrides_defaults(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nbatch-size: 3\nlr: 0.01\n")
    cfg = resolve_config(load_yaml(cfg_file), {"data_dir": "d", "epochs": 2, "lr": None})
    assert cfg.epochs == 2  # flag wins
    assert cfg.batch_size == 3  # from the file (dash accepted)
    assert cfg.lr == 0.01  # flag not given: file value stays
    assert cfg.weight_decay == TrainConfig().weight_decay  # default


def test_unknown_key_names_valid_keys(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 1\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"Unknown config key\(s\): learning_rate\. Valid keys: .*\blr\b"):
        resolve_config(load_yaml(cfg_file), {"data_dir": "d"})


@pytest.mark.parametrize(
    "values, message",
    [({"epochs": 0}, "epochs must be at least 1"), ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\)"),
     ({"batch_size": 0}, "batch_size must be at least 1"), ({"tta": "20crop"}, "Valid values: auto, none, center"),
     ({"epochs": "many"}, "not a valid int")],
)
def test_impossible_values_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values, {"data_dir": "d"})


def test_config_file_through_cli_and_resolved_config_saved(image_folder: Path, tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 1\nseed: 5\nlr: 0.002\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, out, "--config", str(cfg_file), "--lr", "0.003"))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["seed"] == 5 and saved["lr"] == 0.003


def test_unknown_key_through_cli_exits_cleanly(image_folder: Path, tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epoch: 1\n")
    result = CliRunner().invoke(cli, tiny_train_args(image_folder, tmp_path / "out", "--config", str(cfg_file)))
    assert result.exit_code == 2
    assert "Unknown config key(s): epoch" in result.output
    assert "Traceback" not in result.output


def test_example_config_is_valid():
    example = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"
    cfg = resolve_config(load_yaml(example), {"data_dir": "d"})
    assert cfg.model


def _commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("command", [(), *_commands(cli)], ids=lambda c: " ".join(c) or "finetune")
def test_help_of_every_command(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output

"""Each option is declared once (finetune.config.TrainConfig): the click options of every command, the YAML keys
it accepts, the recipe and the help are generated from that declaration."""

from __future__ import annotations

import re
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from finetune.cli import cli
from finetune.cli_options import COMMAND_GROUP, GroupedOption, shown_default
from finetune.config import COMMANDS, GROUPS, TrainConfig, config_keys, options, resolve_config
from finetune.training.recipe import Recipe


def _config_params(command: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands[command].params
            if isinstance(p, GroupedOption) and p.group != COMMAND_GROUP}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_offers_exactly_the_declared_options_it_acts_on(command: str):
    params = _config_params(command)
    declared = {f.name: f for f in options(command)}
    assert set(params) == set(declared)
    for name, f in declared.items():
        p, m = params[name], f.metadata
        assert p.help == m["help"] and p.group == m["group"] in GROUPS
        assert p.default is None  # "not given": a config file may set it
        if m["choices"]:
            assert tuple(p.type.choices) == m["choices"]
        if m["low"] is not None:
            assert (p.type.min, p.type.min_open) == (m["low"], m["low_open"])
        if m["high"] is not None:
            assert (p.type.max, p.type.max_open) == (m["high"], m["high_open"])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_config_file_takes_the_same_options_as_the_command_line(command: str):
    acting = {f.name for f in options(command)}
    for f in options():
        value = f.default if f.default is not None else {int: 1, float: 0.5}.get(type(f.default), None)
        if value is None:
            continue
        cfg = resolve_config({f.name: value}, {"data_dir": "d"}, command)  # one file serves every command
        assert getattr(cfg, f.name) == (value if f.name in acting else f.default)
    assert config_keys() == [f.name for f in fields(TrainConfig)]


def test_the_recipe_is_the_recipe_group_of_the_declaration():
    assert [f.name for f in fields(Recipe)] == [f.name for f in options() if f.metadata["group"] == "Recipe"]


def test_train_help_shows_every_option_in_its_group_with_its_default():
    text = CliRunner().invoke(cli, ["train", "--help"]).output
    headings = [line.rstrip(":") for line in text.splitlines() if re.fullmatch(r"[A-Z][\w ]+:", line)]
    assert headings == [COMMAND_GROUP, *GROUPS]
    ctx = click.Context(cli.commands["train"])
    for name, param in _config_params("train").items():
        f = next(f for f in options() if f.name == name)
        _, help_text = param.get_help_record(ctx)
        assert f"[default: {shown_default(f)}" in help_text, help_text
        assert " ".join(f"[default: {shown_default(f)}".split()) in " ".join(text.split())


def test_every_option_declares_what_its_default_means():
    undeclared = [f.name for f in options() if f.default is None and f.metadata["shows"] is None]
    assert not undeclared

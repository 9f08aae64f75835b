"""docs/cli.md is what the commands say now, and the docs use only options that the commands have."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from finetune.cli import cli
from finetune.cli_reference import EXAMPLE, REFERENCE, REGENERATE, render, render_example

REPO = Path(__file__).resolve().parents[1]
# `finetune CMD ...` up to the end of its shell command: a pipe, &&, ;, a comment, or the end of the span.
INVOCATION = re.compile(r"(?<![\w./-])finetune\s+([a-z][a-z-]*)\b([^|;&#`\n]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


def test_cli_reference_is_up_to_date():
    assert REFERENCE.is_file(), f"docs/cli.md is missing: generate it with `{REGENERATE}`"
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        f"docs/cli.md differs from what the commands say now: regenerate it with `{REGENERATE}` and commit it")


def test_reference_lists_every_command_and_option():
    text = render()
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert f"## `finetune {name}`" in text
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert f"`{opt}`" in text, (name, opt)


def _code(markdown: str) -> list[str]:
    """The code of a Markdown text: fenced and indented blocks (continuation lines joined), and inline spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    indented = "\n".join(line for line in rest.splitlines() if line.startswith(("    ", "\t")))
    blocks = [block.replace("\\\n", " ") for block in [*fenced, indented]]
    return blocks + re.findall(r"`([^`\n]+)`", re.sub(r"^(    |\t).*$", "", rest, flags=re.M))


def options_used(markdown: str) -> list[tuple[str, str]]:
    """(command, option) of every `finetune COMMAND ... --option` in the code of `markdown`."""
    used = []
    for code in _code(markdown):
        for line in code.splitlines():
            for command, args in INVOCATION.findall(line):
                used += [(command, opt) for opt in OPTION.findall(args)]
    return used


def known_options() -> dict[str, set[str]]:
    ctx = click.Context(cli)
    group = {opt for p in cli.get_params(ctx) for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    known = {}
    for name in cli.list_commands(ctx):
        params = cli.get_command(ctx, name).get_params(ctx)
        known[name] = group | {o for p in params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    return known


def test_the_check_finds_options_of_finetune_only():
    text = ("Run `finetune train ./d --epochs 3 --model x` then\n```\nuv run finetune predict URI d -o p.csv \\\n"
            "  --tta center | head --lines 3\nmlflow ui --backend-store-uri x && finetune serve URI --port 1\n```\n"
            "`pip install finetune[onnx] --upgrade` and `torchrun -m finetune.cli train --nproc 2`\n\n"
            "    uv run finetune plan ./d [--json]    # prints --nothing\n")
    assert options_used(text) == [("predict", "-o"), ("predict", "--tta"), ("serve", "--port"), ("plan", "--json"),
                                  ("train", "--epochs"), ("train", "--model")]


@pytest.mark.parametrize("doc", sorted(str(p.relative_to(REPO)) for p in [REPO / "README.md",
                                                                          *(REPO / "docs").rglob("*.md")]))
def test_docs_mention_only_options_the_commands_have(doc: str):
    known = known_options()
    unknown = sorted({f"finetune {command} {opt}" for command, opt in options_used((REPO / doc).read_text())
                      if command in known and opt not in known[command]})
    assert not unknown, (f"{doc} mentions options that no finetune command has: {', '.join(unknown)}. Fix the text, "
                         f"or the command (then regenerate docs/cli.md: `{REGENERATE}`).")


def test_the_readme_stays_short():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert len(readme.read_text().splitlines()) <= 250, "README.md is for the golden path; move detail into docs/"


def test_the_example_config_is_generated_from_the_declarations_and_lists_every_option():
    import re

    from finetune.config import load_yaml, options, resolve_config

    assert EXAMPLE.read_text(encoding="utf-8") == render_example(), f"examples/config.yaml is stale: run `{REGENERATE}`"
    listed = set(re.findall(r"^#? ?(\w+):", EXAMPLE.read_text(), flags=re.M))
    assert {f.name for f in options("train")} <= listed
    cfg = resolve_config(load_yaml(EXAMPLE), {"data_dir": "d"})
    assert cfg == resolve_config({}, {"data_dir": "d"})  # every value it sets is the default

"""The CLI reference, docs/cli.md, generated from the click commands themselves, and examples/config.yaml, generated
from the option declarations, so neither can drift from them.

    python -m finetune.cli_reference            # (re)writes docs/cli.md and examples/config.yaml
    python -m finetune.cli_reference --check    # exits 1 when either is not what the code says now

Deterministic: commands in name order, options in declaration order, nothing read from the environment
(defaults that depend on the machine are declared as None and described in the help).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"
REGENERATE = "uv run --frozen python -m finetune.cli_reference"


def _cell(text: str) -> str:
    """Text for one cell of a Markdown table: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param: click.Parameter) -> str:
    if isinstance(getattr(param, "show_default", None), str):  # a declared option: its effective default
        return f"`{param.show_default}`" if " " not in param.show_default else param.show_default
    default = param.to_info_dict().get("default")  # None when unset (click's own sentinel otherwise)
    if default is None or callable(default) or (getattr(param, "is_flag", False) and not default):
        return ""
    if isinstance(default, (tuple, list)):
        return f"`{' '.join(map(str, default))}`" if default else ""
    return f"`{default}`"


def _value(param: click.Option, ctx: click.Context) -> str:
    if param.is_flag:
        return "flag"
    metavar = param.make_metavar(ctx)
    return f"`{metavar}`" + (" ×" + str(param.nargs) if param.nargs > 1 else "")


def option_rows(command: click.Command, ctx: click.Context) -> list[str]:
    rows = ["| Option | Value | Default | Description |", "|---|---|---|---|"]
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden:
            continue
        names = ", ".join(f"`{name}`" for name in [*param.opts, *param.secondary_opts])
        help_text = (param.help or "") + (" (required)" if param.required else "")
        rows.append(f"| {names} | {_value(param, ctx)} | {_default(param)} | {_cell(help_text)} |")
    return rows


def command_section(path: str, command: click.Command, parent: click.Context) -> list[str]:
    """The Markdown of one command: usage, its help, its arguments and options."""
    # Settings as when the command runs (`-h` beside `--help` comes from the group's context_settings).
    ctx = click.Context(command, parent=parent, info_name=path.split()[-1], **command.context_settings)
    lines = [f"## `{path}`", "", "```", f"{path} {' '.join(command.collect_usage_pieces(ctx))}", "```", ""]
    lines += [inspect.cleandoc(command.help or ""), ""]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if arguments:
        lines += ["Arguments: " + ", ".join(
            f"`{p.make_metavar(ctx)}`" + (" (one or more)" if p.nargs == -1 else "") + ("" if p.required else " (optional)")
            for p in arguments), ""]
    return lines + option_rows(command, ctx) + [""]


def render(group: click.Group | None = None) -> str:
    """docs/cli.md's text: the group's options, then every command in name order."""
    if group is None:
        from finetune.cli import cli as group
    ctx = click.Context(group, info_name="finetune", **group.context_settings)
    lines = ["# Command-line reference", "",
             f"Generated from the commands by `{REGENERATE}`; do not edit by hand.", "",
             "```", f"finetune {' '.join(group.collect_usage_pieces(ctx))}", "```", "",
             inspect.cleandoc(group.help or ""), "", *option_rows(group, ctx), "", "Commands:", ""]
    names = group.list_commands(ctx)
    lines += [f"- [`finetune {name}`](#finetune-{name}): {_cell(group.get_command(ctx, name).get_short_help_str(90))}"
              for name in names]
    lines.append("")
    for name in names:
        lines += command_section(f"finetune {name}", group.get_command(ctx, name), ctx)
    return "\n".join(lines).rstrip() + "\n"


def render_example() -> str:
    """examples/config.yaml's text: every option of `finetune train` with its default, by group, from the
    declarations (a None default, "derived", is written commented out with what it means)."""
    from finetune.cli_options import shown_default
    from finetune.config import GROUPS, options

    lines = ["# Every option of `finetune train DATA_DIR --config examples/config.yaml`, at its default.",
             f"# Generated from the option declarations by `{REGENERATE}`; do not edit by hand: copy it.",
             "# Flags on the command line override the file; an unknown key is an error that lists the valid ones;",
             "# the resolved config is saved with every run (config.json, and the MLflow run)."]
    for group in GROUPS:
        lines += ["", f"# {group}"]
        for f in options("train"):
            if f.metadata["group"] != group:
                continue
            note = f"  # {' '.join(f.metadata['help'].split())}"
            if f.default is None:
                lines.append(f"# {f.name}:{note} Default: {shown_default(f)}.")
            else:
                value = str(f.default).lower() if isinstance(f.default, bool) else f.default
                lines.append(f"{f.name}: {value}{note}")
    return "\n".join(lines) + "\n"


GENERATED = {REFERENCE: render, EXAMPLE: render_example}


def main(argv: list[str]) -> int:
    from finetune.files import atomic_write

    stale = []
    for path, make in GENERATED.items():
        text = make()
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if "--check" in argv:
            stale += [path] if current != text else []
            continue
        with atomic_write(path, encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")
    for path in stale:
        print(f"{path} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

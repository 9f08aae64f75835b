"""The click side of the option declarations in `finetune.config`: each config option becomes a click option of
the commands that act on it, with its type, range, choices, help and default, shown in named groups."""

from __future__ import annotations

from dataclasses import Field
from typing import Any, Callable

import click

from finetune.config import GROUPS, option_type, options

COMMAND_GROUP = "Options"  # a command's own options (--resume, --json, ...), listed first


class GroupedOption(click.Option):
    """A click option that knows which help group it belongs to."""

    def __init__(self, *args: Any, group: str = COMMAND_GROUP, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group

    def get_help_extra(self, ctx: click.Context) -> Any:
        # click puts a default given as text in parentheses; ours is the effective default itself.
        extra = super().get_help_extra(ctx)
        if isinstance(self.show_default, str) and extra.get("default") == f"({self.show_default})":
            extra["default"] = self.show_default
        return extra


class GroupedCommand(click.Command):
    """A command whose help lists its options by group, in `GROUPS` order after the command's own."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections.setdefault(getattr(param, "group", COMMAND_GROUP), []).append(record)
        for name in (COMMAND_GROUP, *GROUPS):
            if name in sections:
                with formatter.section(name):
                    formatter.write_dl(sections[name])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def click_type(f: Field) -> Any:
    """The click type of a declared option: its choices, its range, a file path, or its plain type."""
    m, kind = f.metadata, option_type(f)
    if m["choices"]:
        return click.Choice(m["choices"])
    if m["path"]:
        return click.Path(dir_okay=False)
    if kind in (int, float) and (m["low"] is not None or m["high"] is not None):
        ranged = click.IntRange if kind is int else click.FloatRange
        return ranged(m["low"], m["high"], min_open=m["low_open"], max_open=m["high_open"])
    return kind


def shown_default(f: Field) -> str:
    """The effective default as the help shows it."""
    if f.metadata["shows"] is not None:
        return f.metadata["shows"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def click_option(f: Field, shows: str | None = None) -> Callable:
    """One declared option as a click option. Its click default is None, "not given", so a config file can set
    it; the help shows the effective default (`shows`, where the command has its own)."""
    common = dict(cls=GroupedOption, group=f.metadata["group"], help=f.metadata["help"],
                  show_default=shows or shown_default(f), default=None)
    if option_type(f) is bool:
        return click.option(f"{flag(f.name)}/--no-{f.name.replace('_', '-')}", f.name, **common)
    return click.option(flag(f.name), f.name, type=click_type(f), **common)


def config_options(command: str, shows: dict[str, str] | None = None) -> Callable:
    """The decorator that gives `command` `--config FILE` and every option it acts on, declared once in
    `finetune.config.TrainConfig`; `shows`: defaults this command sets itself, as its help says them."""
    generated = [click.option("--config", "config_file", type=click.Path(dir_okay=False), cls=GroupedOption,
                              help="YAML file with any of these options (flags override it).")]
    generated += [click_option(f, (shows or {}).get(f.name)) for f in options(command)]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(generated):
            fn = option(fn)
        return fn
    return decorate

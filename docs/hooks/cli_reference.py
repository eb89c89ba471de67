"""MkDocs hook: each command's flags, read from the parser the command itself builds, at build time.

A page holds `<!-- cli: hive-probe -->`; the build replaces it with the command's description and one table per
group of flags (flag, default, help). The parser is the one the command's own `main` builds: `main` runs with no
arguments and stops at its first `parse_known_args` (argparse, transformers' HfArgumentParser) or at typer's app
(hive-serve), so a flag added, renamed or re-documented in the code is what the page shows, with no copy to drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from unittest import mock

# The commands the site documents, by the name users type, and the `main` that parses its command line.
COMMANDS = {
    "hive-train": "hive_adapter.training.train:main",
    "hive-export-vision": "hive_adapter.tools.export:main",
    "hive-serve": "hive_adapter.tools.serve:main",
    "hive-analyze": "hive_adapter.analysis.cli:main",
    "hive-probe": "hive_adapter.analysis.probe:main",
    "hive-reproduce": "hive_adapter.analysis.reproduce:main",
    "hive-eval-tasks": "hive_adapter.evaluation.tasks:main",
    "hive-llava-train": "hive_adapter.integrations.llava.train:main",
    "python -m hive_adapter.tools.toy_models": "hive_adapter.tools.toy_models:main",
    "python -m hive_adapter.tools.real_lm": "hive_adapter.tools.real_lm:main",
    "python -m hive_adapter.analysis.learning_curves": "hive_adapter.analysis.learning_curves:main",
    "python -m hive_adapter.integrations.llava.toy": "hive_adapter.integrations.llava.toy:main",
    "python -m hive_adapter.integrations.llava.ask": "hive_adapter.integrations.llava.ask:main",
}
# Parsers a command builds besides the one its `main` parses with, as "module:function" returning the parser:
# hive-serve reads its own options first, then hands the rest to transformers serve's app.
OWN_OPTIONS = {"hive-serve": "hive_adapter.tools.serve:hive_options"}
MARKER = re.compile(r"^<!-- cli: (?P<name>[^>]+?) -->$", flags=re.M)


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser (or click command) the command built."""

    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


@contextmanager
def _stop_at_parsing() -> Iterator[None]:
    import typer

    def argparse_stop(self, *args, **kwargs):
        raise _Parsed(self)

    def typer_stop(self, *args, **kwargs):
        raise _Parsed(typer.main.get_command(self))

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", argparse_stop):
        with mock.patch.object(typer.Typer, "__call__", typer_stop):
            yield


def command_parser(name: str):
    """The argparse parser (or, for hive-serve, the click command) that `name`'s own `main` builds."""
    module_name, function = COMMANDS[name].split(":")
    main: Callable = getattr(importlib.import_module(module_name), function)
    argv = ["--help"] if name == "hive-serve" else []  # hive-serve hands --help to transformers serve's app
    saved_argv = sys.argv
    sys.argv = [name, *argv]  # hive-llava-train reads sys.argv, as LLaVA's train() does
    try:
        with _stop_at_parsing(), redirect_stdout(io.StringIO()):  # a help text it prints first is not the page's
            main() if name == "hive-llava-train" else main(argv)
    except _Parsed as parsed:
        return parsed.parser
    finally:
        sys.argv = saved_argv
    raise RuntimeError(f"{name}: {COMMANDS[name]} returned without parsing a command line")


def _cell(text) -> str:
    """Markdown-table-safe text: no pipes, no raw HTML, one line."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    return "`" + str(text).replace("|", "\\|").replace("`", "'") + "`" if text != "" else ""


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
        return ""
    if dataclasses.is_dataclass(action.default):
        return ""
    return _code(repr(action.default) if isinstance(action.default, str) else action.default)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        text = ""
    else:
        try:
            text = parser._get_formatter()._expand_help(action)
        except (KeyError, TypeError, ValueError):
            text = action.help
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += " (one of " + ", ".join(_code(choice) for choice in action.choices) + ")"
    return _cell(text)


def _flag(action: argparse.Action) -> str:
    if action.option_strings:  # HfArgumentParser adds `--a-b` beside `--a_b`: the one spelling is enough
        options = [
            o
            for o in action.option_strings
            if o.replace("-", "_") == o or o.replace("-", "_") not in action.option_strings
        ]
        return ", ".join(_code(option) for option in options)
    return _code(action.metavar or action.dest.upper())


def _table(parser: argparse.ArgumentParser, actions: list[argparse.Action], indent: str = "") -> list[str]:
    rows = [f"{indent}| flag | default | meaning |", f"{indent}| --- | --- | --- |"]
    for action in actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        rows.append(f"{indent}| {_flag(action)} | {_default(action)} | {_help(parser, action)} |")
    return rows if len(rows) > 2 else []


def _is_ours(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and cls.__module__.startswith("hive_adapter")


def _argparse_markdown(parser: argparse.ArgumentParser, heading: str) -> list[str]:
    lines = [_cell(parser.description), ""] if parser.description else []
    groups = getattr(parser, "dataclass_types", None)  # transformers' HfArgumentParser: one table per dataclass
    if groups:
        by_dest: dict[str, list[argparse.Action]] = {}  # a boolean field has two: `--flag` and `--no_flag`
        for action in parser._actions:
            by_dest.setdefault(action.dest, []).append(action)
        for group in groups:
            ours = {f.name for base in group.__mro__ if _is_ours(base) for f in dataclasses.fields(base)}
            actions = [action for f in dataclasses.fields(group) for action in by_dest.get(f.name, [])]
            mine = [action for action in actions if action.dest in ours]
            theirs = [action for action in actions if action.dest not in ours]
            if mine:
                title = group.__name__ if not theirs else f"HIVE's flags in {group.__module__}.{group.__name__}"
                lines += [f"{heading}# {title}", "", *_table(parser, mine), ""]
            if theirs:  # transformers' TrainingArguments, LLaVA's own: collapsed, they are long
                title = f"{group.__module__.split('.')[0]}'s {group.__name__}: {len(theirs)} flags"
                lines += [f'??? note "{title}"', "", *_table(parser, theirs, indent="    "), ""]
        return lines
    lines += [*_table(parser, parser._actions), ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                lines += [f"{heading}# `{name}`", "", *_argparse_markdown(subparser, heading + "#")]
    return lines


def _click_markdown(command) -> list[str]:
    lines = [_cell((command.help or "").split("\n\n")[0]), "", "| flag | default | meaning |", "| --- | --- | --- |"]
    for param in command.params:
        flags = ", ".join(_code(option) for option in param.opts) if param.opts else _code(param.name.upper())
        default = "" if param.default is None or callable(param.default) else _code(param.default)
        lines.append(f"| {flags} | {default} | {_cell(getattr(param, 'help', '') or '')} |")
    return [*lines, ""]


def command_parsers(name: str) -> list:
    """Every parser `name` reads its command line with: its own options first (OWN_OPTIONS), then its main's."""
    parsers = []
    if name in OWN_OPTIONS:
        module_name, function = OWN_OPTIONS[name].split(":")
        parsers.append(getattr(importlib.import_module(module_name), function)())
    return [*parsers, command_parser(name)]


def command_markdown(name: str, heading: str = "###") -> str:
    """The generated reference of one command: its description and its flags, as markdown."""
    parts = []
    for index, parser in enumerate(command_parsers(name)):
        if index:
            parts.append(f"{heading} The options it passes on (`{getattr(parser, 'name', None) or parser.prog}`)\n")
        if isinstance(parser, argparse.ArgumentParser):
            parts.append("\n".join(_argparse_markdown(parser, heading)))
        else:
            parts.append("\n".join(_click_markdown(parser)))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: each `<!-- cli: NAME -->` line becomes NAME's generated reference."""

    def expand(match: re.Match) -> str:
        name = match["name"]
        if name not in COMMANDS:
            raise ValueError(f"{page.file.src_uri}: <!-- cli: {name} --> names no command of {sorted(COMMANDS)}")
        return command_markdown(name)

    return MARKER.sub(expand, markdown)

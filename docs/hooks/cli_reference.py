"""MkDocs hook: the CLI reference, rendered at build time from transferkit.cli.build_parser().

A page that holds the marker below gets, in its place, one section per command: its help line,
description, usage, a table of options per argument group (hidden ones left out) and its examples.
The text is argparse's own, so the page says what `transferkit COMMAND --help` says.
"""

from __future__ import annotations

import argparse
import os
import re

MARKER = "<!-- cli-reference -->"
WIDTH = "100"  # argparse wraps usage at the terminal width; a fixed one keeps builds identical


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker with the reference of every command."""
    if MARKER not in markdown:
        return markdown
    from transferkit.cli import build_parser

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return markdown.replace(MARKER, render(build_parser()))
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def render(parser: argparse.ArgumentParser) -> str:
    """Markdown for the program's global options, then each subcommand in the parser's order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [f"## {parser.prog}", "", _text(parser.description or ""), "", _usage(parser)]
    out += ["| command | what it does |", "| --- | --- |"]
    out += [f"| [`{name}`](#{parser.prog}-{name}) | {_text(helps.get(name) or '')} |"
            for name in sub.choices]
    out += [""] + _groups(parser)
    for name, command in sub.choices.items():
        out += [f"## {parser.prog} {name}", "", f"*{_text(helps.get(name) or '')}*", ""]
        if command.description:
            out += [_text(command.description), ""]
        out += [_usage(command)]
        out += _groups(command)
        if command.epilog:
            out += ["```text", command.epilog.strip("\n"), "```", ""]
    return "\n".join(out)


def _usage(parser: argparse.ArgumentParser) -> str:
    return f"```text\n{parser.format_usage().strip()}\n```\n"


def _groups(parser: argparse.ArgumentParser) -> list[str]:
    """Each argument group: its title and description, then a table of its visible options."""
    out: list[str] = []
    formatter = parser._get_formatter()
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help != argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]
        if not actions and not group.description:
            continue
        about = f": {_text(group.description)}" if group.description else ""
        out += [f"**{_text(group.title or '')}**{about}", ""]
        if actions:  # a group may be a paragraph alone (e.g. how torchrun runs a job)
            out += ["| option | value | what it does |", "| --- | --- | --- |"]
            for action in actions:
                names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
                what = _text(formatter._expand_help(action))
                out.append(f"| {names} | {_value(action)} | {what} |")
            out.append("")
    return out


def _value(action: argparse.Action) -> str:
    """What the option takes: its choices, its metavar, or nothing for a switch."""
    if not action.option_strings:  # a positional argument: its name is in the first column
        return "one or more" if action.nargs in ("+", "*") else ""
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return ", ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or action.dest.upper()
    shown = " ".join(metavar) if isinstance(metavar, tuple) else metavar
    return f"`{shown}`" + (" ..." if action.nargs in ("+", "*") else "")


def _text(text: str) -> str:
    """argparse's plain text as Markdown that shows it literally, on one line (tables need that)."""
    text = " ".join(text.split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)

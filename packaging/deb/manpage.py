"""Man pages for vmtide's commands, made from their own argparse parsers.

The parser is the one source of truth for options and their help, so the page is
generated from it: a probe runs inside the bundled virtualenv, builds the parser
the way the console script does (stopping at parse_args), and prints it as JSON;
`render` turns that into roff. Nothing here is hand-written per option.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Runs in the bundled interpreter: capture the parser the entry point builds,
# then describe it and each subcommand (help text formatted at 80 columns).
_PROBE = """
import argparse, importlib, json, sys
module, function = sys.argv[1].split(":")
captured = []
def capture(self, *args, **kwargs):
    captured.append(self)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = capture
try:
    getattr(importlib.import_module(module), function)([])
except SystemExit:
    pass
parser = captured[0]
subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
helps = {a.dest: a.help for s in subparsers for a in s._choices_actions}
commands = [
    {"name": name, "help": helps.get(name) or "", "text": sub.format_help()}
    for s in subparsers
    for name, sub in s.choices.items()
]
options = [
    {"flags": ", ".join(a.option_strings), "help": a.help % {"prog": parser.prog}}
    for a in parser._actions
    if a.option_strings and a.help
]
print(json.dumps({
    "prog": parser.prog,
    "description": parser.description or "",
    "usage": parser.format_usage(),
    "options": options,
    "commands": commands,
}))
"""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    text: str  # the subcommand's own --help


@dataclass(frozen=True)
class Option:
    flags: str  # "-h, --help"
    help: str


@dataclass(frozen=True)
class Program:
    prog: str
    description: str
    usage: str
    options: tuple[Option, ...]  # the program's own, before the command
    commands: tuple[Command, ...]


def probe(python: Path, entry_point: str) -> Program:
    """The parser behind `entry_point` ("agent.cli:main"), as `python` imports it."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [str(python), "-c", _PROBE, entry_point],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot read the parser of {entry_point}:\n{result.stderr}")
    data = json.loads(result.stdout)
    options = tuple(Option(o["flags"], o["help"]) for o in data["options"])
    commands = tuple(Command(c["name"], c["help"], c["text"]) for c in data["commands"])
    return Program(data["prog"], data["description"], data["usage"], options, commands)


def _escape(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no control line by accident."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        f"\\&{line}" if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _verbatim(text: str) -> list[str]:
    return [".PP", ".nf", _escape(text.rstrip("\n")), ".fi"]


@dataclass(frozen=True)
class Page:
    """What argparse does not know: the page's title line and closing sections."""

    section: str
    version: str
    summary: str  # for NAME, after the dash
    notes: str  # DESCRIPTION's second paragraph: how the command is run
    files: tuple[tuple[str, str], ...]  # (path, what it is)
    exit_status: tuple[tuple[str, str], ...]
    see_also: tuple[tuple[str, str], ...]  # (page, section)
    epoch: int  # the page's date (SOURCE_DATE_EPOCH), so rebuilds are identical


def render(program: Program, page: Page) -> str:
    date = datetime.fromtimestamp(page.epoch, UTC).strftime("%Y-%m-%d")
    name = program.prog
    lines = [
        f'.TH "{name.upper()}" "{page.section}" "{date}" "vmtide {page.version}"'
        ' "System Administration"',
        ".SH NAME",
        f"{_escape(name)} \\- {_escape(page.summary)}",
        ".SH SYNOPSIS",
        *_verbatim(program.usage.removeprefix("usage: ")),
        ".SH DESCRIPTION",
        _escape(program.description),
        ".PP",
        _escape(page.notes),
        ".SH OPTIONS",
    ]
    for option in program.options:
        lines += [".TP", f"\\fB{_escape(option.flags)}\\fR", _escape(option.help)]
    lines.append(".SH COMMANDS")
    for command in program.commands:
        lines += [f'.SS "{_escape(name)} {_escape(command.name)}"', _escape(command.help)]
        lines += _verbatim(command.text)
    lines.append(".SH FILES")
    for path, what in page.files:
        lines += [".TP", f"\\fI{_escape(path)}\\fR", _escape(what)]
    lines.append(".SH EXIT STATUS")
    for status, what in page.exit_status:
        lines += [".TP", f"\\fB{status}\\fR", _escape(what)]
    refs = ",\n".join(f"\\fB{_escape(ref)}\\fR({section})" for ref, section in page.see_also)
    lines += [".SH SEE ALSO", refs]
    return "\n".join(lines) + "\n"


__all__ = ["Command", "Option", "Page", "Program", "probe", "render"]

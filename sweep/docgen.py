"""The generated reference pages: docs/cli.md from the command line (itself built from the config dataclass) and
docs/schema.md from the store's schema. ``make docs`` rewrites them; a test checks they are up to date.

    python -m sweep.docgen            # write docs/cli.md and docs/schema.md
    python -m sweep.docgen --check    # exit 1 if either is out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import fields
from pathlib import Path

from sweep.cli import build_parser
from sweep.config import SweepConfig
from sweep.store.schema import schema_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"

INTRO = """# Command line

Generated from `sweep/cli.py` and the config dataclass `sweep/config.py` by `make docs`; do not edit.

Every setting of `sweep run` is a field of one frozen dataclass, `SweepConfig`, with a default and a one-line
description; the flags below are generated from it. Precedence: the dataclass defaults, then a YAML preset
(`--config gpt2` reads `configs/gpt2.yaml`; keys are the flag names with `-` or `_`), then the flags you type.
Errors name the flag and exit with status 2; an interrupted `sweep run` exits with 130 and the same command
resumes it.
"""


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


CONFIG_DEFAULTS = {f.name: f.default for f in fields(SweepConfig) if f.default is not NO_DEFAULT}


def _default(action: argparse.Action) -> str:
    value = CONFIG_DEFAULTS.get(action.dest, action.default)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)) and not value:
        return "off"
    return "—" if value is None else f"`{value}`"


def _flag(action: argparse.Action) -> str:
    name = ", ".join(action.option_strings)
    takes_value = action.nargs != 0 and not isinstance(action, (argparse._StoreTrueAction,
                                                                 argparse._StoreConstAction))
    if takes_value and action.choices:
        return f"`{name} {{{','.join(action.choices)}}}`"
    return f"`{name} {action.metavar or action.dest.upper()}`" if takes_value else f"`{name}`"


def _meaning(action: argparse.Action) -> str:
    text = re.sub(r"\s*\(default: [^)]*\)\s*$", "", action.help or "")
    return text.replace("|", "\\|") + (" (required)" if action.required else "")


def cli_markdown() -> str:
    """docs/cli.md: every command with its usage and a table of its flags (flag, default, meaning)."""
    parser = build_parser()
    lines = [INTRO]
    for name, summary, sub in _subcommands(parser):
        usage = " ".join(sub.format_usage().split())
        lines += [f"## `sweep {name}`", "", summary[:1].upper() + summary[1:] + ".", "", "```", usage, "```", "",
                  "| flag | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| {_flag(a)} | {_default(a)} | {_meaning(a)} |" for a in sub._actions
                  if a.option_strings and a.dest != "help"]
        lines.append("")
    return "\n".join(lines)


PAGES = {"cli.md": cli_markdown, "schema.md": schema_markdown}
"""Generated page -> the function that writes it."""


def stale_pages(docs: Path = DOCS) -> list[str]:
    """Generated pages whose file differs from what the code generates now."""
    return [name for name, render in PAGES.items()
            if not (docs / name).exists() or (docs / name).read_text(encoding="utf-8") != render()]


def write_pages(docs: Path = DOCS) -> list[Path]:
    """Write every generated page; return their paths."""
    docs.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, render in PAGES.items():
        (docs / name).write_text(render(), encoding="utf-8")
        paths.append(docs / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep.docgen", description="Write the generated reference docs.")
    parser.add_argument("--check", action="store_true", help="only check that docs/ is up to date (exit 1 if not)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        if stale:
            print(f"out of date: {', '.join(f'docs/{n}' for n in stale)}; run `make docs`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_pages():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

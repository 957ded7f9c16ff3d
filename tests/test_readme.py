"""Every command-line subcommand and flag is documented in README.md (as sqlite-utils checks its CLI docs)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from sweep.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_documented_in_the_readme():
    readme = README.read_text()
    missing = [name for name in _subcommands() if f"sweep {name}" not in readme]
    assert not missing, f"README.md lacks a `sweep <command>` line for {missing}"


def test_every_flag_of_every_subcommand_is_documented_in_the_readme():
    readme = README.read_text()
    missing = sorted({
        f"sweep {name} {option}"
        for name, parser in _subcommands().items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and not re.search(re.escape(option) + r"(?![\w-])", readme)
    })
    assert not missing, f"README.md does not mention {missing}"


def test_every_format_choice_is_documented():
    readme = README.read_text()
    report = _subcommands()["report"]
    formats = next(a for a in report._actions if "--format" in a.option_strings).choices
    assert all(f"`{fmt}`" in readme for fmt in formats)

"""The docs a newcomer walks: a short README that maps docs/, and reference pages generated from the code (as
sqlite-utils checks its CLI docs against its CLI)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from sweep import docgen
from sweep.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 10_000
"""Characters: the README says what sweep is, how to install and run it, and where the reference lives."""


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_generated_pages_are_up_to_date():
    assert docgen.stale_pages() == [], "docs/ is out of date: run `make docs`"


def test_every_subcommand_and_flag_is_in_the_command_line_reference():
    reference = (DOCS / "cli.md").read_text()
    for name, parser in _subcommands().items():
        assert f"## `sweep {name}`" in reference, name
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert re.search(r"`" + re.escape(option) + r"[ `]", reference), f"sweep {name} {option}"


def test_readme_is_short_and_maps_every_page_of_docs():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text):,} characters; move reference material to docs/"
    unlinked = [p.name for p in DOCS.glob("*.md") if f"(docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_readme_has_the_pip_install_line_and_its_first_commands_are_make_targets():
    text = README.read_text()
    assert "pip install -e ." in text
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    targets = re.findall(r"^make (\w+)", first_block, flags=re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert targets == ["sweep", "test"]
    assert all(re.search(rf"^{t}:", makefile, flags=re.M) for t in targets)


def test_docs_name_only_real_commands():
    commands = set(_subcommands())
    for page in [README, *DOCS.glob("*.md")]:
        named = set(re.findall(r"`sweep ([a-z]+)\b", page.read_text()))
        assert named <= commands, f"{page.name} names {sorted(named - commands)}"


def test_docs_links_point_to_existing_files():
    for page in [README, *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"

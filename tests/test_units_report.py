"""The report's sections for unit removals and layer-order edits, from a real sweep of a tiny model."""
from __future__ import annotations

import sqlite3

import pytest

from sweep.report import edits
from sweep.report.format import format_pct


@pytest.fixture(scope="module")
def swept_db(tiny_gpt2_dir, sample_text_file, tmp_path_factory):
    from sweep.config import SweepConfig
    from sweep.engine.runner import run_sweep

    tmp = tmp_path_factory.mktemp("units-report")
    common = dict(model=str(tiny_gpt2_dir), data=str(sample_text_file), db=str(tmp / "r.db"),
                  cache_dir=str(tmp / "cache"), max_length=64, max_tokens=512, latency="off")
    for strategy, unit in (("single", "block"), ("single", "mix"), ("combinations", "attn"),
                           ("repeat,swap,parallel", "block")):
        run_sweep(SweepConfig(**common, strategy=strategy, unit=unit, k="2"), log=lambda s: None, progress=False)
    run_sweep(SweepConfig(**common, strategy="explicit", remove="v0-2;r1-2"), log=lambda s: None, progress=False)
    return tmp / "r.db"


def _ppl(db, key: str) -> float:
    return sqlite3.connect(db).execute("select ppl from results where removed = ?", (key,)).fetchone()[0]


def test_report_has_unit_and_order_sections_with_the_stored_numbers(swept_db, tmp_path):
    from sweep.report import write_reports

    paths = write_reports(swept_db, tmp_path, figures=True)
    markdown = next(p for p in paths if p.suffix == ".md" and p.name != "index.md").read_text()
    base = _ppl(swept_db, "")
    assert "## Attention and MLP removal" in markdown and "## Layer order" in markdown
    units = markdown.split("## Attention and MLP removal")[1].split("\n## ")[0]
    attn_row = next(line for line in units.splitlines() if line.startswith("| 1 |"))
    for key in ("a1", "m1", "1"):
        assert format_pct(100 * (_ppl(swept_db, key) / base - 1)) in attn_row
    order = markdown.split("## Layer order")[1].split("\n## ")[0]
    order_row = next(line for line in order.splitlines() if line.startswith("| 1 |"))
    for key in ("1", "r1", "s1", "p1-2"):
        assert format_pct(100 * (_ppl(swept_db, key) / base - 1)) in order_row
    assert "`v0-2`" in order and "`r1-2`" in order  # in the table of other order edits
    assert "**Attention vs MLP.**" in markdown and "**Layer order.**" in markdown
    assert (tmp_path / next(p.name for p in paths if p.suffix == ".md" and p.name != "index.md")
            .replace(".md", "-units.png")).exists()
    single = markdown.split("## Single layer removal")[1].split("##")[0]
    assert "a1" not in single and "r1" not in single  # block sections read whole-block rows only


def test_best_units_table_takes_the_lowest_perplexity_per_size(swept_db):
    rows = [dict(zip(("removed", "n_removed", "ppl", "status"), r)) for r in sqlite3.connect(swept_db).execute(
        "select removed, n_removed, ppl, status from results")]
    blocks, others = edits.split_rows(rows)
    baseline = next(r for r in blocks if r["removed"] == "")
    text = edits.best_units_table(others, baseline)
    pairs = [r for r in others if r["n_removed"] == 2 and edits._kind(r) in edits.UNIT_KINDS]
    best = min(pairs, key=lambda r: r["ppl"])
    assert f"`{best['removed']}`" in text.splitlines()[3]


def test_csv_export_holds_unit_and_order_rows(swept_db, tmp_path):
    from sweep.report.export import export_rows

    content = "".join(p.read_text() for p in export_rows(swept_db, tmp_path / "rows", "csv"))
    assert ",a1," in content and ",r1," in content and ",p1-2," in content


def test_a_setup_of_unit_variants_alone_has_no_empty_block_sections(tiny_gpt2_dir, sample_text_file, tmp_path):
    from sweep.config import SweepConfig
    from sweep.engine.runner import run_sweep
    from sweep.report import write_reports

    db = tmp_path / "units.db"
    run_sweep(SweepConfig(model=str(tiny_gpt2_dir), data=str(sample_text_file), db=str(db),
                          cache_dir=str(tmp_path / "cache"), max_length=64, max_tokens=512, latency="off",
                          strategy="single", unit="attn"), log=lambda s: None, progress=False)
    text = next(p for p in write_reports(str(db), tmp_path / "out", figures=False) if p.name != "index.md").read_text()
    assert "## Attention and MLP removal" in text
    for block_section in ("## Single layer removal", "## Combinatorial removal", "## Best and worst per number",
                          "## Which differences are real"):
        assert block_section not in text

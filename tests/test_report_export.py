"""Several models in one DB: index page, csv/json export of the view, and the report's use of load_results."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from results_fixture import BASE_PPL, MODEL, make_results_db

import sweep
from sweep import store
from sweep.cli import main
from sweep.report import INDEX_NAME, export_rows, load_contexts, records, write_reports

SECOND = "org/second-6"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """Two models; the second has two setups (max_length 64 and 256), the newer one with singles only."""
    path = make_results_db(tmp_path_factory.mktemp("db") / "results.db")
    make_results_db(path, model=SECOND, max_removed=2, max_length=64)
    make_results_db(path, model=SECOND, max_removed=1, max_length=256)
    return path


def _view(db: Path, model: str, setup: str | None = None) -> list[dict]:
    return store.read_view(db, model=model, setup=setup)


def test_report_rows_are_load_results_rows_which_are_the_view(db):
    for ctx in load_contexts(db):
        expected = _view(db, ctx.model, ctx.setup)
        assert ctx.rows == expected
        assert records(sweep.load_results(db, model=ctx.model, setup=ctx.setup)) == expected
        assert list(ctx.frame.columns) == store.view_columns(db)


def test_index_lists_every_model_with_its_baseline_and_best_variants(db, tmp_path):
    paths = write_reports(db, tmp_path, figures=False)
    index = (tmp_path / INDEX_NAME).read_text()
    assert [p.name for p in paths] == ["org--critical-6.md", "org--second-6.md"]
    for path in paths:
        assert f"]({path.name})" in index
    assert index.count(f"| {BASE_PPL:.2f} |") == 2
    assert "1: `3` (+2.0 %)" in index and "2: `1,3` (+7.1 %)" in index  # best single and pair of the fixture


def test_index_is_not_rewritten_for_one_model(db, tmp_path):
    write_reports(db, tmp_path, model=MODEL, figures=False)
    assert not (tmp_path / INDEX_NAME).exists()


def test_setup_picks_an_older_setup_of_a_model(db, tmp_path):
    older = min((s for s in store.setups_overview(db) if s["model"] == SECOND), key=lambda s: s["max_length"])
    (path,) = write_reports(db, tmp_path, setup=older["setup"], figures=False)
    text = path.read_text()
    assert f"**Setup** `{older['setup']}`" in text and "## Pair interactions" in text  # pairs only in the older one
    assert "| 0,1 |" in text and "![" not in text  # figures off


def test_csv_export_has_the_view_rows_one_file_per_model(db, tmp_path):
    paths = export_rows(db, tmp_path, "csv")
    assert [p.name for p in paths] == ["org--critical-6.csv", "org--second-6.csv"]
    for ctx, path in zip(load_contexts(db), paths):
        exported = pd.read_csv(path, dtype={"removed": str}, keep_default_na=False, na_values=[""])
        assert list(exported.columns) == store.view_columns(db)
        view = _view(db, ctx.model, ctx.setup)
        assert list(exported["removed"].fillna("")) == [r["removed"] for r in view]
        assert list(exported["n_layers"]) == [r["n_layers"] for r in view]
        for got, row in zip(exported["ppl"], view):
            want = row["ppl"]
            assert (math.isnan(got) and want is None) or got == pytest.approx(want)


def test_json_export_to_stdout_has_every_selected_row(db, capsys):
    assert main(["report", "--db", str(db), "--format", "json", "--out", "-"]) == 0
    exported = json.loads(capsys.readouterr().out)
    expected = [r for ctx in load_contexts(db) for r in ctx.rows]
    assert [(r["model"], r["setup"], r["removed"]) for r in exported] == \
        [(r["model"], r["setup"], r["removed"]) for r in expected]
    diverged = next(r for r in exported if r["status"] == "diverged")
    assert diverged["ppl"] is None  # non-finite perplexity: null in JSON, status says why


def test_cli_csv_to_stdout_and_no_figures(db, tmp_path, capsys):
    assert main(["report", "--db", str(db), "--model", MODEL, "--format", "csv", "--out", "-"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert set(frame["model"]) == {MODEL}
    assert main(["report", "--db", str(db), "--out", str(tmp_path), "--no-figures"]) == 0
    assert not list(tmp_path.glob("*.png")) and (tmp_path / INDEX_NAME).exists()


def test_cli_rejects_an_unknown_format(db, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--db", str(db), "--format", "xml"])
    assert exit_info.value.code == 2
    assert "csv" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["md", "csv"])
def test_a_report_or_export_that_cannot_be_written_names_its_path(db, tmp_path, capsys, fmt):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    code = main(["report", "--db", str(db), "--out", str(blocked), "--format", fmt, "--model", MODEL, "--no-figures"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"sweep: error: cannot write {blocked}/") and len(err.splitlines()) == 1

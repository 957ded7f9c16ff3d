"""Reports are rendered from a small made-up results.db: no model, no torch."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import store
from sweep.errors import StoreError, UnknownNameError
from sweep.plan import parse_key, variant_key
from sweep.report import render_markdown, report_filename, report_text, write_reports
from sweep.report.sections import LONG_TABLE, PER_N_COLUMNS, SHOW_BEST, SHOW_WORST, VARIANT_COLUMNS

TINY = "org/tiny-4"
OTHER = "other/model-b"
N_LAYERS = 4
BLOCK_PARAMS = 1_000_000
EMBEDDING_PARAMS = 5_000_000

TINY_PPL = {  # made-up perplexities of the newest setup of TINY
    "": 25.0,
    "0": 1_234.5, "1": 30.0, "2": 27.5, "3": 40.0,
    "0,1": 12_345.6, "1,2": 45.0, "1,3": 80.0, "2,3": 60.0,
    "0,2": math.inf,  # diverged
    "0,3": None,  # failed
    "1,2,3": 300.0,
}
BASE_MS = 10.0


def _setup_fields(max_length: int) -> dict:
    return {"data": "wikitext-2-raw-v1", "data_fingerprint": "f00d", "data_tokens": 4096, "max_length": max_length,
            "stride": max_length, "max_tokens": 4096, "latency_seq": 128, "engine_version": "1"}


def _result(setup: str, removed: str, ppl: float | None, measured_at: str) -> dict:
    n_removed = len(parse_key(removed))
    row = {
        "setup_id": setup, "removed": removed, "n_removed": n_removed, "n_layers": N_LAYERS - n_removed,
        "params": EMBEDDING_PARAMS + BLOCK_PARAMS * (N_LAYERS - n_removed),
        "params_non_embedding": BLOCK_PARAMS * (N_LAYERS - n_removed),
        "nll_sum": None if ppl is None else 4096 * math.log(ppl), "n_tokens": 4096, "n_bytes": 20_000,
        "ppl": ppl, "bpb": None if ppl is None else 4096 * math.log(ppl) / (math.log(2) * 20_000),
        "prefill_ms": BASE_MS * (N_LAYERS - n_removed) / N_LAYERS, "prefill_iqr_ms": 0.25, "prefill_repeats": 20,
        "decode_ms_per_token": 2.0, "status": "ok", "device": "cpu", "measured_at": measured_at,
    }
    if ppl is None:
        row.update(status="failed", error="CUDA out of memory. Tried to allocate 2.00 GiB | more text", ppl=None,
                   prefill_ms=None, decode_ms_per_token=None)
    elif math.isinf(ppl):
        row.update(status="diverged", error="perplexity is inf")
    return row


@pytest.fixture(scope="module")
def results_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY with an old setup (2 results) and a new one (all of TINY_PPL); OTHER with singles but no baseline.

    Built once per module: reports only read it.
    """
    path = tmp_path_factory.mktemp("db") / "results.db"
    db = store.open_db(path)
    tiny = store.upsert_model(db, TINY, None, "float32", N_LAYERS, "GPT2LMHeadModel")
    old = store.upsert_setup(db, tiny, _setup_fields(256))
    for key in ("", "1"):
        store.record_result(db, _result(old, key, 99.0, "2024-01-01T00:00:00+00:00"))
    new = store.upsert_setup(db, tiny, _setup_fields(512))
    for key, ppl in TINY_PPL.items():
        store.record_result(db, _result(new, key, ppl, "2024-02-01T00:00:00+00:00"))
    other = store.upsert_model(db, OTHER, "main", "bfloat16", N_LAYERS, "LlamaForCausalLM")
    other_setup = store.upsert_setup(db, other, _setup_fields(512))
    for key in ("0", "1"):
        store.record_result(db, _result(other_setup, key, 50.0, "2024-02-01T00:00:00+00:00"))
    db.close()
    return path


def _setup_ids(path: Path) -> dict[int, str]:
    return {row["max_length"]: row["setup"] for row in store.setups_overview(path) if row["model"] == TINY}


def _tiny_report(results_db: Path, tmp_path: Path, **kwargs) -> str:
    (path,) = write_reports(results_db, tmp_path / "reports", model=TINY, figures=False, **kwargs)
    return path.read_text()


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def _header(section: str) -> str:
    return next(line for line in section.splitlines() if line.startswith("| "))


def test_writes_one_report_per_model_with_safe_names(results_db, tmp_path):
    paths = write_reports(results_db, tmp_path / "reports", figures=False)
    assert [p.name for p in paths] == ["org--tiny-4.md", "other--model-b.md"]
    assert all(p.parent == tmp_path / "reports" and p.exists() for p in paths)
    assert paths[0].read_text().startswith(f"# Layer removal: {TINY}\n")
    assert report_text(paths) == paths[0].read_text() + "\n---\n\n" + paths[1].read_text()


def test_report_filename_is_filesystem_safe():
    assert report_filename("org/name") == "org--name.md"
    assert report_filename("/home/me/my model") == "me--my_model.md"  # local paths: last two parts
    assert report_filename(".cache/demo/model") == "demo--model.md"


def test_tables_have_the_exact_column_headers(results_db, tmp_path):
    text = _tiny_report(results_db, tmp_path)
    variant_header = "| " + " | ".join(VARIANT_COLUMNS) + " |"
    assert variant_header == ("| layers removed | layers | perplexity (↓) | speed (ms) ↓ | parameters (M) "
                              "| ppl change (%) [95 % interval] | speed change (%) |")
    assert _header(_section(text, "Single layer removal")) == variant_header
    assert _header(_section(text, "Combinatorial removal")) == variant_header
    per_n = _section(text, "Best and worst per number of removed layers")
    assert _header(per_n) == "| " + " | ".join(PER_N_COLUMNS) + " |"
    assert _header(per_n) == "| layers removed (n) | variants | best | best ppl | worst | worst ppl |"


def test_single_removal_table_lists_each_layer_once_in_order(results_db, tmp_path):
    rows = _table_rows(_section(_tiny_report(results_db, tmp_path), "Single layer removal"))
    assert [r[0] for r in rows] == ["none", "0", "1", "2", "3"]
    assert [r[1] for r in rows] == ["4", "3", "3", "3", "3"]


def test_combinatorial_table_holds_only_two_or_more_removed(results_db, tmp_path):
    rows = _table_rows(_section(_tiny_report(results_db, tmp_path), "Combinatorial removal"))
    expected = {k for k in TINY_PPL if len(parse_key(k)) >= 2}
    assert rows[0][0] == "none"
    assert {r[0] for r in rows[1:]} == expected and len(rows) == len(expected) + 1


def test_best_and_worst_per_n_match_the_fixture(results_db, tmp_path):
    rows = _table_rows(_section(_tiny_report(results_db, tmp_path), "Best and worst per number of removed layers"))
    for n, row in zip((1, 2, 3), rows):
        # Diverged (inf) is worse than any measured perplexity; failed (None) is not ranked.
        measured = {k: v for k, v in TINY_PPL.items() if len(parse_key(k)) == n and v is not None}
        best, worst = min(measured, key=measured.get), max(measured, key=measured.get)
        assert row[0] == str(n)
        assert (row[2], row[4]) == (best, worst)
    assert rows[1][1] == "6 (1 diverged, 1 failed)"
    assert rows[1][5] == "diverged" and rows[0][3] == "27.50"


def test_changes_are_signed_percentages(results_db, tmp_path):
    rows = {r[0]: r for r in _table_rows(_section(_tiny_report(results_db, tmp_path), "Single layer removal"))}
    assert rows["none"][5:] == ["+0.00 %", "+0.00 %"]
    assert rows["1"][5] == "+20.0 %"  # 30 / 25
    assert rows["1"][6] == "-25.0 %"  # 3 of 4 layers
    assert rows["0"][5] == "+4,838 %"  # no decimals from 100 % up


def test_big_numbers_have_thousands_separators(results_db, tmp_path):
    text = _tiny_report(results_db, tmp_path)
    combos = {r[0]: r for r in _table_rows(_section(text, "Combinatorial removal"))}
    assert combos["0,1"][2] == "12,345.6"
    assert combos["0,1"][4] == "7.000"  # parameters in millions


def test_diverged_and_failed_rows_are_shown(results_db, tmp_path):
    combos = {r[0]: r for r in _table_rows(_section(_tiny_report(results_db, tmp_path), "Combinatorial removal"))}
    assert combos["0,2"][2] == "diverged"
    assert combos["0,3"][2].startswith("failed: CUDA out of memory")
    assert combos["0,3"][3] == "—"  # no speed measured


def test_baseline_section_has_the_baseline_numbers(results_db, tmp_path):
    baseline = _section(_tiny_report(results_db, tmp_path), "Baseline")
    assert "- perplexity: 25.00" in baseline
    assert "- prefill speed: 10.00 ms (IQR 0.25 ms)" in baseline
    assert "- decode: 2.00 ms/token" in baseline
    assert "- parameters: 9.000 M (4.000 M without embeddings)" in baseline
    assert "bits per byte" in baseline


def test_newest_setup_is_used_and_others_are_listed(results_db, tmp_path):
    setups = _setup_ids(results_db)
    text = _tiny_report(results_db, tmp_path)
    assert f"**Setup** `{setups[512]}`" in text and "max_length 512" in text
    assert f"other setups: `{setups[256]}`" in text


def test_setup_argument_selects_an_older_setup(results_db, tmp_path):
    setups = _setup_ids(results_db)
    text = _tiny_report(results_db, tmp_path, setup=setups[256])
    assert f"**Setup** `{setups[256]}`" in text and "max_length 256" in text
    assert [r[0] for r in _table_rows(_section(text, "Single layer removal"))] == ["none", "1"]
    assert "Combinatorial removal" in text and "No removals of two or more layers" in text


def test_unknown_model_or_setup_lists_the_valid_ones(results_db, tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'org/tiny-4'"):
        write_reports(results_db, tmp_path, model="org/tiny4")
    with pytest.raises(UnknownNameError, match="unknown setup 'nope'"):
        write_reports(results_db, tmp_path, model=TINY, setup="nope")


def test_missing_database_raises_store_error(tmp_path):
    with pytest.raises(StoreError):
        write_reports(tmp_path / "absent.db", tmp_path)


def test_missing_baseline_still_renders(results_db, tmp_path):
    (path,) = write_reports(results_db, tmp_path, model=OTHER, figures=False)
    text = path.read_text()
    assert "No baseline" in text
    rows = _table_rows(_section(text, "Single layer removal"))
    assert [r[0] for r in rows] == ["0", "1"] and rows[0][5] == "—"


def test_setup_without_results_still_renders(tmp_path):
    db = store.open_db(tmp_path / "results.db")
    store.upsert_setup(db, store.upsert_model(db, "empty/model", None, "float32", 4, "X"), _setup_fields(128))
    db.close()
    (path,) = write_reports(tmp_path / "results.db", tmp_path, figures=False)
    assert "No results for this setup yet" in path.read_text()
    assert render_markdown([]).startswith("# Layer removal:")


def test_long_combinatorial_table_keeps_best_and_worst_and_gives_sql():
    n_layers = 16
    rows = [{**_view_row("", 10.0, n_layers)}]
    pairs = [(i, j) for i in range(n_layers) for j in range(i + 1, n_layers)][: LONG_TABLE + 10]
    rows += [_view_row(variant_key(p), 20.0 + k, n_layers) for k, p in enumerate(pairs)]
    text = render_markdown(rows)
    table = _table_rows(_section(text, "Combinatorial removal"))
    shown = [r[0] for r in table if r[0] not in ("none",) and not r[0].startswith("…")]
    assert shown == [variant_key(p) for p in pairs[:SHOW_BEST] + pairs[-SHOW_WORST:]]
    omitted = len(pairs) - SHOW_BEST - SHOW_WORST
    assert f"{omitted} are omitted" in text and f"… {omitted} more …" in text
    assert "FROM results_vs_baseline" in _section(text, "Combinatorial removal")


def _view_row(removed: str, ppl: float, n_layers: int) -> dict:
    n_removed = len(parse_key(removed))
    return {"model": "m", "setup": "s", "removed": removed, "n_removed": n_removed, "n_layers": n_layers - n_removed,
            "ppl": ppl, "speed_ms": 1.0, "params": 1_000_000, "ppl_change_pct": None, "speed_change_pct": None,
            "status": "ok", "error": None, "measured_at": None}


def test_footer_explains_the_numbers_and_gives_sql(results_db, tmp_path):
    footer = _section(_tiny_report(results_db, tmp_path), "How these numbers were produced")
    assert "exp(NLL sum / tokens)" in footer and "4,096 scored tokens" in footer
    assert "median" in footer and "FROM results_vs_baseline" in footer


def test_report_module_imports_neither_torch_nor_sql():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, sweep.report; assert 'torch' not in sys.modules, 'sweep.report imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    for path in (root / "sweep" / "report").glob("*.py"):
        source = path.read_text()
        assert "import sqlite3" not in source and ".execute(" not in source, path


# ------------------------------------------------------------------------------------------ user text in names


def _db_of_models(path: Path, names: list[str]) -> Path:
    """One setup of singles (baseline included) per model name, with TINY's perplexities."""
    db = store.open_db(path)
    for name in names:
        model = store.upsert_model(db, name, None, "float32", N_LAYERS, "GPT2LMHeadModel")
        setup = store.upsert_setup(db, model, _setup_fields(512))
        for key in ("", "0", "1", "2", "3"):
            store.record_result(db, _result(setup, key, TINY_PPL[key], "2024-02-01T00:00:00+00:00"))
    db.close()
    return path


MATH_NAME = "/data/models/m $\\frac{1}{$ x"
"""A model directory whose name matplotlib's mathtext cannot parse (it used to stop every report)."""
HTML_NAME = "/data/models/<img src=x onerror=alert(1)>"


def test_model_names_are_never_markup_in_figures_or_markdown(tmp_path, capsys):
    from sweep.cli import main

    db = _db_of_models(tmp_path / "r.db", [MATH_NAME, HTML_NAME, TINY])
    out = tmp_path / "reports"
    assert main(["report", "--db", str(db), "--out", str(out)]) == 0, capsys.readouterr().err
    reports = {p.name: p.read_text() for p in out.glob("*.md") if p.name != "index.md"}
    assert len(reports) == 3 and (out / "index.md").exists()
    assert len(list(out.glob("*.png"))) >= 3 * 2  # every model's figures were drawn, the $-name's included
    math_report = next(text for text in reports.values() if "frac" in text.splitlines()[0])
    assert math_report.splitlines()[0] == "# Layer removal: /data/models/m \\$\\\\frac\\{1\\}\\{\\$ x"
    html_report = next(text for text in reports.values() if "onerror" in text.splitlines()[0])
    assert "<img" not in html_report.splitlines()[0] and "&lt;img src=x onerror=alert\\(1\\)&gt;" in html_report
    index = (out / "index.md").read_text()
    assert "<img" not in index and "&lt;img" in index and "\\$\\\\frac" in index


def test_models_with_the_same_directory_name_get_their_own_reports(tmp_path):
    names = ["/x/models/m", "/y/models/m"]
    db = _db_of_models(tmp_path / "r.db", names)
    paths = write_reports(db, tmp_path / "reports", figures=False)
    assert len({p.name for p in paths}) == 2  # both written, neither overwriting the other
    assert [p.read_text().splitlines()[0] for p in paths] == [f"# Layer removal: {name}" for name in names]
    index = (tmp_path / "reports" / "index.md").read_text()
    links = {line.split("](", 1)[1].split(")", 1)[0] for line in index.splitlines() if "](" in line}
    assert links == {p.name for p in paths}

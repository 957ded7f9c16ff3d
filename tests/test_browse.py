"""`sweep browse`: the metadata comes from the schema, every canned query agrees with the Python that answers the
same question for the report (on made-up databases with ties, diverged and failed rows), and Datasette serves
them read-only, also while a sweep writes."""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from results_fixture import MODEL, make_results_db
import sweep
from sweep import ranking, store
from sweep.cli import main
from sweep.errors import ConfigError
from sweep.extras import browse
from sweep.plan import variant_key
from sweep.report import analysis
from sweep.report.sections import best_and_worst
from sweep.report.signals import strategy_points
from sweep.store.schema import TABLES, VIEWS

FOUR = "org/four"
"""Model of :func:`exhaustive_db`: 4 layers, every subset measured, stored strategy choices."""
QUERIES = {q.name: q for q in browse.CANNED_QUERIES}


def run(db: Path, name: str, **params: str) -> list[dict]:
    """The rows of canned query ``name`` (form fields left out = empty, as Datasette sends them)."""
    query = QUERIES[name]
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(query.sql, {p: params.get(p, "") for p in query.params})]
    finally:
        conn.close()


def exhaustive_db(path: Path, seed: int) -> Path:
    """4 layers, all 16 variants; perplexities and times rounded so that ties occur; one diverged, one failed
    (unless the seed leaves them out); angular and greedy choices (one chose a failed variant)."""
    rng = random.Random(seed)
    db = store.open_db(path)
    model_id = store.upsert_model(db, FOUR, None, "float32", 4, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "text", "data_fingerprint": "f", "data_tokens": 999,
                                              "max_length": 64, "stride": 64, "weights": "w1", "engine_version": "1"})
    variants = [c for k in range(5) for c in itertools.combinations(range(4), k)]
    broken = rng.sample(variants[1:], 2) if seed % 3 else []
    for removed in variants:
        kept = 4 - len(removed)
        ppl = round(20 * math.prod(rng.choice([1.0, 1.1, 1.5, 3.0]) for _ in removed), 1)
        row = {"setup_id": setup, "removed": variant_key(removed), "n_removed": len(removed), "n_layers": kept,
               "params": 1_000_000 * (2 + kept), "ppl": ppl, "nll_sum": math.log(ppl) * 100, "n_tokens": 100,
               "prefill_ms": rng.choice([None, 1.0 + kept, 1.5 + kept]) if removed else 6.0, "status": "ok"}
        if broken and removed == broken[0]:
            row.update(status="diverged", ppl=math.inf)
        if broken and removed == broken[1]:
            row.update(status="failed", ppl=None, prefill_ms=None, error="out of memory")
        store.record_result(db, row)
    key = {"model_id": model_id, "weights": "w1", "calib_fingerprint": "c"}
    choices = [{"strategy": s, "signal": "x", "n": n, "removed": variant_key(rng.sample(range(4), n)), "score": 1.0}
               for s in ("angular", "greedy") for n in (1, 2, 3)]
    store.record_strategy_choices(db, key, choices + [{"strategy": "angular", "signal": "y", "n": 4,
                                                       "removed": "0,1,2,3", "score": 1.0}])
    db.close()
    return path


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    """results_fixture's 6-layer model (singles, pairs and triples; one diverged and one failed pair)."""
    return make_results_db(tmp_path_factory.mktemp("browse") / "results.db")


# ---------------------------------------------------------------------------------------------- metadata


def test_metadata_describes_every_table_view_and_column_from_the_schema():
    meta = browse.metadata("results", "sweep: results.db")
    tables = meta["databases"]["results"]["tables"]
    for item in (*TABLES, *VIEWS):
        assert tables[item.name]["description"] == item.doc
        assert tables[item.name]["columns"] == {c.name: c.description for c in item.columns}
    speed = tables["results_vs_baseline"]["columns"]["speed_ms"]
    assert "unit: ms" in speed and "lower is better" in speed
    assert "unit: %" in tables["results_vs_baseline"]["columns"]["ppl_change_pct"]


def test_every_output_column_of_every_canned_query_is_described(fixture_db):
    conn = sqlite3.connect(f"file:{fixture_db}?mode=ro", uri=True)
    for query in browse.CANNED_QUERIES:
        cursor = conn.execute(query.sql, {p: "" for p in query.params})
        names = [d[0] for d in cursor.description]
        assert names == browse.output_columns(query.select), query.name
        described = browse.query_metadata(query)["description_html"]
        assert all(f"<code>{name}</code>" in described for name in names), query.name
    conn.close()


def test_canned_queries_ask_for_model_setup_and_n():
    assert QUERIES["best-and-worst"].params == ["model", "setup", "n"]
    assert QUERIES["compare-setups"].params == ["model", "setup", "other", "n"]
    assert QUERIES["variant"].params == ["model", "setup", "removed"]
    meta = browse.metadata("results", "t")["databases"]["results"]["queries"]
    assert all(meta[q.name]["params"] == q.params for q in browse.CANNED_QUERIES)


# ---------------------------------------------------------------------------------------------- the answers


@pytest.mark.parametrize("cost", ["speed_ms", "params"])
def test_pareto_queries_agree_with_ranking_pareto_front(fixture_db, tmp_path, cost):
    name = {"speed_ms": "pareto-speed", "params": "pareto-params"}[cost]
    for db, model in [(fixture_db, MODEL)] + [(exhaustive_db(tmp_path / f"{s}.db", s), FOUR) for s in range(6)]:
        rows = store.read_view(db, model=model)
        expected = [rows[i]["removed"] for i in ranking.pareto_front(rows, cost)]
        assert [r["removed"] for r in run(db, name, model=model)] == expected
        assert len(expected) >= 2


def test_best_and_worst_agrees_with_the_report(fixture_db, tmp_path):
    for db, model in [(fixture_db, MODEL)] + [(exhaustive_db(tmp_path / f"{s}.db", s), FOUR) for s in range(6)]:
        expected = best_and_worst(store.read_view(db, model=model))
        found = {r["n_removed"]: (r["best"], r["worst"]) for r in run(db, "best-and-worst", model=model)}
        assert found == {n: (b and b["removed"], w and w["removed"]) for n, (b, w) in expected.items()}
    one = run(fixture_db, "best-and-worst", n="2")
    assert [r["n_removed"] for r in one] == [2] and one[0]["worst_status"] == "diverged"
    assert (one[0]["diverged"], one[0]["failed"]) == (1, 1)


def test_pair_interactions_agree_with_analysis(fixture_db):
    expected = analysis.pair_interactions(sweep.load_results(fixture_db, model=MODEL))
    found = run(fixture_db, "pair-interactions")
    assert sorted(r["removed"] for r in found) == sorted(expected["removed"])
    by_key = {r["removed"]: r["interaction_pp"] for r in found}
    for key, interaction in zip(expected["removed"], expected["interaction"]):
        assert by_key[key] == pytest.approx(interaction, abs=0.006)  # shown rounded to 2 decimals
    strengths = [abs(r["interaction_pp"]) for r in found]
    assert strengths == sorted(strengths, reverse=True)
    assert found[0]["removed"] == max(zip(expected["interaction"].abs(), expected["removed"]))[1]


def test_strategies_agree_with_strategy_points(fixture_db, tmp_path):
    for db, model in [(fixture_db, MODEL)] + [(exhaustive_db(tmp_path / f"{s}.db", s), FOUR) for s in range(6)]:
        rows = store.read_view(db, model=model)
        choices = store.read_strategy_choices(db, rows[0]["setup"])
        expected = {(name, n, key): ppl
                    for name, points in strategy_points(rows, choices).items() for n, (key, ppl) in points.items()}
        found = run(db, "strategies-vs-oracle", model=model)
        assert {(r["strategy"], r["n_removed"], r["removed"]): r["ppl"] for r in found} == pytest.approx(
            expected, abs=5e-4)
        for row in found:
            if row["oracle_ppl"] is not None:
                assert row["gap_to_oracle_pct"] == pytest.approx(100 * (row["ppl"] / row["oracle_ppl"] - 1), abs=0.01)
    assert {r["strategy"] for r in run(tmp_path / "1.db", "strategies-vs-oracle")} >= {"angular", "greedy", "oracle"}


def _backdate(db: Path, setup: str, created_at: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE setups SET created_at = ? WHERE id = ?", [created_at, setup])


def _add_setup(db: Path, model: str, max_length: int, created_at: str, keys: tuple[str, ...] = ("", "0")) -> str:
    handle = store.open_db(db)
    model_id = store.upsert_model(handle, model, None, "float32", 6, "GPT2LMHeadModel")
    setup = store.upsert_setup(handle, model_id, {"data": "d", "max_length": max_length, "engine_version": "1"})
    for key in keys:
        n = len(key.split(",")) if key else 0
        store.record_result(handle, {"setup_id": setup, "removed": key, "n_removed": n, "n_layers": 6 - n,
                                     "ppl": 10.0 + n + max_length / 1000, "status": "ok", "params": 100 - n})
    handle.close()
    _backdate(db, setup, created_at)
    return setup


def test_empty_setup_means_the_newest_setup_as_ranking_chooses_it(tmp_path):
    db = tmp_path / "setups.db"
    old = _add_setup(db, "m", 16, "2024-01-01T00:00:00+00:00")
    newer = _add_setup(db, "m", 32, "2024-02-01T00:00:00+00:00")
    _add_setup(db, "m", 64, "2024-03-01T00:00:00+00:00", keys=())  # newest, but without results
    _add_setup(db, "other", 16, "2025-01-01T00:00:00+00:00")
    overview = store.setups_overview(db)
    for model in ("m", "other", ""):
        expected = ranking.newest_setup(overview, model or None)["setup"]
        assert run(db, "compare-setups", model=model)[0]["setup_a"] == expected
    assert run(db, "compare-setups", model="m")[0]["setup_b"] == old  # the newest other setup of m with results
    side_by_side = run(db, "compare-setups", model="m", setup=old, other=newer)
    assert side_by_side[0]["ppl_b_vs_a_pct"] == pytest.approx(100 * (10.032 / 10.016 - 1), abs=0.01)
    newest = [r for r in run(db, "setups", model="m") if r["newest"]]
    assert [r["setup"] for r in newest] == [newer]


def test_variant_record_lists_every_results_column_with_its_meaning(fixture_db):
    record = run(fixture_db, "variant", model=MODEL, removed="1,3")
    handle = store.open_db(fixture_db, create=False)
    stored = store.find_result(handle, store.setups_overview(handle)[0]["setup"], "1,3")
    handle.close()
    values = {r["column"]: r["value"] for r in record}
    assert {k: values[k] for k in stored} == stored
    assert values["ppl_change_pct"] == pytest.approx(100 * (stored["ppl"] / 20.0 - 1))
    assert "unit: ms" in next(r["meaning"] for r in record if r["column"] == "prefill_ms")
    assert {r["column"]: r["value"] for r in run(fixture_db, "variant")}["n_removed"] == 0  # empty key: baseline


def test_tasks_against_perplexity_pairs_accuracy_with_the_variants_perplexity(fixture_db, tmp_path):
    db = make_results_db(tmp_path / "tasks.db")
    handle = store.open_db(db)
    model_id = store.upsert_model(handle, MODEL, None, "float32", 6, "GPT2LMHeadModel")
    task_setup = store.upsert_task_setup(handle, model_id, {"task": "arc_easy", "num_fewshot": 0})
    for key, value in [("", 0.60), ("3", 0.55), ("1,3", 0.50)]:
        store.record_task_result(handle, {"setup_id": task_setup, "removed": key, "n_removed": len(key.split(","))
                                          if key else 0, "metric": "acc", "value": value, "status": "ok"})
    handle.close()
    rows = {r["removed"]: r for r in run(db, "tasks-vs-perplexity")}
    ppl = {r["removed"]: r["ppl"] for r in store.read_view(db)}
    assert set(rows) == {"", "3", "1,3"}
    assert all(rows[k]["ppl"] == pytest.approx(ppl[k], abs=5e-4) for k in rows)
    assert rows["1,3"]["value_change"] == pytest.approx(-0.10)
    assert [r["removed"] for r in run(db, "tasks-vs-perplexity", n="1")] == ["3"]


# ---------------------------------------------------------------------------------------------- the command


def test_browse_without_the_extra_names_it(monkeypatch, capsys, fixture_db):
    monkeypatch.setitem(sys.modules, "datasette", None)  # import datasette -> ImportError
    assert main(["browse", "--db", str(fixture_db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sweep: error:") and "pip install 'sweep[browse]'" in err and "\n" not in err


def test_browse_without_a_database_says_so(capsys, tmp_path):
    pytest.importorskip("datasette", reason="needs the browse extra: pip install 'sweep[browse]'")
    assert main(["browse", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no results database" in capsys.readouterr().err


def test_a_taken_port_is_a_config_error():
    taken = browse.bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="--port"):
            browse.bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_datasette_serves_the_metadata_queries_and_charts_from_local_files(fixture_db):
    pytest.importorskip("datasette_dashboards", reason="needs the browse extra: pip install 'sweep[browse]'")
    import asyncio

    datasette = browse.open_datasette(fixture_db)

    async def get(path: str):
        return await datasette.client.get(path)

    table = asyncio.run(get("/results/results_vs_baseline"))
    assert table.status_code == 200 and "median prefill time at batch 1 (unit: ms; lower is better)" in table.text
    best = asyncio.run(get(f"/results/best-and-worst.json?_shape=array&model={MODEL}"))
    assert [r["best"] for r in best.json()] == ["3", "1,3", "1,3,5"]
    page = asyncio.run(get(f"/-/dashboards/{browse.DASHBOARD}"))
    assert page.status_code == 200 and "vega-lite.min.js" in page.text
    scripts = [s for s in page.text.split("<script")[1:] if "src=" in s.split(">")[0]]
    assert scripts and not any("http" in s.split(">")[0] for s in scripts)  # no JavaScript from the internet
    vega = asyncio.run(get("/-/static-plugins/datasette_dashboards/vega-lite.min.js"))
    assert vega.status_code == 200 and len(vega.text) > 100_000
    assert json.loads(asyncio.run(get("/-/metadata.json")).text)["title"] == "sweep: results.db"
    from datasette.utils import tilde_encode

    for name in ("results", "demo.v2", "my results", "a-b_c", "é"):
        assert browse.database_route(name) == tilde_encode(name)


# ---------------------------------------------------------------------------------------------- a real server

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 90
"""Generous: importing Datasette takes seconds on a busy machine (a limit, not a timing claim)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


class Server:
    """`sweep browse` in a subprocess on a free port; ``stop()`` sends Ctrl-C and returns (code, stdout, stderr)."""

    def __init__(self, db: Path, *prefix: str):
        pytest.importorskip("datasette_dashboards", reason="needs the browse extra: pip install 'sweep[browse]'")
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", "sweep", "browse", "--db", str(db),
                                         "--port", self.url.rsplit(":", 1)[1]], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_SECONDS
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                _get(self.url + "/-/versions.json")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"sweep browse did not start: {self.stop()}")

    def stop(self) -> tuple[int, str, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


WRITER = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from results_fixture import N_LAYERS, result_row, variants
from sweep import store
db = store.open_db({db!r})
model_id = store.upsert_model(db, "org/written-while-browsing", None, "float32", N_LAYERS, "GPT2LMHeadModel")
setup = store.upsert_setup(db, model_id, {{"data": "d", "max_length": 256, "engine_version": "1"}})
todo = variants(3)
for start in range(0, len(todo), 14):  # 3 batches; after each, wait until the reader has checked it
    for removed in todo[start:start + 14]:
        store.record_result(db, result_row(setup, removed))
        time.sleep(0.02)
    print(start + 14, flush=True)
    sys.stdin.readline()
"""
COUNT = "/results.json?_shape=array&sql=select+count(*)+as+n+from+results"
PAGES = ("/results/best-and-worst.json?model=org/written-while-browsing", "/results/pareto-speed.json",
         "/results/results_vs_baseline.json?_sort=ppl", f"/-/dashboards/{browse.DASHBOARD}")


def _poll(url: str, stop: threading.Event, seen: list) -> None:
    """Read pages as fast as the server answers until ``stop``: (status, count) or the error of each try."""
    while not stop.is_set():
        try:
            status, body = _get(url + COUNT)
            seen.append((status, json.loads(body)[0]["n"]))
            seen.extend((_get(url + page)[0], None) for page in PAGES)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding of this test
            seen.append((repr(exc), None))


@pytest.mark.slow
def test_browsing_reads_while_a_sweep_writes_and_stops_on_ctrl_c(tmp_path):
    db = make_results_db(tmp_path / "results.db")  # 42 rows
    server = Server(db)
    seen: list = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(server.url, stop, seen))
    try:
        writer = subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(Path(__file__).parent),
                                   root=str(ROOT), db=str(db))], text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        poller.start()
        visible = []
        for line in writer.stdout:  # each batch is committed: the next page shows all of it
            visible.append((42 + int(line), json.loads(_get(server.url + COUNT)[1])[0]["n"]))
            writer.stdin.write("\n")
            writer.stdin.flush()
        writer.stdin.close()
        writer.wait(timeout=60)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(timeout=60)
        code, server_out, server_err = server.stop()
    assert (writer.returncode, writer.stderr.read()) == (0, "")
    assert visible == [(56, 56), (70, 70), (84, 84)]
    assert seen and {status for status, _ in seen} == {200}, [s for s in seen if s[0] != 200][:3]
    counts = [n for _, n in seen if n is not None]
    assert counts == sorted(counts) and 42 <= counts[0] and counts[-1] <= 84
    assert code == 0 and "Traceback" not in server_err and "stopped" in server_out, server_err


@pytest.mark.slow
def test_a_wal_database_in_a_directory_nobody_may_write_is_a_one_line_error(tmp_path):
    pytest.importorskip("datasette", reason="needs the browse extra: pip install 'sweep[browse]'")
    folder = Path(tempfile.mkdtemp(prefix="sweep-readonly-"))
    try:
        db = make_results_db(folder / "results.db")  # closed: no -wal or -shm file beside it
        folder.chmod(0o555)
        prefix: list[str] = []
        if os.geteuid() == 0:  # root writes anywhere: run as nobody
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop the right to write the directory")
            prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([*prefix, sys.executable, "-m", "sweep", "browse", "--db", str(db), "--port",
                               str(_free_port())], env=env, text=True, capture_output=True, timeout=STARTUP_SECONDS)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("sweep: error: cannot read") and done.stderr.count("\n") == 1, done.stderr
    assert "not writable" in done.stderr


def _chrome():
    """Headless Chromium driven by Selenium through the system's chromedriver, or skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def _centre(element) -> tuple[int, int]:
    rect = element.rect
    return round(rect["x"] + rect["width"] / 2), round(rect["y"] + rect["height"] / 2)


def _variant_of(point) -> str:
    """The variant a chart point stands for, from the description Vega gives it for screen readers."""
    return point.get_attribute("aria-label").split("layers removed: ")[1].split(";")[0]


@pytest.mark.slow
def test_canned_queries_and_charts_render_in_a_real_browser(fixture_db):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    server = Server(fixture_db)
    try:
        browser.get(f"{server.url}/results/best-and-worst?model={MODEL}")
        best = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.rows-and-columns td.col-best")]
        assert best == [b["removed"] for b, _ in best_and_worst(store.read_view(fixture_db)).values()]

        browser.get(f"{server.url}/results/pareto-speed")
        rows = store.read_view(fixture_db)
        front = [rows[i]["removed"] for i in ranking.pareto_front(rows, "speed_ms")]
        assert [td.text.strip() for td in browser.find_elements(By.CSS_SELECTOR, "td.col-removed")] == front

        browser.get(f"{server.url}/-/dashboards/{browse.DASHBOARD}")
        points = "#chart-pareto-speed svg .mark-symbol.role-mark path"  # not the legend's symbols
        measured = sum(ranking.is_measured(r) and r["speed_ms"] is not None for r in rows)
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, points)) == measured)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-singles svg .mark-rect.role-mark path")) == 6
        shown = browser.find_elements(By.CSS_SELECTOR, points)
        point = shown[len(shown) // 2]
        ActionChains(browser).move_to_element(point).perform()
        tooltip = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "vg-tooltip-element"))
        under_pointer = {_variant_of(p) for p in shown if _centre(p) == _centre(point)}  # points may coincide
        assert any(f"layers removed\t\n{v}\n" in tooltip.get_attribute("innerText") for v in under_pointer)
    finally:
        browser.quit()
        code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err, err


def test_the_report_names_sweep_browse_and_every_canned_query(fixture_db):
    from sweep.report import render_markdown
    from sweep.report.sections import BROWSE_QUERIES

    assert BROWSE_QUERIES == tuple(q.name for q in browse.CANNED_QUERIES)
    text = render_markdown(store.read_view(fixture_db))
    assert "`sweep browse" in text and all(f"`{q.name}`" in text for q in browse.CANNED_QUERIES)
    assert f"/-/dashboards/{browse.DASHBOARD}" in text

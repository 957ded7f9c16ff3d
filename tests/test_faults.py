"""Faults at the edges: kills, signals, worker deaths, OOM, NaN, races, a full disk, slow work, bad files.

The scenarios of the campaign (``bench/reliability.py``, `make reliability`) run real ``python -m sweep run``
processes on a 6-layer tiny model (64 variants) and audit the DB: nothing lost, no duplicate row, no completed
variant measured twice, no run left ``running``, integrity ok, the final row count equal to the plan, and each
scenario's own checks (exit codes, refusals for the right reason). The multi-process ones are marked slow; the
rules behind them (liveness, the WAL switch, SQLite errors, the runner's bookkeeping) are tested in process here.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import GPT2_TOKENIZER, WIKITEXT_TEST, need_shared
from sweep import store
from sweep.cli import main
from sweep.config import SweepConfig
from sweep.errors import ConfigError, StoreError
from sweep.store import runs as store_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    reliability.make_fixture(out)
    return out


def statuses(db: Path) -> dict[str, str]:
    return dict(sqlite3.connect(db).execute("SELECT removed, status FROM results"))


def assert_clean(figures: reliability.Figures) -> None:
    assert (figures.lost, figures.duplicates, figures.remeasured, figures.running) == (0, 0, 0, 0), figures
    assert figures.integrity == "ok", figures
    assert figures.variants == figures.planned, figures
    assert not figures.failed_checks, figures
    assert figures.clean


def quick_args(work: Path, db: Path, *extra: str) -> list[str]:
    """`sweep run` arguments of the campaign's plan, in process (no python -m sweep)."""
    model_dir, text = reliability.make_fixture(work)
    return reliability.sweep_args(model_dir, text, db, work / "cache", *extra)[3:]


# ---------------------------------------------------------------------------------------------- campaign scenarios


@pytest.mark.slow
@pytest.mark.xdist_group("sweep-processes")  # one sweep process at a time; worker-process tests run beside
def test_kill_9_of_the_coordinator_loses_nothing_and_measures_nothing_twice(work):
    figures = reliability.coordinator_kills(work, kills=2, seed=1)  # `make reliability` kills 20 times
    assert_clean(figures)
    assert figures.kills >= 1
    assert set(statuses(work / "kills-w1.db").values()) == {"ok"}


@pytest.mark.slow
@pytest.mark.xdist_group("sweep-processes")  # one sweep process at a time; worker-process tests run beside
def test_sigterm_is_handled_like_ctrl_c(work):
    """A scheduler's SIGTERM: stop after the variant in flight, run recorded interrupted, exit 143, resumable.

    The campaign's Ctrl-C scenario is the same audit with SIGINT; here Ctrl-C is
    ``test_runner.py::test_sigint_stops_after_current_variant_exits_130_and_resume_completes`` (exit 130, the
    variant in flight kept, nothing else, resumed to the whole plan), and `make reliability` runs both signals."""
    figures = reliability.signal_midway(work, signal.SIGTERM)
    assert_clean(figures)
    assert figures.checks["stopped run exit 143"] and figures.checks["stopped run recorded interrupted"]


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # real sweep processes: never two such tests at once
def test_killed_worker_and_sticky_error_are_requeued_once_and_the_others_continue(work):
    figures = reliability.worker_faults(work)
    assert_clean(figures)
    assert set(statuses(work / "worker-faults.db").values()) == {"ok"}


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # real sweep processes: never two such tests at once
def test_loky_workers_exit_when_the_coordinator_is_killed(work):
    figures = reliability.orphaned_workers(work, resume=False)  # `make reliability` resumes it too
    assert not figures.failed_checks, figures
    assert figures.checks["two worker processes seen"] and figures.checks["workers gone within 20 s"]
    assert (figures.lost, figures.duplicates, figures.integrity) == (0, 0, "ok")


@pytest.mark.slow
@pytest.mark.xdist_group("sweep-processes")  # one sweep process at a time; worker-process tests run beside
def test_a_slow_live_run_is_neither_abandoned_nor_measured_twice(work):
    figures = reliability.slow_chunk(work)
    assert_clean(figures)  # includes: status shows it running, the second sweep refused, heartbeat fresh


@pytest.mark.slow
def test_injected_oom_and_nan_are_rows_with_a_status(work):
    assert_clean(reliability.oom_and_nan(work))
    conn = sqlite3.connect(work / "oom-nan.db")
    rows = {k: (s, e) for k, s, e in conn.execute("SELECT removed, status, error FROM results")}
    assert rows["0,1"][0] == "failed" and "out of memory at batch size 4" in rows["0,1"][1]  # after the retry
    assert rows["2"] == ("ok", None)  # the half-batch retry succeeded
    assert rows["3"][0] == "diverged" and "nan" in rows["3"][1]
    assert len(rows) == reliability.N_VARIANTS


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # real sweep processes: never two such tests at once
def test_two_sweeps_started_at_once_never_measure_a_variant_twice(work):
    figures = reliability.concurrent_sweeps(work)
    assert_clean(figures)  # one exit 0, the other refused with "another sweep ... is measuring this setup"


def test_every_bad_db_file_gets_a_one_line_error_and_is_left_untouched(work):
    cases = reliability.bad_files(work)
    assert len(cases) == 8
    for case in cases:
        assert case.code == 2 and case.message.startswith("sweep: error:"), case
        assert case.untouched is not False, case
    assert sum(case.untouched is True for case in cases) == 5


def test_processes_opening_one_new_db_at_the_same_instant_all_succeed(work):
    opens, failures, errors = reliability.racing_opens(work, n_processes=3, rounds=8)
    assert (opens, failures) == (24, 0), errors


# ---------------------------------------------------------------------------------------------- short last window


@pytest.mark.parametrize("extra", [
    ("--max-tokens", "1000", "--max-length", "128"),  # 7 windows of 128 + one of 104; batch 8 on CPU
    ("--max-tokens", "1000", "--max-length", "128", "--engine", "per-variant", "--batch-size", "32", "--strategy",
     "single"),
    ("--max-tokens", "3000", "--max-length", "128", "--batch-size", "32", "--strategy", "single"),  # 23 + one of 56
], ids=["trie-auto-batch", "per-variant-batch-32", "3000-tokens-batch-32"])
def test_a_short_last_window_is_never_stacked_with_full_ones(work, tmp_path, capsys, extra):
    db = tmp_path / "short.db"
    code = main(quick_args(work, db, *extra))
    assert code == 0, capsys.readouterr().err
    found = statuses(db)
    assert set(found.values()) == {"ok"}
    assert len(found) == (7 if "single" in extra else reliability.N_VARIANTS)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # real sweep processes: never two such tests at once
def test_wikitext_reproduction_with_a_short_last_window(tmp_path, capsys):
    """The reported case: a tiny GPT-2 (256 positions) with the real tokenizer on WikiText-2, --max-tokens 1000
    (3 windows of 256 and one of 232) and --max-tokens 5000 --batch-size 32 (19 of 256 and one of 136)."""
    need_shared(WIKITEXT_TEST)
    need_shared(GPT2_TOKENIZER)
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny4"
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=256)).eval().save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(model_dir)
    common = ["run", "--model", str(model_dir), "--data", str(WIKITEXT_TEST), "--db", str(tmp_path / "a.db"),
              "--cache-dir", str(tmp_path / "cache"), "--latency", "off", "--quiet"]
    assert main([*common, "--max-tokens", "1000"]) == 0, capsys.readouterr().err
    assert main([*common, "--max-tokens", "5000", "--batch-size", "32"]) == 0, capsys.readouterr().err
    conn = sqlite3.connect(tmp_path / "a.db")  # one setup per --max-tokens, 5 variants each (--strategy single)
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT setup_id), MIN(status), MAX(status) FROM results"
                        ).fetchone() == (10, 2, "ok", "ok")


# ---------------------------------------------------------------------------------------------- liveness


def _run_row(host: str, pid: int, beat_age: float, started: str | None) -> dict:
    beat = (datetime.now(timezone.utc) - timedelta(seconds=beat_age)).isoformat(timespec="seconds")
    return {"host": host, "pid": pid, "heartbeat_at": beat, "process_start": started}


def test_a_live_process_on_this_host_is_alive_whatever_its_heartbeat_says():
    me, here = os.getpid(), socket.gethostname()
    assert store_runs._run_alive(_run_row(here, me, 10 * store.RUN_STALE_SECONDS, store.process_start(me)))
    assert store_runs._run_alive(_run_row(here, me, 10 * store.RUN_STALE_SECONDS, None))  # an older release's row


def test_a_reused_pid_is_not_the_runs_process():
    me, here = os.getpid(), socket.gethostname()
    boot, ticks = store.process_start(me).rsplit(":", 1)
    assert not store_runs._run_alive(_run_row(here, me, 0, f"{boot}:{int(ticks) - 1}"))


def test_a_dead_or_zombie_process_is_not_alive():
    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not store_runs._run_alive(_run_row(here, dead.pid, 0, None))
    zombie = subprocess.Popen(["sleep", "0"])  # exits, not reaped until wait()
    deadline = time.time() + 10
    while store_runs._process_state(zombie.pid) != "Z" and time.time() < deadline:
        time.sleep(0.01)
    try:
        assert not store_runs._run_alive(_run_row(here, zombie.pid, 0, store.process_start(zombie.pid)))
    finally:
        zombie.wait()


def test_a_run_on_another_host_lives_by_its_heartbeat(monkeypatch):
    assert store_runs._run_alive(_run_row("elsewhere", 1, 1, None))
    assert not store_runs._run_alive(_run_row("elsewhere", 1, store.RUN_STALE_SECONDS + 5, None))
    monkeypatch.setenv(store.STALE_ENV, "2")  # read in one place: stale_seconds()
    assert not store_runs._run_alive(_run_row("elsewhere", 1, 5, None))


def test_the_background_heartbeat_beats_while_the_main_thread_is_busy(tmp_path, monkeypatch):
    monkeypatch.setenv(store.STALE_ENV, "1.2")  # a beat every 0.2 s
    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "m", None, "float32", 2, "X")
    setup = store.upsert_setup(db, model_id, {"data": "d"})
    run_id = store.start_run(db, setup, 3, 3, "sweep run")
    with db.conn:
        db.execute("UPDATE runs SET heartbeat_at = '2000-01-01T00:00:00+00:00' WHERE id = ?", [run_id])
    with store.beating(db, run_id):
        time.sleep(1.0)  # a long chunk: no heartbeat from the main thread
    beat = db.execute("SELECT heartbeat_at FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    assert beat > "2001"
    store.finish_run(db, run_id, "done", 3)
    assert not any(t.name.startswith("sweep-heartbeat") for t in threading.enumerate())


def test_the_run_is_refused_while_a_slow_run_of_the_same_setup_lives(tmp_path, monkeypatch):
    monkeypatch.setenv(store.STALE_ENV, "1")
    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "m", None, "float32", 2, "X")
    setup = store.upsert_setup(db, model_id, {"data": "d"})
    store.start_run(db, setup, 3, 3, "sweep run")
    with db.conn:  # its last heartbeat long ago, as in a chunk that takes an hour
        db.execute("UPDATE runs SET heartbeat_at = '2000-01-01T00:00:00+00:00'")
    assert store.runs_overview(db)[0]["status"] == "running"
    assert store.reap_dead_runs(db, setup) == 0
    with pytest.raises(StoreError, match="another sweep"):
        store.start_run(store.open_db(tmp_path / "r.db"), setup, 3, 3, "sweep run")


# ---------------------------------------------------------------------------------------------- the WAL switch


def test_opening_a_new_db_waits_for_another_process_holding_it(tmp_path):
    """Switching to WAL needs an exclusive lock, and while another connection holds the write (RESERVED) lock of
    the new file, as a process creating it does, SQLite answers "database is locked" at once, without waiting
    for the busy timeout: opening must wait it out, not fail."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, lambda: holder.execute("ROLLBACK")).start()
    db = store.open_db(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version(db) == store.SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------- SQLite errors


def _full_db(path: Path, extra_pages: int = 0):
    """A sweep DB whose file may grow by ``extra_pages`` pages only: SQLite's own SQLITE_FULL after that."""
    db = store.open_db(path)
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0] + extra_pages}")
    return db


def test_disk_full_while_writing_rows_is_one_store_error_and_rolls_back_the_chunk(tmp_path):
    db = _full_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "m", None, "float32", 2, "X")  # fits in the pages the file has
    setup = store.upsert_setup(db, model_id, {"data": "d"})
    rows = [{"setup_id": setup, "removed": str(i), "n_removed": 1, "status": "ok", "error": "x" * 3000}
            for i in range(8)]
    with pytest.raises(StoreError) as info:
        store.record_results(db, rows)
    message = str(info.value)
    assert "the disk is full" in message and "run the same command again" in message
    assert "cannot rollback" not in message and "\n" not in message
    assert not db.conn.in_transaction
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0  # none of the chunk, not half of it


def test_a_full_disk_mid_run_is_one_line_a_failed_run_and_the_same_command_resumes(work, tmp_path, monkeypatch,
                                                                                   capsys):
    """SQLite's own SQLITE_FULL (the file may grow by one page): `make reliability` also fills a real tmpfs."""
    db_path = tmp_path / "full.db"
    real_open = store.open_db
    monkeypatch.setattr(store, "open_db", lambda path, create=True: _limited(real_open(path, create)))
    code = main(quick_args(work, db_path, "--engine", "per-variant"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("sweep: error: cannot write to") and "disk is full" in err
    conn = sqlite3.connect(db_path)
    stored = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert conn.execute("SELECT status FROM runs").fetchall() == [("failed",)]
    assert 0 < stored < reliability.N_VARIANTS
    code = main(quick_args(work, db_path, "--engine", "per-variant"))  # still full: the same one line
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "cannot rollback" not in err and "disk is full" in err
    assert conn.execute("SELECT status FROM runs").fetchall() == [("failed",), ("failed",)]
    monkeypatch.undo()
    assert main(quick_args(work, db_path, "--engine", "per-variant")) == 0  # space freed: the same command
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT removed) FROM results").fetchone() == (64, 64)
    assert conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 64  # nothing measured twice


def _limited(db):
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0] + 1}")
    return db


# ---------------------------------------------------------------------------------------------- runs and signals


def test_a_second_ctrl_c_records_the_run_interrupted_not_failed(work, tmp_path, monkeypatch):
    """The second Ctrl-C raises KeyboardInterrupt in the middle of a variant (as the StopFlag handler does)."""
    from sweep.engine.worker import Worker

    calls = []
    real = Worker.evaluate_many

    def interrupted_on_the_third_chunk(self, removals):
        calls.append(removals)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, removals)

    monkeypatch.setattr(Worker, "evaluate_many", interrupted_on_the_third_chunk)
    db = tmp_path / "r.db"
    assert main(quick_args(work, db, "--engine", "per-variant")) == 130
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT status, measured FROM runs").fetchall() == [("interrupted", 2)]
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2


def test_loky_workers_watch_their_coordinator():
    """The watchdog thread starts only in a child of the coordinator, and kills that child once it is orphaned."""
    from sweep.engine import parallel

    parallel._exit_with_coordinator(os.getpid())  # we are not our own child: nothing starts
    assert not any(t.name == "sweep-coordinator-watch" for t in threading.enumerate())
    code = ("import os, sys, time; from sweep.engine import parallel; parallel.PARENT_POLL_SECONDS = 0.05; "
            "parent = os.getppid(); parallel._exit_with_coordinator(parent); print('watching', flush=True); "
            "time.sleep(60)")
    # A middle process starts the child and exits: the child is orphaned, as when the coordinator is killed.
    middle = subprocess.run([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, "
                             f"'-c', {code!r}], stdout=subprocess.PIPE, text=True); p.stdout.readline(); "
                             "print(p.pid)"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    orphan = int(middle.stdout.split()[-1])
    deadline = time.time() + 20
    while reliability._alive(orphan) and time.time() < deadline:
        time.sleep(0.05)
    alive = reliability._alive(orphan)
    if alive:
        os.kill(orphan, signal.SIGKILL)
    assert not alive


# ---------------------------------------------------------------------------------------------- the token cache


def test_a_read_only_working_directory_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    from sweep.engine import data

    read_only, home_cache = tmp_path / "read-only", tmp_path / "xdg"
    read_only.mkdir()
    monkeypatch.chdir(read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home_cache))
    real_access = os.access
    # chmod 555 does not stop root: the working directory is made read-only for os.access instead
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p).absolute() == read_only
                        and mode & os.W_OK else real_access(p, mode, **kw))
    assert data.writable_cache_dir(SweepConfig().cache_dir) == home_cache / "sweep"
    with pytest.raises(ConfigError, match="`--cache-dir` ro-cache cannot be written"):
        data.writable_cache_dir("ro-cache")  # an explicit one is not silently replaced


def test_tokenizing_in_a_read_only_working_directory_works(tmp_path, monkeypatch, byte_tokenizer_dir):
    """Really read-only: a read-only bind mount as root, chmod 555 otherwise."""
    from transformers import AutoTokenizer

    from sweep.engine import data

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("cannot make a read-only directory as root here (no bind mount)")
    else:
        read_only.chmod(0o555)
    try:
        monkeypatch.chdir(read_only)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        tokens = data.tokenize("hello world " * 50, AutoTokenizer.from_pretrained(byte_tokenizer_dir), "t",
                               SweepConfig().cache_dir)
        assert len(tokens.ids) == 600 and list((tmp_path / "xdg" / "sweep").glob("tokens-*.npy"))
    finally:
        monkeypatch.chdir(tmp_path)
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)], capture_output=True)
        else:
            read_only.chmod(0o755)

"""Worker processes and the Dask backend: same rows as in-process, chunking, in-flight accounting, store safety."""
from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from sweep import store
from sweep.engine import parallel
from sweep.config import SweepConfig
from sweep.errors import ConfigError, StoreError, UnknownNameError
from sweep.plan import variant_key
from sweep.engine.runner import run_sweep
from test_prefix import assert_window_losses_add_up


def quick_cfg(model_dir, data, db, tmp_path, **overrides) -> SweepConfig:
    values = {"model": str(model_dir), "data": str(data), "db": str(db), "cache_dir": str(tmp_path / "cache"),
              "max_length": 32, "max_tokens": 256, "latency": "off", "strategy": "exhaustive", "device": "cpu"}
    values.update(overrides)
    return SweepConfig(**values)


def results(db) -> dict[str, tuple]:
    conn = sqlite3.connect(db)
    return {r[0]: r[1:] for r in conn.execute("SELECT removed, status, ppl, params FROM results")}


def measurement_counts(db) -> list[int]:
    conn = sqlite3.connect(db)
    return [n for (n,) in conn.execute("SELECT COUNT(*) FROM measurements GROUP BY setup_id, removed")]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # worker processes: never two such tests at once
def test_two_loky_workers_give_the_in_process_rows(tiny_gpt2_dir, sample_text_file, tmp_path):
    alone = run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "one.db", tmp_path, workers=1),
                      log=lambda s: None, progress=False)
    pooled = run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "two.db", tmp_path, workers=2),
                       log=lambda s: None, progress=False)
    assert alone.setup == pooled.setup and pooled.measured == 16 and not pooled.interrupted
    one, two = results(tmp_path / "one.db"), results(tmp_path / "two.db")
    assert one.keys() == two.keys() and len(two) == 16
    for key, (status, ppl, params) in one.items():
        assert two[key][0] == status == "ok" and two[key][2] == params
        assert two[key][1] == pytest.approx(ppl, rel=1e-5)
    assert measurement_counts(tmp_path / "two.db") == [1] * 16  # each variant measured exactly once
    assert_window_losses_add_up(tmp_path / "two.db", 16)


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # worker processes: never two such tests at once
def test_dask_local_cluster_gives_the_in_process_rows(tiny_gpt2_dir, sample_text_file, tmp_path):
    distributed = pytest.importorskip("distributed")
    alone = quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "one.db", tmp_path, strategy="single")
    run_sweep(alone, log=lambda s: None, progress=False)
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "dask.db", tmp_path, strategy="single",
                        backend="dask", scheduler=cluster.scheduler_address)
        logs: list[str] = []
        summary = run_sweep(cfg, log=logs.append, progress=False)
    assert summary.measured == 5 and not summary.interrupted
    assert any("(2 workers)" in line for line in logs)  # chunks sized for the cluster, not this machine
    one, dask = results(tmp_path / "one.db"), results(tmp_path / "dask.db")
    assert one.keys() == dask.keys()
    assert all(dask[k][1] == pytest.approx(one[k][1], rel=1e-5) for k in one)
    assert_window_losses_add_up(tmp_path / "dask.db", 5)


def test_unreachable_scheduler_is_a_clear_error(tiny_gpt2_dir, sample_text_file, tmp_path, monkeypatch):
    from sweep.errors import ClusterError

    pytest.importorskip("distributed")
    monkeypatch.setattr(parallel, "SCHEDULER_TIMEOUT", "1s")

    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "r.db", tmp_path, strategy="single",
                    backend="dask", scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        list(parallel.run_chunks(cfg, [[[0]]], 1, lambda chunk, error: []))


# ---------------------------------------------------------------------------------------------- chunking


def test_chunks_cover_the_order_once_and_keep_it():
    order = [[i] for i in range(23)]
    chunks = parallel.chunked(order, 5)
    assert [r for c in chunks for r in c] == order and max(map(len, chunks)) == 5


@pytest.mark.parametrize("n, workers, seconds, sharing, want", [
    (4095, 4, 0.5, True, 60),      # the time target binds
    (64, 2, 0.001, True, 8),       # at least 4 chunks per worker
    (64, 2, 0.001, False, 1),      # no prefix sharing: one variant per task
    (3, 8, 100.0, True, 1),
])
def test_chunk_size(n, workers, seconds, sharing, want):
    assert parallel.chunk_size(n, workers, seconds, sharing, 30.0) == want


def test_in_flight_chunks_are_started_and_not_done(tmp_path):
    for name in ("0.start", "0.done", "1.start", "3.start"):
        (tmp_path / name).touch()
    assert parallel._in_flight(tmp_path, [1, 2, 3]) == [1, 3]
    empty = tmp_path / "remote"
    empty.mkdir()
    assert parallel._in_flight(empty, [1, 2]) == [1, 2]  # no marker visible: every unfinished chunk


def test_a_chunk_is_blamed_once_then_failed():
    from collections import Counter

    deaths, chunks = Counter(), [[[0]], [[1], [2]]]
    failed = lambda chunk, error: [{"removed": variant_key(r), "status": "failed", "error": error} for r in chunk]
    assert list(parallel._blame(chunks, [1], deaths, "died", failed, lambda s: None)) == []
    (chunk, rows), = parallel._blame(chunks, [1], deaths, "died", failed, lambda s: None)
    assert chunk == chunks[1] and [r["status"] for r in rows] == ["failed", "failed"]


# ---------------------------------------------------------------------------------------------- config


def test_workers_default_to_one_on_cpu():
    assert parallel.resolve_workers(SweepConfig(device="cpu")) == 1
    assert parallel.resolve_workers(SweepConfig(workers=3)) == 3


@pytest.mark.parametrize("values, error", [
    ({"workers": 0}, "--workers"), ({"backend": "ray"}, "valid: dask, loky"),
    ({"backend": "dask"}, "--scheduler"), ({"scheduler": "tcp://h:1"}, "only used with `--backend dask`"),
])
def test_bad_parallel_settings_name_the_flag(values, error):
    with pytest.raises((ConfigError, UnknownNameError), match=error):
        SweepConfig(**values)


# ---------------------------------------------------------------------------------------------- fault hooks


def test_fault_spec_is_parsed_per_kind_and_key(monkeypatch, tmp_path):
    from sweep.engine.faults import injected_fault

    assert not injected_fault("oom", [1])  # unset: nothing is injected
    monkeypatch.setenv("SWEEP_FAULTS", "oom=1|2,3;oom-retry=baseline;kill-once=4")
    monkeypatch.setenv("SWEEP_FAULTS_DIR", str(tmp_path))
    assert injected_fault("oom", [1]) and injected_fault("oom", [2, 3], retrying=True)
    assert injected_fault("oom", []) and not injected_fault("oom", [], retrying=True)
    assert not injected_fault("nan", [1])
    assert injected_fault("kill", [4]) and not injected_fault("kill", [4])  # -once: first time only


def test_sticky_cuda_errors_are_recognised():
    from sweep.engine.device import is_sticky_error

    assert is_sticky_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_sticky_error(RuntimeError("shape mismatch"))
    assert not is_sticky_error(ValueError("illegal memory access"))


# ---------------------------------------------------------------------------------------------- store safety


def test_chunk_rows_and_their_log_commit_together(tmp_path):
    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "m", None, "float32", 2, "X")
    setup = store.upsert_setup(db, model_id, {"data": "d"})
    rows = [{"setup_id": setup, "removed": "0", "status": "ok", "ppl": 3.0},
            {"setup_id": setup, "removed": "1", "status": "ok", "bogus": 1}]
    with pytest.raises(StoreError, match="bogus"):
        store.record_results(db, rows)
    assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    diverged = {"setup_id": setup, "removed": "1", "status": "diverged", "ppl": float("nan")}
    store.record_results(db, [rows[0], diverged], run_id=7)
    assert dict(db.execute("SELECT removed, status FROM results").fetchall()) == {"0": "ok", "1": "diverged"}
    assert db.execute("SELECT COUNT(*), MIN(run_id) FROM measurements").fetchone() == (2, 7)


def test_mountinfo_gives_the_type_of_the_longest_mount_point():
    lines = ["22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
             "36 22 0:32 / /data rw,relatime shared:1 - nfs4 srv:/export rw",
             "37 36 0:33 / /data/local rw - xfs /dev/sdb1 rw"]
    assert store.fstype_from_mountinfo(lines, Path("/data/x/results.db")) == "nfs4"
    assert store.fstype_from_mountinfo(lines, Path("/data/local/results.db")) == "xfs"
    assert store.fstype_from_mountinfo(lines, Path("/database.db")) == "ext4"  # /data is not a prefix of /database


def test_network_filesystem_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(store.db, "filesystem_type", lambda path: "nfs4")
    with pytest.raises(StoreError, match=r"network filesystem \(nfs4\)"):
        store.open_db(tmp_path / "r.db")


def test_read_only_filesystem_and_read_only_file_are_refused(tmp_path, monkeypatch):
    store.open_db(tmp_path / "r.db").conn.close()
    (tmp_path / "r.db").chmod(0o444)
    with pytest.raises(StoreError, match="not writable"):
        store.open_db(tmp_path / "r.db")
    monkeypatch.setattr(store.db, "_read_only_filesystem", lambda path: True)
    with pytest.raises(StoreError, match="read-only filesystem"):
        store.open_db(tmp_path / "other.db")


def test_resume_closes_runs_of_dead_processes_even_with_nothing_to_do(tiny_gpt2_dir, sample_text_file, tmp_path):
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "r.db", tmp_path, strategy="single")
    summary = run_sweep(cfg, log=lambda s: None, progress=False)
    db = store.open_db(cfg.db)
    with db.conn:  # a run left `running` by a process that no longer exists (pid far above pid_max)
        db.execute("INSERT INTO runs (setup_id, status, pid, host, started_at, heartbeat_at) "
                   "VALUES (?, 'running', 999999999, ?, ?, ?)", [summary.setup, socket.gethostname(),
                                                                  store.now(), store.now()])
    assert run_sweep(cfg, log=lambda s: None, progress=False).measured == 0
    assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'running'").fetchone()[0] == 0


def test_sticky_error_in_process_fails_the_chunk_and_stops(tiny_gpt2_dir, sample_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_FAULTS", "sticky=1")
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, tmp_path / "r.db", tmp_path, strategy="single",
                    engine="per-variant", workers=1)
    summary = run_sweep(cfg, log=lambda s: None, progress=False)
    rows = results(tmp_path / "r.db")
    assert summary.interrupted and rows["1"][0] == "failed" and "2" not in rows
    monkeypatch.delenv("SWEEP_FAULTS")
    assert run_sweep(cfg, log=lambda s: None, progress=False).measured == 3  # "1" (retried), "2", "3"
    assert {status for status, _, _ in results(tmp_path / "r.db").values()} == {"ok"}


def test_suspects_of_a_death_rerun_alone_so_only_the_culprit_fails(monkeypatch):
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    calls = []

    def fake_parallel(n_jobs):
        def run(tasks):  # every task starts at once; a batch holding chunk 1 loses its worker
            tasks = list(tasks)  # joblib delayed: (function, args, kwargs); args = (cfg, index, chunk, markers, ...)
            calls.append([args[1] for _, args, _ in tasks])
            for _, args, _ in tasks:
                Path(args[3], f"{args[1]}.start").touch()
            if 1 in calls[-1]:
                raise TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated")
            return iter([parallel.ChunkResult(args[1], [{"status": "ok"}] * len(args[2])) for _, args, _ in tasks])
        return run

    monkeypatch.setattr(parallel, "_parallel", fake_parallel)
    chunks = [[[0]], [[1]], [[2]], [[3]]]
    failed = lambda chunk, error: [{"status": "failed", "error": error}] * len(chunk)
    out = list(parallel.run_chunks(SweepConfig(workers=4), chunks, 4, failed, log=lambda s: None))
    assert calls == [[0, 1, 2, 3], [0], [1], [2], [3]]
    statuses = {variant_key(chunk[0]): rows[0]["status"] for chunk, rows in out}
    assert statuses == {"0": "ok", "1": "failed", "2": "ok", "3": "ok"}


def test_more_workers_than_gpus_is_refused_before_anything_loads(monkeypatch):
    from sweep.engine import parallel
    from sweep.config import build_config
    from sweep.errors import ClusterError

    monkeypatch.setattr(parallel, "visible_gpus", lambda: 2)
    with pytest.raises(ClusterError, match="--workers 4 is more than the 2 visible GPU"):
        parallel.resolve_workers(build_config(workers=4))
    assert parallel.resolve_workers(build_config(workers=2)) == 2
    assert parallel.resolve_workers(build_config(workers=4, device="cpu")) == 4  # CPU worker processes
    monkeypatch.setattr(parallel, "visible_gpus", lambda: 0)
    assert parallel.resolve_workers(build_config(workers=4)) == 4  # a CPU-only machine


def test_local_workers_share_this_machines_cores_and_dask_workers_keep_their_own(monkeypatch):
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 16)
    assert parallel._torch_threads(SweepConfig(backend="loky"), 4) == 4
    assert parallel._torch_threads(SweepConfig(backend="loky"), 32) == 1
    assert parallel._torch_threads(SweepConfig(backend="dask", scheduler="tcp://h:8786"), 4) is None

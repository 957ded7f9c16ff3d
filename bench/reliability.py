"""Fault-injection campaign: kill, interrupt, starve and corrupt sweeps of a tiny model; count what was lost.

    python bench/reliability.py                  # full campaign (20 coordinator kills), writes docs/reliability.md
    python bench/reliability.py --kills 5 --out /tmp/r.md

Every scenario runs real ``python -m sweep run`` processes on CPU (a seeded 6-layer random-init GPT-2, byte
tokenizer, 64-variant exhaustive plan unless the scenario says otherwise) and then audits the DB:

- planned / stored: rows the scenario's plans call for, and rows in ``results`` at the end (must be equal);
- lost: variants whose measurement was committed (the ``measurements`` log) or seen in ``results`` while the
  campaign polled, but that are missing from ``results`` at the end (must be 0);
- duplicates: more than one ``results`` row for a (setup, variant) (must be 0);
- re-measured: measurements of a variant committed after it already had an ``ok``/``diverged`` row (must be 0);
- running: ``runs`` rows still ``running`` after the final resume (must be 0);
- integrity: ``PRAGMA integrity_check``;
- checks: what the scenario expects of its processes (exit codes, the run's recorded status, a second sweep
  refused for the right reason, one-line errors without a traceback). A scenario is clean when every count is
  right and every check holds.

Kills strike after observing DB progress (polling the results count), not after sleeps, so a busy machine does
not make them land before the first commit or after the last. ``SWEEP_FAULTS`` (see ``sweep.engine.faults``) slows
every variant a little so a kill lands mid-sweep, and injects OOM, NaN, worker deaths and sticky errors. Every
temporary file (the sweeps' own scratch directories included: ``TMPDIR`` points inside the campaign's directory)
is removed at the end, and a tmpfs mounted for the disk-full scenario is unmounted.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 6
N_VARIANTS = 2**N_LAYERS  # exhaustive: 63 removals + the baseline
TIMEOUT = 180.0


@dataclass
class Figures:
    """One scenario's audit."""

    scenario: str
    planned: int = N_VARIANTS
    """Result rows the scenario's plans call for (over all its setups)."""
    runs: int = 0
    kills: int = 0
    variants: int = 0
    """Result rows stored at the end."""
    lost: int = 0
    duplicates: int = 0
    remeasured: int = 0
    running: int = 0
    integrity: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    """Named expectations of the scenario (exit codes, refusals, recorded statuses) and whether each held."""
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, holds: bool) -> bool:
        self.checks[name] = bool(holds)
        return bool(holds)

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, holds in self.checks.items() if not holds]

    @property
    def clean(self) -> bool:
        counts = (self.lost, self.duplicates, self.remeasured, self.running, self.integrity)
        return counts == (0, 0, 0, 0, "ok") and self.variants == self.planned and not self.failed_checks


# ---------------------------------------------------------------------------------------------- fixture


def make_fixture(root: Path, n_layers: int = N_LAYERS) -> tuple[Path, Path]:
    """A seeded tiny GPT-2 (byte tokenizer, random init) and ~6 KB of text; return (model dir, text file)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sweep.extras.demo import build_tokenizer

    model_dir, text = root / "tiny-gpt2", root / "text.txt"
    if not model_dir.exists():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=n_layers, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0))
        model.eval().save_pretrained(model_dir)
        build_tokenizer().save_pretrained(model_dir)
    if not text.exists():
        text.write_text("\n".join(p.read_text() for p in sorted((ROOT / "sweep").glob("*.py")))[:6000])
    return model_dir, text


def sweep_args(model_dir: Path, text: Path, db: Path, cache: Path, *extra: str) -> list[str]:
    """``python -m sweep run`` of the campaign's plan; ``extra`` flags come last, so they override these."""
    return [sys.executable, "-m", "sweep", "run", "--model", str(model_dir), "--data", str(text), "--db", str(db),
            "--cache-dir", str(cache), "--strategy", "exhaustive", "--max-length", "32", "--max-tokens", "256",
            "--latency", "off", "--device", "cpu", "--quiet", *extra]


def _env(work: Path, faults: str = "", **extra: str) -> dict[str, str]:
    """The sweeps' environment: offline, one thread, temporary files under ``work`` (removed with it)."""
    scratch = work / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), **extra}
    env.pop("SWEEP_FAULTS", None)
    if faults:
        env["SWEEP_FAULTS"] = faults
        env["SWEEP_FAULTS_DIR"] = tempfile.mkdtemp(prefix="faults-", dir=work)
    return env


# ---------------------------------------------------------------------------------------------- audit


def _query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def result_keys(db: Path) -> set[str]:
    """Variant keys with a results row (any status); empty while the DB or its tables do not exist yet."""
    try:
        return {r[0] for r in _query(db, "SELECT removed FROM results")}
    except sqlite3.OperationalError:
        return set()


def run_statuses(db: Path) -> list[str]:
    """Status of every run, oldest first."""
    return [s for (s,) in _query(db, "SELECT status FROM runs ORDER BY id")]


def audit(db: Path, figures: Figures, seen: set[str]) -> Figures:
    """Fill in the figures from the DB; ``seen``: keys observed in ``results`` while polling."""
    log = _query(db, "SELECT setup_id, removed, status FROM measurements ORDER BY id")
    final = {(s, k) for s, k in _query(db, "SELECT setup_id, removed FROM results")}
    completed: set[tuple[str, str]] = set()
    for setup, key, status in log:
        figures.remeasured += (setup, key) in completed
        if status in ("ok", "diverged"):
            completed.add((setup, key))
    final_keys = {k for _, k in final}
    figures.lost = len({(s, k) for s, k, _ in log} - final) + len(seen - final_keys)
    figures.duplicates = sum(n - 1 for (n,) in _query(
        db, "SELECT COUNT(*) FROM results GROUP BY setup_id, removed HAVING COUNT(*) > 1"))
    figures.running = _query(db, "SELECT COUNT(*) FROM runs WHERE status = 'running'")[0][0]
    figures.integrity = _query(db, "PRAGMA integrity_check")[0][0]
    figures.variants = len(final)
    return figures


def fresh(db: Path) -> Path:
    """``db`` with no file of an earlier campaign in the same directory (the DB, its WAL and shared memory)."""
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)
    return db


def run(args: list[str], env: dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(stderr: str, *fragments: str) -> bool:
    """stderr ends with the one ``sweep: error:`` line, which holds every fragment, and has no traceback (progress
    bars of model loading may come before it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("sweep: error: ")]
    return (bool(lines) and errors == [lines[-1]] and "Traceback" not in stderr
            and all(f in lines[-1] for f in fragments))


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1][:240] if lines else ""


def start_and_strike(args: list[str], env: dict[str, str], db: Path, target: int, seen: set[str],
                     strike: signal.Signals | None) -> tuple[subprocess.Popen, bool]:
    """Start a sweep, wait until ``results`` has ``target`` rows, then send ``strike`` (None: just return);
    return (proc, whether the target was reached while it ran)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and time.time() < deadline:
        keys = result_keys(db)
        seen |= keys
        if len(keys) >= target:
            if strike is not None:
                proc.send_signal(strike)
            return proc, True
        time.sleep(0.02)
    return proc, False


# ---------------------------------------------------------------------------------------------- kills and signals


def coordinator_kills(work: Path, kills: int, seed: int = 0, workers: int = 1) -> Figures:
    """kill -9 the coordinator after a random number of new results, ``kills`` times; resume each time."""
    model_dir, text = make_fixture(work)
    db = fresh(work / f"kills-w{workers}.db")
    rng = random.Random(seed)
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", str(workers), "--engine", "per-variant")
    env = _env(work, "delay=0.02")
    figures, seen = Figures(f"kill -9 coordinator x{kills} (workers={workers})"), set()
    # Spread the kills over the sweep: each waits for 1..2*(left/kills) new rows, leaving some for the end.
    for i in range(kills):
        have = len(result_keys(db))
        step = max(1, (N_VARIANTS - 4 - have) // max(kills - i, 1))
        proc, struck = start_and_strike(args, env, db, have + rng.randint(1, max(1, step)), seen, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        figures.runs += 1
        figures.kills += struck
    done = run(args, env)
    figures.runs += 1
    figures.check("final resume exit 0", done.returncode == 0)
    figures.check("killed runs recorded abandoned", set(run_statuses(db)[:-1]) <= {"abandoned"})
    if done.returncode != 0:
        figures.notes.append(f"final resume exit {done.returncode}: {last_line(done.stderr)}")
    return audit(db, figures, seen)


def signal_midway(work: Path, strike: signal.Signals = signal.SIGINT, workers: int = 1,
                  twice: bool = False) -> Figures:
    """Ctrl-C (or SIGTERM, as a scheduler sends) mid-sweep, once or twice in a row: the run ends ``interrupted``
    with exit 128 + signal, no row is in a bad state, and the same command resumes."""
    model_dir, text = make_fixture(work)
    name = f"{strike.name}{'-twice' if twice else ''}-w{workers}"
    db = fresh(work / f"{name}.db")
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", str(workers), "--engine", "per-variant")
    # Twice: variants slow enough (1 s each) that the second signal lands while one is still being measured.
    env = _env(work, "delay=1" if twice else "delay=0.02")
    label = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}[strike]
    figures, seen = Figures(f"{label}{' twice' if twice else ''} mid-sweep (workers={workers})"), set()
    proc, struck = start_and_strike(args, env, db, 3 if twice else 8, seen, strike)
    if twice and struck:
        time.sleep(0.3)  # the first asked to stop after the variant in flight; the second stops at once
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(strike)
    _, err = proc.communicate(timeout=TIMEOUT)
    figures.runs, figures.kills = 1, int(struck) * (2 if twice else 1)
    partial = len(result_keys(db))
    figures.notes.append(f"stopped run: exit {proc.returncode}, {partial}/{N_VARIANTS} measured, "
                         f"recorded {run_statuses(db)[-1] if run_statuses(db) else '?'}")
    expected = 130 if twice else 128 + strike  # a second signal stops at once, as KeyboardInterrupt: 130
    figures.check(f"stopped run exit {expected}", proc.returncode == expected)
    figures.check("stopped run recorded interrupted", run_statuses(db)[-1:] == ["interrupted"])
    figures.check("no traceback", "Traceback" not in err)
    done = run(args, _env(work))
    figures.runs += 1
    figures.check("resume exit 0", done.returncode == 0)
    return audit(db, figures, seen)


def worker_kill(work: Path, always: bool = False) -> Figures:
    """kill -9 one of two worker processes mid-chunk: re-queued once (``kill-once``) or failed rows (``kill``)."""
    model_dir, text = make_fixture(work)
    db = fresh(work / f"worker-kill-{'always' if always else 'once'}.db")
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", "2")
    victim = "2,3"
    env = _env(work, f"{'kill' if always else 'kill-once'}={victim};delay=0.01")
    figures = Figures(f"kill -9 one worker ({'every time' if always else 'once'})")
    first = run(args, env)
    figures.runs, figures.kills = 1, 1
    figures.check("exit 0", first.returncode == 0)
    status = dict(_query(db, "SELECT removed, status FROM results"))
    failed = sorted(k for k, s in status.items() if s == "failed")
    figures.notes.append(f"exit {first.returncode}; {len(status)}/{N_VARIANTS} rows, failed: {failed or 'none'}")
    if always:
        figures.check(f"victim {victim} failed", status.get(victim) == "failed")
        again = run(args, _env(work))
        figures.runs += 1
        ok = sum(s == "ok" for s in dict(_query(db, "SELECT removed, status FROM results")).values())
        figures.check("a re-run without the fault completes every variant", again.returncode == 0 and ok == N_VARIANTS)
        figures.notes.append(f"a re-run without the fault: exit {again.returncode}, {ok} ok")
    else:
        figures.check("every variant ok", failed == [] and len(status) == N_VARIANTS)
    return audit(db, figures, set())


def worker_faults(work: Path) -> Figures:
    """One two-worker sweep with a worker killed once and a sticky error once (the CI test's short version)."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "worker-faults.db")
    done = run(sweep_args(model_dir, text, db, work / "cache", "--workers", "2"),
               _env(work, "kill-once=2,3;sticky-once=1,4;delay=0.01"))
    figures = Figures("worker killed once + sticky error once", runs=1, kills=2)
    figures.check("exit 0", done.returncode == 0)
    figures.notes.append(f"exit {done.returncode}")
    return audit(db, figures, set())


def sticky_error(work: Path) -> Figures:
    """A sticky CUDA error in one worker (injected): the pool is recycled, the chunk re-queued, all rows ok."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "sticky.db")
    done = run(sweep_args(model_dir, text, db, work / "cache", "--workers", "2"), _env(work, "sticky-once=1,4"))
    figures = Figures("sticky CUDA error in a worker (once)", runs=1, kills=1)
    ok = _query(db, "SELECT COUNT(*) FROM results WHERE status = 'ok'")[0][0]
    figures.check("exit 0, every variant ok", done.returncode == 0 and ok == N_VARIANTS)
    figures.notes.append(f"exit {done.returncode}; {ok}/{N_VARIANTS} ok")
    return audit(db, figures, set())


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def orphaned_workers(work: Path, grace: float = 20.0, resume: bool = True) -> Figures:
    """kill -9 the coordinator of a two-worker sweep: its loky workers (each holding a model) must exit within
    ``grace`` seconds instead of lingering for minutes; the same command then resumes (unless not ``resume``)."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "orphans.db")
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", "2")
    env = _env(work, "delay=0.1")
    figures, seen = Figures("kill -9 coordinator of 2 workers: workers exit"), set()
    proc, struck = start_and_strike(args, env, db, 4, seen, None)
    workers = [pid for pid in _children(proc.pid) if "LokyProcess" in Path(f"/proc/{pid}/cmdline").read_text()] \
        if struck else []
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    figures.runs, figures.kills = 1, int(struck)
    start = time.time()
    while any(_alive(pid) for pid in workers) and time.time() - start < grace:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # do not leave them behind whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    figures.check("two worker processes seen", len(workers) == 2)
    figures.check(f"workers gone within {grace:.0f} s", workers and not left)
    figures.notes.append(f"{len(workers)} workers, gone after {time.time() - start:.1f} s" if not left
                         else f"{len(left)} of {len(workers)} workers still alive after {grace:.0f} s (killed)")
    if resume:
        done = run([*args, "--workers", "1"], _env(work))  # the same setup: workers are not part of it
        figures.runs += 1
        figures.check("resume exit 0", done.returncode == 0)
    return audit(db, figures, seen)


# ---------------------------------------------------------------------------------------------- measurement faults


def oom_and_nan(work: Path) -> Figures:
    """Injected OOM (every batch size -> failed; first batch only -> ok after the retry) and NaN (-> diverged)."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "oom-nan.db")
    done = run(sweep_args(model_dir, text, db, work / "cache"), _env(work, "oom=0,1;oom-retry=2;nan=3"))
    status = dict(_query(db, "SELECT removed, status || ':' || COALESCE(error, '') FROM results"))
    figures = Figures("injected OOM and NaN", runs=1)
    figures.check("exit 0", done.returncode == 0)
    figures.check("OOM -> failed, retried OOM -> ok, NaN -> diverged",
                  status.get("0,1", "").startswith("failed:out of memory") and status.get("2") == "ok:"
                  and status.get("3", "").startswith("diverged:"))
    figures.notes.append(f"exit {done.returncode}; 0,1 -> {status.get('0,1', '?')[:60]}; 2 -> {status.get('2')}; "
                         f"3 -> {status.get('3', '?')[:40]}")
    return audit(db, figures, set())


def short_last_window(work: Path) -> Figures:
    """Texts whose last window is shorter than the others, with batches larger than the windows of equal length
    (``--max-tokens 1000``: 7 windows of 128 and one of 104, batch 8; ``--max-tokens 3000 --batch-size 32``: 23 and
    one of 56;
    ``--max-tokens 1100 --batch-size 32`` on two worker processes), each its own setup:
    windows of unequal length are never stacked into one batch, in either engine or in worker processes."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "short-window.db")
    cases = [("trie, 1000 tokens", ("--max-tokens", "1000", "--max-length", "128"), N_VARIANTS),
             ("per-variant, 3000 tokens, batch 32", ("--max-tokens", "3000", "--max-length", "128", "--batch-size",
                                                     "32", "--engine", "per-variant", "--strategy", "single"),
              N_LAYERS + 1),
             ("2 workers, 1100 tokens, batch 32", ("--max-tokens", "1100", "--max-length", "128", "--batch-size",
                                                   "32", "--workers", "2", "--strategy", "single"), N_LAYERS + 1)]
    figures = Figures("short last window, batches of unequal windows", planned=sum(n for _, _, n in cases))
    for name, extra, _ in cases:
        done = run(sweep_args(model_dir, text, db, work / "cache", *extra), _env(work))
        figures.runs += 1
        figures.check(f"{name}: exit 0", done.returncode == 0)
        if done.returncode:
            figures.notes.append(f"{name}: exit {done.returncode}: {last_line(done.stderr)}")
    statuses = {s for (s,) in _query(db, "SELECT DISTINCT status FROM results")}
    figures.check("every row ok", statuses == {"ok"})
    figures.notes.append(f"{len(cases)} setups, statuses {sorted(statuses)}")
    return audit(db, figures, set())


# ---------------------------------------------------------------------------------------------- concurrency


def concurrent_sweeps(work: Path) -> Figures:
    """Two sweeps of the same setup started at once on one DB: one measures, the other refuses."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "concurrent.db")
    args = sweep_args(model_dir, text, db, work / "cache", "--engine", "per-variant")
    env = _env(work, "delay=0.01")
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=TIMEOUT), p.stderr.read()) for p in procs]
    figures = Figures("two sweeps of one setup at once on one DB", runs=2)
    codes = sorted(code for code, _ in outcomes)
    refused = [err for code, err in outcomes if code == 2]
    figures.check("exits 0 and 2", codes == [0, 2])
    figures.check("the second refused: another sweep is measuring this setup",
                  len(refused) == 1 and one_line_error(refused[0], "another sweep", "is measuring this setup"))
    figures.notes.append(f"exits {[code for code, _ in outcomes]}; refusal: {last_line(refused[0]) if refused else '-'}")
    return audit(db, figures, set())


def slow_chunk(work: Path, window: float = 3.0, hold: float = 120.0) -> Figures:
    """A live sweep whose first chunk lasts far longer than the heartbeat window (``SWEEP_RUN_STALE_SECONDS``
    shortened to ``window``; the chunk is held by the ``hold`` fault until the campaign releases it): during it,
    ``sweep status`` shows the sweep running, a second sweep of the setup is refused (not run next to it,
    measuring the same variants), and its heartbeat stays fresh throughout (the background thread)."""
    model_dir, text = make_fixture(work)
    db = fresh(work / "slow.db")
    args = sweep_args(model_dir, text, db, work / "cache", "--strategy", "explicit", "--remove", "0")
    held_env = _env(work, f"hold={hold}", SWEEP_RUN_STALE_SECONDS=str(window))
    faults_dir = Path(held_env["SWEEP_FAULTS_DIR"])
    figures, seen = Figures(f"a chunk held beyond the heartbeat window ({window:.0f} s)", planned=2), set()
    first = subprocess.Popen(args, env=held_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, oldest_beat = time.time() + TIMEOUT, 0.0

    def watch_while(proc: subprocess.Popen) -> float:
        """The oldest heartbeat of the held sweep seen while ``proc`` runs (its row polled every 0.2 s)."""
        oldest = 0.0
        while proc.poll() is None and time.time() < deadline:
            for (beat,) in _query(db, "SELECT heartbeat_at FROM runs WHERE status = 'running' AND pid = ?",
                                  (first.pid,)):
                oldest = max(oldest, _age(beat))
            time.sleep(0.2)
        return oldest

    while first.poll() is None and time.time() < deadline and not (faults_dir / "held").exists():
        time.sleep(0.1)
    held_at = time.time()
    time.sleep(window + 1)  # into the held chunk: without the thread, its heartbeat is stale from here on
    status = run([sys.executable, "-m", "sweep", "status", "--db", str(db)], held_env)
    second = subprocess.Popen(args, env=_env(work, SWEEP_RUN_STALE_SECONDS=str(window)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    oldest_beat = watch_while(second)
    _, second_err = second.communicate(timeout=TIMEOUT)
    held_seconds = time.time() - held_at
    (faults_dir / "release").touch()
    oldest_beat = max(oldest_beat, watch_while(first))
    first.communicate(timeout=TIMEOUT)
    seen |= result_keys(db)
    figures.runs = 2
    figures.check("sweep status shows it running", " running " in status.stdout and "abandoned" not in status.stdout)
    figures.check("second sweep refused: another sweep is measuring this setup",
                  second.returncode == 2 and one_line_error(second_err, "another sweep"))
    figures.check("the held sweep completes (exit 0)", first.returncode == 0)
    figures.check(f"heartbeat never older than the window ({window:.0f} s)", oldest_beat <= window)
    figures.notes.append(f"`sweep status` during the held chunk: {'running' if ' running ' in status.stdout else '?'}; "
                         f"second sweep: exit {second.returncode}, `{last_line(second_err)[:90]}`; "
                         f"chunk held {held_seconds:.0f} s; oldest heartbeat seen {oldest_beat:.1f} s")
    return audit(db, figures, seen)


def _query_ok(db: Path, sql: str) -> bool:
    try:
        return bool(_query(db, sql))
    except sqlite3.Error:
        return False


def _age(stamp: str) -> float:
    from datetime import datetime, timezone

    return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds()


def racing_creates(work: Path, n_processes: int = 3, rounds: int = 2) -> Figures:
    """``n_processes`` sweeps of different setups (window lengths) started together on a DB that does not exist
    yet, ``rounds`` times: every one must create or join the file and finish its own plan."""
    model_dir, text = make_fixture(work)
    figures = Figures(f"{n_processes} sweeps racing to create one new DB (x{rounds})",
                      planned=rounds * n_processes * N_VARIANTS)
    env, codes, errors = _env(work), [], []
    for round_index in range(rounds):
        db = fresh(work / f"race-{round_index}.db")
        procs = [subprocess.Popen(sweep_args(model_dir, text, db, work / "cache", "--max-length", str(16 + 8 * i)),
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(n_processes)]
        for proc in procs:
            codes.append(proc.wait(timeout=TIMEOUT))
            errors += [last_line(proc.stderr.read())] if proc.returncode else []
        figures.runs += n_processes
        part = audit(db, Figures(""), set())
        for name in ("variants", "lost", "duplicates", "remeasured", "running"):
            setattr(figures, name, getattr(figures, name) + getattr(part, name))
        figures.integrity = part.integrity if figures.integrity in ("", "ok") else figures.integrity
    figures.check("every sweep exit 0", set(codes) == {0})
    figures.notes.append(f"exits {codes}" + (f"; {errors[0]}" if errors else ""))
    return figures


def _open_new(barrier, path: str, results) -> None:
    from sweep import store

    barrier.wait()
    try:
        store.open_db(path).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - counted and shown
        results.put(f"{type(exc).__name__}: {exc}")


def racing_opens(work: Path, n_processes: int = 3, rounds: int = 30) -> tuple[int, int, list[str]]:
    """``n_processes`` processes opening the same new DB path at the same instant (a barrier), ``rounds`` times:
    (opens, failures, distinct errors)."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    outcomes: list[str] = []
    for round_index in range(rounds):
        path = str(work / f"open-race-{round_index}.db")
        barrier, results = context.Barrier(n_processes), context.Queue()
        procs = [context.Process(target=_open_new, args=(barrier, path, results)) for _ in range(n_processes)]
        for proc in procs:
            proc.start()
        outcomes += [results.get(timeout=TIMEOUT) for _ in procs]
        for proc in procs:
            proc.join(timeout=TIMEOUT)
    failures = [o for o in outcomes if o != "ok"]
    return len(outcomes), len(failures), sorted(set(failures))


# ---------------------------------------------------------------------------------------------- disk full


SIMULATED_FULL = """
import sys
from sweep import store
real_open = store.open_db
def open_limited(path, create=True):  # the file may not grow by more than EXTRA pages: SQLITE_FULL after that
    db = real_open(path, create)
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0] + EXTRA}")
    return db
store.open_db = open_limited
from sweep.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
"""``python -c`` wrapper of ``sweep run`` simulating a full disk (SQLite's own SQLITE_FULL) where no tmpfs can
be mounted (not root)."""


@contextlib.contextmanager
def small_disk(where: Path, size_kb: int, allowed: bool = True) -> Iterator[tuple[Path, callable] | None]:
    """A tmpfs of ``size_kb`` KiB mounted at ``where`` (root only), and a function that grows it; None if no
    tmpfs can be mounted here (or not ``allowed``). Unmounted on exit."""
    where.mkdir(exist_ok=True)
    mounted = allowed and os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                                                    str(where)], capture_output=True).returncode == 0
    if not mounted:
        yield None
        return
    try:
        yield where, lambda kb: subprocess.run(["mount", "-o", f"remount,size={kb}k", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def disk_full(work: Path, size_kb: int = 320, tmpfs: bool = True) -> Figures:
    """The disk fills mid-sweep (a small tmpfs, or SQLite's SQLITE_FULL where none can be mounted): one line
    naming the cause and the way out, no traceback, the run recorded ``failed``, every committed row kept; a
    re-run while still full says the same; once space is freed, the same command finishes the plan.
    ``tmpfs=False``: simulate even as root."""
    model_dir, text = make_fixture(work)
    with small_disk(work / "small-disk", size_kb, allowed=tmpfs) as disk:
        if disk is not None:
            db, how = fresh(disk[0] / "full.db"), f"tmpfs of {size_kb} KiB"
            full_args = sweep_args(model_dir, text, db, work / "cache", "--engine", "per-variant")
            free = lambda: disk[1](64 * 1024)  # noqa: E731
        else:
            db, how = fresh(work / "full.db"), "simulated SQLITE_FULL (PRAGMA max_page_count; no tmpfs without root)"
            full_args = [sys.executable, "-c", SIMULATED_FULL.replace("EXTRA", "1"),
                         *sweep_args(model_dir, text, db, work / "cache", "--engine", "per-variant")[3:]]
            free = lambda: None  # noqa: E731
        args = sweep_args(model_dir, text, db, work / "cache", "--engine", "per-variant")
        env = _env(work, "delay=0.01")
        figures, seen = Figures(f"disk full mid-sweep ({how})"), set()
        first = run(full_args, env)
        seen |= result_keys(db)
        stored_when_full = len(seen)
        again = run(full_args, env)
        free()
        done = run(args, env)
        figures.runs, figures.kills = 3, 2
        statuses = run_statuses(db)
        figures.check("full: exit 2 with one line naming the full disk",
                      first.returncode == 2 and one_line_error(first.stderr, "disk is full", "run the same command"))
        figures.check("full: run recorded failed", statuses[:1] == ["failed"])
        figures.check("still full: one line, no 'cannot rollback'",
                      again.returncode == 2 and one_line_error(again.stderr) and "cannot rollback" not in again.stderr)
        figures.check("space freed: the same command finishes (exit 0)", done.returncode == 0)
        figures.notes.append(f"{stored_when_full} rows stored when the disk filled; `{last_line(first.stderr)[:150]}`; "
                             f"re-run while full: `{last_line(again.stderr)[:80]}`; runs: {statuses}")
        return audit(db, figures, seen)


# ---------------------------------------------------------------------------------------------- bad files


@dataclass
class BadFile:
    """One bad ``--db`` through the CLI."""

    name: str
    code: int
    message: str
    untouched: bool | None = None
    """Whether the file's bytes are unchanged (None where not checked: a file that could not be read)."""

    @property
    def clean(self) -> bool:
        return self.code == 2 and self.message.startswith("sweep: error:") and self.untouched is not False


def bad_files(work: Path) -> list[BadFile]:
    """Each bad DB file through the CLI: exit code, the one line of stderr, and whether the file is untouched."""
    from unittest import mock

    from sweep import store
    from sweep.cli import main

    model_dir, text = make_fixture(work)
    cases: list[BadFile] = []

    def attempt(name: str, db: Path, check_untouched: bool = False) -> None:
        import io

        before = db.read_bytes() if check_untouched else None
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(sweep_args(model_dir, text, db, work / "cache")[3:])
        untouched = (db.read_bytes() == before and not Path(f"{db}-wal").exists()) if check_untouched else None
        cases.append(BadFile(name, code, last_line(err.getvalue()) if len(err.getvalue().splitlines()) == 1
                             else err.getvalue().strip()[-300:], untouched))

    def plain(path: Path, *statements: str) -> Path:
        """Rewrite ``path`` in rollback-journal mode (so any change shows in its bytes), running ``statements``."""
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=DELETE")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        conn.close()
        return path

    newer, unreadable = work / "newer.db", work / "unreadable-version.db"
    for path in (newer, unreadable):
        store.open_db(fresh(path)).close()
    attempt("newer schema version", plain(newer, "UPDATE meta SET value = '99' WHERE key = 'schema_version'"), True)
    attempt("unreadable schema version ('1a')",
            plain(unreadable, "UPDATE meta SET value = '1a' WHERE key = 'schema_version'"), True)
    foreign = fresh(work / "foreign.db")
    attempt("another application's SQLite file (its own `results` table)",
            plain(foreign, "CREATE TABLE results (id INTEGER PRIMARY KEY, score REAL)",
                  "INSERT INTO results VALUES (1, 2.5)"), True)
    corrupt = work / "corrupt.db"
    corrupt.write_bytes(os.urandom(8192))
    attempt("corrupt file (random bytes)", corrupt, True)
    truncated = work / "truncated.db"
    truncated.write_bytes(b"SQLite format 3\x00" + newer.read_bytes()[16:2000])
    attempt("truncated file", truncated, True)
    read_only = work / "read-only.db"
    if read_only.exists():
        os.chmod(read_only, 0o644)
    store.open_db(fresh(read_only)).conn.close()
    os.chmod(read_only, 0o444)
    attempt("read-only file", read_only)
    with mock.patch.object(store.db, "filesystem_type", lambda path: "nfs4"):
        attempt("network filesystem (nfs4, detection patched)", work / "on-nfs.db")
    with mock.patch.object(store.db, "_read_only_filesystem", lambda path: True):
        attempt("read-only filesystem (detection patched)", work / "on-ro.db")
    return cases


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Campaign:
    figures: list[Figures]
    bad: list[BadFile]
    opens: tuple[int, int, list[str]]
    seconds: float

    @property
    def clean(self) -> bool:
        return all(f.clean for f in self.figures) and all(b.clean for b in self.bad) and self.opens[1] == 0


def campaign(work: Path, kills: int, seed: int = 0) -> Campaign:
    start = time.perf_counter()
    figures = [coordinator_kills(work, kills, seed), coordinator_kills(work, max(2, kills // 5), seed, workers=2),
               signal_midway(work), signal_midway(work, workers=2), signal_midway(work, signal.SIGTERM),
               signal_midway(work, signal.SIGTERM, workers=2), signal_midway(work, twice=True),
               worker_kill(work), worker_kill(work, always=True), sticky_error(work), orphaned_workers(work),
               oom_and_nan(work), short_last_window(work), concurrent_sweeps(work), slow_chunk(work),
               racing_creates(work), disk_full(work)]
    opens = racing_opens(work)
    return Campaign(figures, bad_files(work), opens, time.perf_counter() - start)


def markdown(result: Campaign, kills: int) -> str:
    import platform

    lines = [
        "# Reliability: fault-injection campaign",
        "",
        (f"Generated by `python bench/reliability.py --kills {kills}` (`make reliability`) on {platform.node()} "
         f"({os.cpu_count()} CPUs, Python {platform.python_version()}) in {result.seconds:.0f} s, "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every figure below comes from that run: "
         f"{'all clean' if result.clean else 'PROBLEMS FOUND'}."),
        "",
        (f"Model: seeded random-init GPT-2, {N_LAYERS} layers, byte tokenizer; plan: exhaustive, {N_VARIANTS} variants "
         "unless the scenario says otherwise; CPU; real `python -m sweep run` processes. Kills strike after the "
         "campaign sees new rows in the DB."),
        "",
        ("| scenario | runs | kills/faults | planned | stored | lost | duplicate rows | completed re-measured "
         "| runs left `running` | integrity_check | checks | notes |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for f in result.figures:
        notes = "; ".join(f.notes).replace("|", "\\|")
        checks = (f"{len(f.checks)}/{len(f.checks)} hold" if not f.failed_checks
                  else "FAILED: " + ", ".join(f.failed_checks)).replace("|", "\\|")
        lines.append(f"| {f.scenario} | {f.runs} | {f.kills} | {f.planned} | {f.variants} | {f.lost} | {f.duplicates} "
                     f"| {f.remeasured} | {f.running} | {f.integrity} | {checks} | {notes} |")
    opens, failures, errors = result.opens
    lines += ["", "Checks per scenario (each must hold for the scenario to be clean):", ""]
    lines += [f"- {f.scenario}: " + "; ".join(f"{name} {'✓' if holds else '✗'}" for name, holds in f.checks.items())
              for f in result.figures]
    lines += ["", (f"Opening one new DB from 3 processes at the same instant (a barrier), "
                   f"{opens // 3} times: {failures} of {opens} opens failed"
                   + (f" ({'; '.join(errors)[:300]})" if errors else "") + "."),
              "", "Bad DB files (`sweep run --db FILE`), each answered with a one-line error and exit code 2, the "
              "file left byte for byte as it was (not switched to WAL) where checked:", "",
              "| file | exit | untouched | message |", "| --- | ---: | --- | --- |"]
    lines += [f"| {b.name} | {b.code} | {'—' if b.untouched is None else 'yes' if b.untouched else 'NO'} "
              f"| `{b.message}` |" for b in result.bad]
    lines += ["", ("Definitions: *planned* = result rows the scenario's plans call for; *stored* = rows at the end; "
              "*lost* = committed (per the `measurements` log, or seen while polling) but missing at the end; "
              "*completed re-measured* = a measurement committed for a variant that already had an `ok`/`diverged` "
              "row; *runs left running* = `runs` rows still `running` after the final resume."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="coordinator kills across the 64-variant sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sweep-reliability-") as tmp:
        result = campaign(Path(tmp), args.kills, args.seed)
    text = markdown(result, args.kills)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}: {'all clean' if result.clean else 'PROBLEMS FOUND'}", file=sys.stderr)
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())

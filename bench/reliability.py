"""Fault-injection campaign: kill, interrupt and corrupt sweeps of a tiny model; count what was lost.

    python bench/reliability.py                  # full campaign (20 coordinator kills), writes docs/reliability.md
    python bench/reliability.py --kills 5 --out /tmp/r.md

Every scenario runs real ``python -m sweep run`` processes on CPU (a seeded 6-layer random-init GPT-2, byte
tokenizer, 64-variant exhaustive plan) and then audits the DB:

- lost: variants whose measurement was committed (the ``measurements`` log) or seen in ``results`` while the
  campaign polled, but that are missing from ``results`` at the end (must be 0);
- duplicates: more than one ``results`` row for a (setup, variant) (must be 0);
- re-measured: measurements of a variant committed after it already had an ``ok``/``diverged`` row (must be 0);
- running: ``runs`` rows still ``running`` after the final resume (must be 0);
- integrity: ``PRAGMA integrity_check``.

Kills strike after observing DB progress (polling the results count), not after sleeps, so a busy machine does
not make them land before the first commit or after the last. ``SWEEP_FAULTS`` (see ``sweep.engine.faults``) slows
every variant a little so a kill lands mid-sweep, and injects OOM, NaN, worker deaths and sticky errors.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 6
N_VARIANTS = 2**N_LAYERS  # exhaustive: 63 removals + the baseline
TIMEOUT = 120.0


@dataclass
class Figures:
    """One scenario's audit."""

    scenario: str
    runs: int = 0
    kills: int = 0
    variants: int = 0
    lost: int = 0
    duplicates: int = 0
    remeasured: int = 0
    running: int = 0
    integrity: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return (self.lost, self.duplicates, self.remeasured, self.running, self.integrity) == (0, 0, 0, 0, "ok")


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
    return [sys.executable, "-m", "sweep", "run", "--model", str(model_dir), "--data", str(text), "--db", str(db),
            "--cache-dir", str(cache), "--strategy", "exhaustive", "--max-length", "32", "--max-tokens", "256",
            "--latency", "off", "--device", "cpu", "--quiet", *extra]


def _env(faults: str = "", faults_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    env.pop("SWEEP_FAULTS", None)
    if faults:
        env["SWEEP_FAULTS"] = faults
        env["SWEEP_FAULTS_DIR"] = str(faults_dir or tempfile.mkdtemp(prefix="sweep-faults-"))
    return env


# ---------------------------------------------------------------------------------------------- audit


def _query(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def result_keys(db: Path) -> set[str]:
    """Variant keys with a results row (any status); empty while the DB or its tables do not exist yet."""
    try:
        return {r[0] for r in _query(db, "SELECT removed FROM results")}
    except sqlite3.OperationalError:
        return set()


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


def run(args: list[str], env: dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def start_and_strike(args: list[str], env: dict[str, str], db: Path, target: int, seen: set[str],
                     strike: signal.Signals) -> tuple[subprocess.Popen, bool]:
    """Start a sweep, wait until ``results`` has ``target`` rows, then send ``strike``; return (proc, struck)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and time.time() < deadline:
        keys = result_keys(db)
        seen |= keys
        if len(keys) >= target:
            proc.send_signal(strike)
            return proc, True
        time.sleep(0.02)
    return proc, False


# ---------------------------------------------------------------------------------------------- scenarios


def coordinator_kills(work: Path, kills: int, seed: int = 0, workers: int = 1) -> Figures:
    """kill -9 the coordinator after a random number of new results, ``kills`` times; resume each time."""
    model_dir, text = make_fixture(work)
    db = work / f"kills-w{workers}.db"
    rng = random.Random(seed)
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", str(workers), "--engine", "per-variant")
    env = _env("delay=0.02")
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
    if done.returncode != 0:
        figures.notes.append(f"final resume exit {done.returncode}: {done.stderr.strip()[-200:]}")
    return audit(db, figures, seen)


def sigint_midway(work: Path, workers: int = 1) -> Figures:
    """Ctrl-C mid-sweep: exit 130, no row in a bad state; the same command resumes."""
    model_dir, text = make_fixture(work)
    db = work / f"sigint-w{workers}.db"
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", str(workers), "--engine", "per-variant")
    env = _env("delay=0.02")
    figures, seen = Figures(f"SIGINT mid-sweep (workers={workers})"), set()
    proc, struck = start_and_strike(args, env, db, 8, seen, signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    figures.runs, figures.kills = 1, int(struck)
    partial = len(result_keys(db))
    figures.notes.append(f"interrupted run exit {proc.returncode} with {partial}/{N_VARIANTS} measured")
    if proc.returncode not in (0, 130):
        figures.notes.append(f"unexpected exit: {err.strip()[-200:]}")
    done = run(args, env)
    figures.runs += 1
    figures.notes.append(f"resume exit {done.returncode}")
    return audit(db, figures, seen)


def worker_kill(work: Path, always: bool = False) -> Figures:
    """kill -9 one of two worker processes mid-chunk: re-queued once (``kill-once``) or failed rows (``kill``)."""
    model_dir, text = make_fixture(work)
    db = work / f"worker-kill-{'always' if always else 'once'}.db"
    args = sweep_args(model_dir, text, db, work / "cache", "--workers", "2")
    victim = "2,3"
    env = _env(f"{'kill' if always else 'kill-once'}={victim};delay=0.01")
    figures = Figures(f"kill -9 one worker ({'every time' if always else 'once'})")
    first = run(args, env)
    figures.runs, figures.kills = 1, 1
    status = dict(_query(db, "SELECT removed, status FROM results"))
    failed = sorted(k for k, s in status.items() if s == "failed")
    figures.notes.append(f"exit {first.returncode}; {len(status)}/{N_VARIANTS} rows, failed: {failed or 'none'}")
    if always:
        again = run(args, _env())
        figures.runs += 1
        ok = sum(s == "ok" for s in dict(_query(db, "SELECT removed, status FROM results")).values())
        figures.notes.append(f"victim {victim} failed: {status.get(victim) == 'failed'}; "
                             f"a re-run without the fault: exit {again.returncode}, {ok} ok")
    return audit(db, figures, set())


def sticky_error(work: Path) -> Figures:
    """A sticky CUDA error in one worker (injected): the pool is recycled, the chunk re-queued, all rows ok."""
    model_dir, text = make_fixture(work)
    db = work / "sticky.db"
    done = run(sweep_args(model_dir, text, db, work / "cache", "--workers", "2"), _env("sticky-once=1,4"))
    figures = Figures("sticky CUDA error in a worker (once)", runs=1, kills=1)
    ok = _query(db, "SELECT COUNT(*) FROM results WHERE status = 'ok'")[0][0]
    figures.notes.append(f"exit {done.returncode}; {ok}/{N_VARIANTS} ok")
    return audit(db, figures, set())


def worker_faults(work: Path) -> Figures:
    """One two-worker sweep with a worker killed once and a sticky error once (the CI test's short version)."""
    model_dir, text = make_fixture(work)
    db = work / "worker-faults.db"
    done = run(sweep_args(model_dir, text, db, work / "cache", "--workers", "2"),
               _env("kill-once=2,3;sticky-once=1,4;delay=0.01"))
    figures = Figures("worker killed once + sticky error once", runs=1, kills=2)
    figures.notes.append(f"exit {done.returncode}")
    return audit(db, figures, set())


def oom_and_nan(work: Path) -> Figures:
    """Injected OOM (every batch size -> failed; first batch only -> ok after the retry) and NaN (-> diverged)."""
    model_dir, text = make_fixture(work)
    db = work / "oom-nan.db"
    done = run(sweep_args(model_dir, text, db, work / "cache"), _env("oom=0,1;oom-retry=2;nan=3"))
    status = dict(_query(db, "SELECT removed, status || ':' || COALESCE(error, '') FROM results"))
    figures = Figures("injected OOM and NaN", runs=1)
    figures.notes.append(f"exit {done.returncode}; 0,1 -> {status.get('0,1', '?')[:60]}; 2 -> {status.get('2')}; "
                         f"3 -> {status.get('3', '?')[:40]}")
    return audit(db, figures, set())


def concurrent_sweeps(work: Path) -> Figures:
    """Two sweeps of the same setup started at once on one DB: one measures, the other refuses."""
    model_dir, text = make_fixture(work)
    db = work / "concurrent.db"
    args = sweep_args(model_dir, text, db, work / "cache", "--engine", "per-variant")
    env = _env("delay=0.01")
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=TIMEOUT), p.stderr.read()) for p in procs]
    figures = Figures("two sweeps at once on one DB", runs=2)
    refused = sum("another sweep" in err for _, err in outcomes)
    figures.notes.append(f"exits {[code for code, _ in outcomes]}; refused with 'another sweep': {refused}")
    return audit(db, figures, set())


def bad_files(work: Path) -> list[tuple[str, int, str]]:
    """Each bad DB file through the CLI: (case, exit code, first line of stderr)."""
    from unittest import mock

    from sweep import store
    from sweep.cli import main

    model_dir, text = make_fixture(work)
    cases: list[tuple[str, int, str]] = []

    def attempt(name: str, db: Path) -> None:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(sweep_args(model_dir, text, db, work / "cache")[3:])
        cases.append((name, code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""))

    newer = work / "newer.db"
    store.open_db(newer).execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'").connection.commit()
    attempt("newer schema version", newer)
    corrupt = work / "corrupt.db"
    corrupt.write_bytes(os.urandom(8192))
    attempt("corrupt file (random bytes)", corrupt)
    truncated = work / "truncated.db"
    good = work / "oom-nan.db" if (work / "oom-nan.db").exists() else newer
    truncated.write_bytes(b"SQLite format 3\x00" + good.read_bytes()[16:2000])
    attempt("truncated file", truncated)
    read_only = work / "read-only.db"
    store.open_db(read_only).conn.close()
    os.chmod(read_only, 0o444)
    attempt("read-only file", read_only)
    with mock.patch.object(store.db, "filesystem_type", lambda path: "nfs4"):
        attempt("network filesystem (nfs4, detection patched)", work / "on-nfs.db")
    with mock.patch.object(store.db, "_read_only_filesystem", lambda path: True):
        attempt("read-only filesystem (detection patched)", work / "on-ro.db")
    return cases


# ---------------------------------------------------------------------------------------------- report


def campaign(work: Path, kills: int, seed: int = 0) -> tuple[list[Figures], list[tuple[str, int, str]], float]:
    start = time.perf_counter()
    figures = [coordinator_kills(work, kills, seed), coordinator_kills(work, max(2, kills // 5), seed, workers=2),
               sigint_midway(work), sigint_midway(work, workers=2), worker_kill(work), worker_kill(work, always=True),
               sticky_error(work), oom_and_nan(work), concurrent_sweeps(work)]
    return figures, bad_files(work), time.perf_counter() - start


def markdown(figures: list[Figures], cases: list[tuple[str, int, str]], seconds: float, kills: int) -> str:
    import platform

    lines = [
        "# Reliability: fault-injection campaign",
        "",
        (f"Generated by `python bench/reliability.py --kills {kills}` (`make reliability`) on {platform.node()} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}) in {seconds:.0f} s, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every figure below comes from that run."),
        "",
        (f"Model: seeded random-init GPT-2, {N_LAYERS} layers, byte tokenizer; plan: exhaustive, {N_VARIANTS} variants; "
        "CPU; real `python -m sweep run` processes. Kills strike after the campaign sees new rows in the DB."),
        "",
        ("| scenario | runs | kills/faults | variants in DB | lost | duplicate rows | completed re-measured "
        "| runs left `running` | integrity_check | notes |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for f in figures:
        notes = "; ".join(f.notes).replace("|", "\\|")
        lines.append(f"| {f.scenario} | {f.runs} | {f.kills} | {f.variants} | {f.lost} | {f.duplicates} "
                     f"| {f.remeasured} | {f.running} | {f.integrity} | {notes} |")
    lines += ["", "Bad DB files (`sweep run --db FILE`), each answered with a one-line error and exit code 2:", "",
              "| file | exit | message |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {code} | `{message}` |" for name, code, message in cases]
    lines += ["", ("Definitions: *lost* = committed (per the `measurements` log, or seen while polling) but missing "
              "at the end; *completed re-measured* = a measurement committed for a variant that already had an "
              "`ok`/`diverged` row; *runs left running* = `runs` rows still `running` after the final resume."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="coordinator kills across the 64-variant sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sweep-reliability-") as tmp:
        figures, cases, seconds = campaign(Path(tmp), args.kills, args.seed)
    text = markdown(figures, cases, seconds, args.kills)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    clean = all(f.clean for f in figures) and all(code == 2 for _, code, _ in cases)
    print(f"wrote {args.out}: {'all clean' if clean else 'PROBLEMS FOUND'}", file=sys.stderr)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())

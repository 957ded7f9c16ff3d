"""Orchestration: plan -> perplexity per variant (sub-tries) -> latency per shape signature -> one DB row each.

Reads like a table of contents; the work happens in ``plan``, ``worker`` and ``store``.
"""
from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sweep import Log, intervals, store
from sweep.config import SweepConfig, plan_spec
from sweep.engine import identity, models, parallel, race
from sweep.engine.adapters import n_layers_of
from sweep.engine.device import is_sticky_error
from sweep.engine.similarity import signal_removals
from sweep.engine.worker import Worker, load_worker
from sweep.errors import StoreError
from sweep.plan import Removal, format_duration, normalized, parse_key, plan_variants, variant_key, variant_order
from sweep.steps import members


@dataclass
class Summary:
    """What a run did, for the closing line."""

    planned: int = 0
    already_done: int = 0
    measured: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    setup: str = ""
    batch_size: int = 0
    """Windows per forward pass the worker used (the automatic choice when --batch-size is 0)."""
    layer_calls: int = 0
    """Decoder layer calls this process ran (the trie's replays and capture forwards, or per-variant forwards)."""
    head_calls: int = 0
    """LM head + loss calls this process ran (one per batch of windows per distinct kept-layer sequence)."""
    stop_signal: int | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run early, if one did."""


def open_setup(cfg: SweepConfig, worker: Worker):
    """Open the DB and register the model and evaluation setup of ``worker`` (:mod:`identity`); (db, setup id)."""
    db = store.open_db(cfg.db)
    setup = identity.evaluation_setup(cfg, worker.model.config, worker.tokens, worker.setup, worker.device)
    return db, identity.register_setup(db, setup)


class StopFlag:
    """First Ctrl-C or SIGTERM (what a scheduler sends): finish the current variant or chunk, then stop.
    A second one: stop at once. Either way the run is recorded ``interrupted`` and the same command resumes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Log):
        self.stop = False
        self.signal: int | None = None
        """The signal that asked to stop (None while none did, or when a sticky device error stopped the run)."""
        self.log = log
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop, self.signal = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"\n{name}: stopping after the current variant or chunk (again to stop now; results so far are "
                 "saved and the same command resumes)")

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


@dataclass
class Run:
    """One run of the measuring loop, made once and handed to every step: the config, the loaded worker, the DB
    and the setup id it measures, where its lines go, and what it has done so far."""

    cfg: SweepConfig
    worker: Worker
    db: store.Database
    setup: str
    log: Log = print
    progress: bool = True
    """Progress bars (and, while they are drawn, lines written above them)."""
    summary: Summary = field(default_factory=Summary)
    run_id: int | None = None
    """Its row in the ``runs`` table once registered (:func:`_registered_run`); None for :func:`measure_variants`."""
    stop: StopFlag = field(init=False)
    """Set by Ctrl-C or SIGTERM while its handlers are installed (``with run.stop:``), or by a sticky device error."""

    def __post_init__(self) -> None:
        self.stop = StopFlag(self.log)

    def should_stop(self) -> bool:
        return self.stop.stop

    def beat(self) -> None:
        """Keep the run's heartbeat fresh (and its count of measured variants)."""
        if self.run_id is not None:
            store.heartbeat(self.db, self.run_id, self.summary.measured)

    def write(self, line: str) -> None:
        """A line for the user: above the progress bars while they are drawn."""
        (tqdm.write if self.progress else self.log)(line)


def open_run(cfg: SweepConfig, worker: Worker, log: Log = print, progress: bool = True) -> Run:
    """The :class:`Run` of ``worker``'s setup (:func:`open_setup`)."""
    db, setup = open_setup(cfg, worker)
    return Run(cfg, worker, db, setup, log, progress)


def run_sweep(cfg: SweepConfig, log: Log = print, progress: bool = True) -> Summary:
    """Measure every planned variant not yet in the DB, writing each row as soon as it is measured.

    Raises:
        SweepError subclasses for bad input, before anything is written to the DB; StoreError when the DB
        cannot be written mid-run (disk full...): the run is then recorded ``failed`` and every committed row kept.
    """
    start = time.perf_counter()
    store.check_writable(cfg.db)
    n_layers = n_layers_of(models.config_for(cfg))
    variants = plan_variants(n_layers, plan_spec(cfg))  # bad plans fail before the model loads
    parallel.resolve_workers(cfg)  # so do worker counts the machine cannot pin
    run = open_run(cfg, load_worker(cfg), log, progress)
    variants = with_signal_variants(run, variants)
    run.worker.check_variants(variants)  # e.g. attention removal on GPT-J: refused before anything is written
    store.reap_dead_runs(run.db, run.setup)  # a crashed earlier run is closed even when nothing is left to measure
    done = store.done_keys(run.db, run.setup, ("ok", "diverged", "eliminated") if cfg.race else ("ok", "diverged"))
    todo = [v for v in variants if variant_key(v) not in done]
    summary = run.summary
    summary.planned, summary.already_done = len(variants), len(variants) - len(todo)
    summary.setup, summary.batch_size = run.setup, run.worker.batch_size
    log(f"{cfg.model}: {n_layers} layers, {len(variants):,} variants planned ({cfg.strategy}), "
        f"{summary.already_done:,} already in {cfg.db}, {len(todo):,} to measure on {run.worker.device_name} "
        f"({_engine_line(run)}) [setup {run.setup}]")
    # An earlier run stopped before its latency phase leaves rows waiting for their timing: also a run's work.
    if todo or (cfg.latency == "shared" and store.awaiting_latency(run.db, run.setup)):
        try:
            _registered_run(run, len(variants), todo)
        finally:
            if summary.measured:  # what is measured gets its interval, even when stopped early
                intervals.refresh_intervals(run.db, run.setup, cfg.resamples)
    summary.layer_calls, summary.head_calls = run.worker.calls.layer_calls, run.worker.calls.head_calls
    summary.seconds = time.perf_counter() - start
    log(closing_line(run))
    return summary


def _registered_run(run: Run, planned: int, todo: list[Removal]) -> None:
    """Measure ``todo`` (or only the latency an earlier run left waiting) as a run in the ``runs`` table.

    While it works a background thread keeps its heartbeat fresh; Ctrl-C and SIGTERM stop it cleanly. It ends
    ``done``, ``interrupted`` (a signal, even a second one that stops at once) or ``failed`` (an error, re-raised).
    """
    summary = run.summary
    run.run_id = store.start_run(run.db, run.setup, planned, len(todo), " ".join(sys.argv))
    with run.stop:
        try:
            with store.beating(run.db, run.run_id):
                if todo:
                    _announce_estimate(run, todo)
                    _measure_all(run, todo)
                else:
                    _latency_for(run, [])
                    summary.interrupted = bool(store.awaiting_latency(run.db, run.setup))
        except BaseException as exc:
            summary.interrupted = isinstance(exc, KeyboardInterrupt)
            _close_run(run, "interrupted" if summary.interrupted else "failed", failing=True)
            raise
        summary.stop_signal = run.stop.signal
        _close_run(run, "interrupted" if summary.interrupted else "done")


def _close_run(run: Run, status: str, failing: bool = False) -> None:
    """Record how the run ended. While an error is already on its way out (``failing``), a DB that cannot take
    even this (the disk still full) is said in one line instead of hiding that error."""
    try:
        store.finish_run(run.db, run.run_id, status, run.summary.measured)
    except StoreError as exc:
        if not failing:
            raise
        run.log(f"run {run.run_id} could not be recorded {status} ({exc}); `sweep status` shows it abandoned once "
                "this process has exited")


def _engine_line(run: Run) -> str:
    """How variants are evaluated, e.g. "trie engine, 16 windows per batch, compiled chunked head, 2 threads"."""
    cfg, worker = run.cfg, run.worker
    engine = "trie" if cfg.engine == "trie" and worker.trie_ok else "per-variant"
    auto = " (auto)" if not cfg.batch_size else ""
    threads = f", {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}" \
        if worker.device.type == "cpu" else ""
    return f"{engine} engine, {worker.batch_size} windows per batch{auto}, {worker.head_loss.name} head{threads}"


PER_VARIANT_GROUP = 16
"""With --latency per-variant, variants are timed (interleaved) in groups of this many, so results keep flowing."""


def _signature(run: Run, removed: Removal) -> str:
    """Latency is shared between variants with equal signatures; per-variant mode makes every variant unique."""
    return f"variant:{variant_key(removed)}" if run.cfg.latency == "per-variant" else run.worker.signature(removed)


CHUNK_SECONDS = 30.0
"""Target evaluation time of one chunk (sub-trie): results reach the DB at least this often (roughly)."""


def _measure_all(run: Run, todo: list[Removal]) -> None:
    """Evaluate ``todo`` in chunks (sub-tries), committing each chunk's rows as soon as it is measured."""
    cfg, worker, summary = run.cfg, run.worker, run.summary
    if cfg.race:
        return _race_all(run, todo)
    n_workers = parallel.resolve_workers(cfg)
    if n_workers > 1 or cfg.backend == "dask":
        return _measure_parallel(run, todo, n_workers)
    per_variant_latency = cfg.latency == "per-variant"
    # Perplexity first, so results reach the DB from the first chunk on; rows of signatures not timed yet are
    # completed by the latency phase at the end (_latency_for with nothing new to plan).
    latency = {} if per_variant_latency else store.latency_by_signature(run.db, run.setup)
    order = trie_order(todo, worker) if cfg.engine == "trie" and worker.trie_ok else list(todo)
    bar = tqdm(total=len(todo), desc="variants", unit="variant", disable=not run.progress, dynamic_ncols=True)
    size, first = (FIRST_CHUNK if cfg.engine == "trie" else 1), 0
    while first < len(order) and not run.should_stop():
        chunk = order[first : first + min(size, PER_VARIANT_GROUP if per_variant_latency else size)]
        if per_variant_latency:
            latency.update(_latency_for(run, chunk, phase=False))
        rows = _evaluate_in_process(run, chunk)
        _commit(run, chunk, rows, latency)
        bar.update(len(chunk))
        if first == 0 and len(todo) > len(chunk):
            _first_estimate(rows[0], len(todo))
        first += len(chunk)
        if cfg.engine == "trie":  # per-variant chunks stay at one variant: Ctrl-C stops after the current one
            size = next_chunk_size(rows, size)
    summary.interrupted = first < len(order)
    bar.close()
    if not summary.interrupted and not per_variant_latency:
        _latency_phase(run)


def _latency_phase(run: Run) -> None:
    """Time every signature still waiting (:func:`_latency_for`); stopped during it, the run is interrupted."""
    _latency_for(run, [])
    run.summary.interrupted = bool(store.awaiting_latency(run.db, run.setup))


def _race_all(run: Run, todo: list[Removal]) -> None:
    """Race ``todo`` (:mod:`race`): every slice's rows committed as measured, then the latency phase."""
    summary = run.summary
    latency = {} if run.cfg.latency == "off" else store.latency_by_signature(run.db, run.setup)

    def record(chunk: list[Removal], rows: list[dict]) -> None:
        _record_chunk(run, chunk, rows, latency)  # a variant is committed once per slice: count finished ones
        summary.measured = racer.finished
        summary.failed += sum(r["status"] in ("failed", "diverged") for r in rows)
        run.beat()

    racer = race.Racer(run.cfg, run.worker, run.db, run.setup, record, log=run.write)
    summary.interrupted = not racer.run(todo, should_stop=run.should_stop)
    summary.measured = racer.finished
    if not summary.interrupted:
        _latency_phase(run)


def _record_chunk(run: Run, chunk: list[Removal], rows: list[dict], latency: dict) -> None:
    """Add latency columns to a chunk's rows and commit them together (one transaction, measurement log too)."""
    records = []
    for removed, row in zip(chunk, rows):
        signature = _signature(run, removed)
        timing = dict(latency.get(signature, {}))
        if "latency_error" in timing:  # perplexity stands; say why the speed columns are empty
            row = {**row, "error": "; ".join(x for x in (row.get("error"), "latency failed: "
                                                         + timing.pop("latency_error")) if x)}
        records.append({**row, **timing, "setup_id": run.setup,
                        "latency_signature": signature if run.cfg.latency != "off" else None})
    store.record_results(run.db, records, run.run_id)


def _commit(run: Run, chunk: list[Removal], rows: list[dict], latency: dict) -> None:
    """Record the rows of a chunk of finished variants, count them (and those not ``ok``), and beat."""
    _record_chunk(run, chunk, rows, latency)
    run.summary.measured += len(chunk)
    run.summary.failed += sum(row["status"] != "ok" for row in rows)
    run.beat()


def measure_variants(cfg: SweepConfig, worker, db, setup: str, variants: list[Removal], log: Log = print) -> None:
    """Measure a few variants in process and commit them exactly as `sweep run` does (perplexity, latency per
    signature unless --latency off, measurement log), for commands that need rows `sweep run` has not made yet."""
    run = Run(cfg, worker, db, setup, log, progress=False)
    latency = _latency_for(run, variants, phase=False)
    _record_chunk(run, variants, worker.evaluate_many(variants), latency)


def _evaluate_in_process(run: Run, chunk: list[Removal]) -> list[dict]:
    """Rows of a chunk; a sticky CUDA error (the process's CUDA context is lost) fails the chunk and stops."""
    try:
        return run.worker.evaluate_many(chunk)
    except RuntimeError as exc:
        if not is_sticky_error(exc):
            raise
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        run.log(f"\n{error}\nthis process can no longer use the GPU; the same command resumes in a new process "
                "(the failed variants are retried); --workers 2 or more recycles worker processes automatically")
        run.stop.stop = True
        return [run.worker.failed_row(r, error) for r in chunk]


def _measure_parallel(run: Run, todo: list[Removal], n_workers: int) -> None:
    """Measure ``todo`` on worker processes; this process (the coordinator) alone writes the DB.

    Latency is measured here first, for every signature of the plan, while no perplexity work competes for
    the device; then this process's copy of the model leaves the GPU and the workers take over.
    """
    cfg, worker = run.cfg, run.worker
    if cfg.backend == "dask" and cfg.workers is None:  # the cluster's size, not this machine's GPUs
        n_workers = parallel.cluster_workers(cfg)
    latency = _latency_for(run, todo)
    if run.should_stop():
        run.summary.interrupted = True
        return
    prefix_sharing = cfg.engine == "trie" and worker.trie_ok
    order = trie_order(todo, worker) if prefix_sharing else list(todo)
    # Priced one by one: a chunk is a small sub-trie that shares far less than the whole plan.
    per_variant = worker.estimate_seconds(order, shared=False) / len(order) if prefix_sharing else 1.0
    worker.release_device()
    chunks = parallel.chunked(order, parallel.chunk_size(len(order), n_workers, per_variant, prefix_sharing,
                                                         CHUNK_SECONDS))
    where = f"Dask cluster {cfg.scheduler} ({n_workers} workers)" if cfg.backend == "dask" \
        else f"{n_workers} worker processes"
    run.log(f"{len(order):,} variants in {len(chunks):,} chunks on {where}")
    bar = tqdm(total=len(todo), desc="variants", unit="variant", disable=not run.progress, dynamic_ncols=True)
    for chunk, rows in parallel.run_chunks(cfg, chunks, n_workers, _failed_rows(worker),
                                           should_stop=run.should_stop, log=run.write):
        _commit(run, chunk, rows, latency)
        bar.update(len(chunk))
    bar.close()
    run.summary.interrupted = run.summary.measured < len(todo)


def _failed_rows(worker):
    return lambda chunk, error: [{**worker.failed_row(r, error), "eval_seconds": None} for r in chunk]


FIRST_CHUNK = 8
"""Variants in the first trie chunk; later chunks are sized from its time (:func:`next_chunk_size`)."""


def trie_order(todo: list[Removal], worker) -> list[Removal]:
    """Variants sorted by step sequence, so that consecutive chunks are sub-tries sharing long prefixes.

    Example, 3 layers: kept [] (all removed), [0], [0, 1], [0, 1, 2] (baseline), [0, 2], [1], [1, 2], [2]; a
    unit step sorts beside its whole layer (``0a, 0, 0m``), a parallel group by its members.
    """
    return sorted(todo, key=lambda removed: [tuple((m.layer, m.branches) for m in members(s))
                                             for s in worker.steps_of(removed)])


def next_chunk_size(rows: list[dict], size: int) -> int:
    """Grow or shrink chunks so that one takes about CHUNK_SECONDS."""
    per_variant = max(sum(r.get("eval_seconds") or 0.0 for r in rows) / max(len(rows), 1), 1e-3)
    return max(1, min(512, int(CHUNK_SECONDS / per_variant)))


def _latency_for(run: Run, todo: Sequence[Removal], phase: bool = True) -> dict[str, dict]:
    """Latency columns for every signature in ``todo`` and of rows stored without them: reuse stored
    measurements, measure the rest interleaved, and complete the waiting rows in the DB.

    A ``phase`` of its own shows its progress and stops when the run is asked to; otherwise (the few signatures
    of one chunk, or of :func:`measure_variants`) it runs through quietly.
    """
    cfg, worker = run.cfg, run.worker
    if cfg.latency == "off":
        return {}
    progress = run.progress and phase
    known = store.latency_by_signature(run.db, run.setup)
    waiting = store.awaiting_latency(run.db, run.setup)
    needed: dict[str, Sequence[int]] = {sig: parse_key(key) for sig, key in waiting.items() if sig not in known}
    for removed in todo:
        sig = _signature(run, removed)
        if sig not in known and sig not in needed:
            needed[sig] = removed
    if needed:
        if progress:
            run.log(f"latency: {len(needed)} shape signature(s), {cfg.latency_repeats} to {cfg.latency_max_repeats} "
                    f"interleaved repeats each, until the median is within +-{cfg.latency_precision:.0%} "
                    f"(prefill of {cfg.latency_seq} tokens"
                    f"{f', decode of {cfg.decode_tokens} tokens' if cfg.decode_tokens else ''}"
                    f"; at most {cfg.latency_budget:g} s beyond the first {cfg.latency_repeats})")
        bar = tqdm(total=cfg.latency_warmup + cfg.latency_max_repeats, desc="latency", unit="round",
                   disable=not progress, dynamic_ncols=True)

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        should_stop = run.should_stop if phase else (lambda: False)
        known.update(worker.measure_latency(needed, progress=advance, should_stop=should_stop))
        bar.close()
    for sig in waiting:
        if sig in known:
            store.fill_latency(run.db, run.setup, sig, known[sig])
    return known


def _announce_estimate(run: Run, todo: list[Removal]) -> None:
    """Tell the user within seconds how long the plan will take, and how to make it shorter when it is long."""
    seconds = run.worker.estimate_seconds(todo)
    run.log(f"estimate: about {format_duration(seconds)} of perplexity evaluation for {len(todo):,} variants "
            f"({len(run.worker.token_ids):,} tokens each), plus latency")
    if seconds > 600:
        run.log("  shorter: --max-tokens 20000 (evaluate a prefix), --strategy single, --latency off, or a GPU; "
                "Ctrl-C stops cleanly and the same command resumes")


def _first_estimate(row: dict, n_todo: int) -> None:
    per_variant = row.get("eval_seconds") or 0.0
    total = per_variant * n_todo
    if total > 120:
        tqdm.write(f"one variant took {per_variant:.1f} s: about {format_duration(total)} for all {n_todo:,}. "
                   "Shorter: --max-tokens 20000, --strategy single, or a GPU; Ctrl-C stops cleanly and a re-run resumes.")


def closing_line(run: Run) -> str:
    cfg, summary = run.cfg, run.summary
    state = "interrupted" if summary.interrupted else "done"
    failed = f", {summary.failed} failed/diverged" if summary.failed else ""
    return (f"{state}: measured {summary.measured:,} variants in {format_duration(summary.seconds)}{failed}; "
            f"{summary.already_done + summary.measured:,}/{summary.planned:,} of the plan are in {cfg.db}. "
            f"Next: sweep report --db {cfg.db}")


def with_signal_variants(run: Run, variants: list[Removal]) -> list[Removal]:
    """The plan plus the removals chosen by the signal strategies (:func:`sweep.plan.signal_strategies`).

    Their signals are computed on the calibration text with the loaded model (or read from the DB), and the
    chosen variants are then measured like any other, on the evaluation setup.
    """
    extra = signal_removals(run.cfg, run.worker.model, run.db, run.log, run.progress)
    return sorted(set(variants) | {normalized(r) for r in extra}, key=variant_order)

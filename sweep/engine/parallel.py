"""Execution backends: measure chunks (sub-tries) of variants in worker processes, stream rows back.

With ``--workers N`` (N > 1) or ``--backend dask``, the runner (the *coordinator*) cuts the plan into chunks of
variants that share kept-layer prefixes and hands them to joblib::

    Parallel(n_jobs=N, return_as="generator_unordered")(delayed(measure_chunk)(...) for chunk in chunks)

on loky processes (one per GPU, worker i pinned to ``cuda:i``) or, through joblib's dask backend, on an existing
Dask cluster. Each worker process loads the model once and keeps it across tasks (``_WORKERS``, keyed by the
config); rows come back as each chunk finishes, and only the coordinator writes the DB.

Failures:

- a worker process dies (kill -9, OOM killer, segfault: loky ``TerminatedWorkerError``, dask ``KilledWorker``):
  the chunks it had in flight are re-queued once, the others continue; a chunk in flight at a second death
  becomes ``failed`` rows carrying the error (retried by the next ``sweep run``).
- a sticky CUDA error (``device.is_sticky_error``) poisons the process: the task returns the error instead of
  rows, the coordinator recycles the pool (new processes) and re-queues the chunk once; a second sticky error
  on the same chunk makes it ``failed``. Deaths and sticky errors are counted apart.
- with loky, one death aborts the whole pool: chunks of healthy workers in flight at that moment cannot be told
  apart from the culprit's, so every chunk in flight is a suspect. Suspects are re-run alone, one at a time,
  before the rest: a suspect that dies again alone is the culprit (``failed``), the others finish normally.

Which chunks were in flight is known from start markers the tasks write into a scratch directory of the
coordinator; workers on other hosts cannot write there, and then every unfinished chunk counts as in flight.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sweep.config import SweepConfig, replace
from sweep.engine.device import is_sticky_error
from sweep.engine.worker import load_worker
from sweep.errors import ClusterError

Removal = Sequence[int]
FailedRows = Callable[[Sequence[Removal], str], list[dict]]

SCHEDULER_TIMEOUT = "20s"
"""How long to keep trying to reach the Dask scheduler before giving up with an error."""

MAX_DEATHS = 2
"""A chunk in flight at this many worker deaths (or hit by this many sticky errors) is recorded as failed."""


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_workers(cfg: SweepConfig) -> int:
    """``--workers``, or by default one per visible GPU (1 on CPU; the in-process path).

    Raises:
        ClusterError: more local workers than visible GPUs on a GPU machine (two workers would share one GPU's
            memory, each sizing its batch for all of it); checked before any model loads.
    """
    if cfg.workers is not None:
        gpus = visible_gpus() if cfg.backend == "loky" and cfg.device in ("auto", "cuda") else 0
        if cfg.workers > 1 and gpus and cfg.workers > gpus:
            raise ClusterError(f"--workers {cfg.workers} is more than the {gpus} visible GPU(s): one worker per GPU "
                               f"(--workers {gpus}), or --device cpu for CPU worker processes")
        return cfg.workers
    if cfg.device == "cpu" or cfg.device.startswith("cuda:"):
        return 1
    return max(1, visible_gpus())


def chunked(order: Sequence[Removal], size: int) -> list[list[Removal]]:
    """Consecutive runs of ``size`` variants of a trie-ordered plan: each is a sub-trie sharing prefixes."""
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def chunk_size(n_variants: int, n_workers: int, seconds_per_variant: float, prefix_sharing: bool,
               target_seconds: float) -> int:
    """Variants per task: about ``target_seconds`` of work, but at least 4 tasks per worker to balance load.

    Example: 4,095 variants on 4 workers at 0.5 s each, 30 s target -> min(60, ceil(4095 / 16) = 256) = 60.
    """
    if not prefix_sharing:
        return 1
    by_time = int(target_seconds / max(seconds_per_variant, 1e-3))
    return max(1, min(by_time, math.ceil(n_variants / (4 * n_workers)), 512))


# ---------------------------------------------------------------------------------------------- worker side

_WORKERS: dict[tuple, object] = {}
"""Per worker process: (config, device) -> loaded ``Worker``; one entry, kept across tasks."""
_DEVICE_LOCKS: list[tuple[int, int]] = []
"""(file descriptor, slot) of the GPU slot this process holds (released by the kernel when the process dies)."""


@dataclass
class ChunkResult:
    """What a task sends back: rows in chunk order, or (sticky error) no rows and the error text."""

    index: int
    rows: list[dict] | None
    error: str | None = None
    pid: int = 0


def _claim_device(slots_dir: str | None, n_slots: int, default: str) -> str:
    """Pin this process to the first free ``cuda:i`` slot (an flock per slot), or use ``default``.

    Worker i of N holds ``cuda:i``; a replacement for a dead worker takes the slot the kernel freed.
    """
    if slots_dir is None:
        return default
    if _DEVICE_LOCKS:
        return f"cuda:{_DEVICE_LOCKS[0][1]}"
    import fcntl

    for slot in range(n_slots):
        fd = os.open(os.path.join(slots_dir, f"cuda-{slot}.lock"), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _DEVICE_LOCKS.append((fd, slot))
        return f"cuda:{slot}"
    raise ClusterError(f"more worker processes than the {n_slots} GPU slots")


PARENT_POLL_SECONDS = 1.0
"""How often a local worker process checks that its coordinator is still alive."""


def _exit_with_coordinator(coordinator: int) -> None:
    """Kill this worker process as soon as the coordinator (its parent, pid ``coordinator``) is gone.

    After a kill -9 of the coordinator nothing tells loky's workers to stop: each kept its model (~500 MB for
    GPT-2) for minutes. A daemon thread polls the parent pid; when the process has been re-parented (the
    coordinator died), it kills its own process. Started once per process; torch releases the GIL in its
    kernels, so the thread runs during long chunks too.
    """
    if os.getppid() != coordinator or any(t.name == "sweep-coordinator-watch" for t in threading.enumerate()):
        return  # not a child of the coordinator (a worker of another kind), or already watching

    def watch() -> None:
        while os.getppid() == coordinator:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)  # nothing to save: only the coordinator writes the DB

    threading.Thread(target=watch, name="sweep-coordinator-watch", daemon=True).start()


def _cached_worker(cfg: SweepConfig, device: str, threads: int | None):
    """The Worker of this process for ``cfg`` on ``device``, loaded on first use and kept across tasks."""
    key = (cfg, device)
    if key not in _WORKERS:
        with contextlib.suppress(ValueError):  # not the main thread (a dask worker): nothing to do
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
        if threads:
            torch.set_num_threads(threads)
        _WORKERS.clear()
        _WORKERS[key] = load_worker(replace(cfg, device=device))
    return _WORKERS[key]


def measure_chunk(cfg: SweepConfig, index: int, chunk: list[Removal], markers_dir: str | None,
                  slots_dir: str | None = None, n_slots: int = 0, threads: int | None = None,
                  coordinator: int | None = None) -> ChunkResult:
    """Task run in a worker process: the result rows of one chunk (failures as rows, sticky errors returned).

    ``coordinator``: pid of the coordinator of a local (loky) worker, which then dies with it; None on Dask,
    whose workers belong to their cluster.
    """
    if coordinator is not None and coordinator != os.getpid():  # not when joblib runs the task in-process
        _exit_with_coordinator(coordinator)
    _mark(markers_dir, index, "start")
    worker = _cached_worker(cfg, _claim_device(slots_dir, n_slots, cfg.device), threads)
    try:
        rows = worker.evaluate_many(chunk)
    except Exception as exc:  # noqa: BLE001 - a failure is data, or (sticky) a reason to recycle this process
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if is_sticky_error(exc):
            _WORKERS.clear()
            return ChunkResult(index, None, error, os.getpid())
        rows = [worker.failed_row(r, error) for r in chunk]
    _mark(markers_dir, index, "done")
    return ChunkResult(index, rows, None, os.getpid())


def _mark(markers_dir: str | None, index: int, what: str) -> None:
    """Tell the coordinator a chunk started/finished (a death then blames only the chunks in flight)."""
    if markers_dir:
        with contextlib.suppress(OSError):  # a worker on another host cannot see the coordinator's directory
            Path(markers_dir, f"{index}.{what}").touch()


def _in_flight(markers: Path, unfinished: list[int]) -> list[int]:
    """Chunks started and not done when a worker died; all unfinished ones if no marker is visible (remote)."""
    names = [p.name.split(".") for p in markers.iterdir()]
    started = {int(i) for i, what in names if what == "start"}
    done = {int(i) for i, what in names if what == "done"}
    return sorted((started - done) & set(unfinished)) if started else sorted(unfinished)


# ---------------------------------------------------------------------------------------------- coordinator


def _death_errors() -> tuple[type[BaseException], ...]:
    from joblib.externals.loky.process_executor import BrokenProcessPool, TerminatedWorkerError

    errors: list[type[BaseException]] = [TerminatedWorkerError, BrokenProcessPool]
    with contextlib.suppress(ImportError):
        from distributed.scheduler import KilledWorker

        errors.append(KilledWorker)
    return tuple(errors)


@contextlib.contextmanager
def backend(cfg: SweepConfig, n_workers: int) -> Iterator[Callable[[], None]]:
    """Enter the joblib backend for ``cfg``; yield a function that recycles its worker processes.

    Raises:
        ClusterError: the Dask scheduler cannot be reached.
    """
    import joblib

    if cfg.backend != "dask":
        with joblib.parallel_config(backend="loky", n_jobs=n_workers):
            yield lambda: None  # closing the aborted call already terminated the loky workers
        return
    from distributed import Client

    try:
        client = Client(cfg.scheduler, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at --scheduler {cfg.scheduler}: {exc}") from None
    with client, joblib.parallel_config(backend="dask"):
        yield lambda: client.restart(wait_for_workers=False)


def cluster_workers(cfg: SweepConfig) -> int:
    """Workers connected to the Dask scheduler of ``--scheduler``: chunks are sized and dispatched for them all.

    Raises:
        ClusterError: the scheduler cannot be reached, or has no worker.
    """
    from distributed import Client

    try:
        with Client(cfg.scheduler, timeout=SCHEDULER_TIMEOUT) as client:
            count = len(client.scheduler_info()["workers"])
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at --scheduler {cfg.scheduler}: {exc}") from None
    if not count:
        raise ClusterError(f"the Dask scheduler at {cfg.scheduler} has no worker yet; start `dask worker "
                           f"{cfg.scheduler} --nworkers 1 --nthreads 1` on each GPU")
    return count


def _pin_slots(cfg: SweepConfig, n_workers: int, scratch: str) -> tuple[str | None, int]:
    """Local loky workers on a multi-GPU machine each take one ``cuda:i`` slot; otherwise no pinning."""
    if cfg.backend == "dask" or cfg.device == "cpu" or cfg.device.startswith("cuda:") or visible_gpus() < 2:
        return None, 0
    return scratch, min(n_workers, visible_gpus())


def run_chunks(cfg: SweepConfig, chunks: list[list[Removal]], n_workers: int, failed_rows: FailedRows,
               should_stop: Callable[[], bool] = lambda: False,
               log: Callable[[str], None] = print) -> Iterator[tuple[list[Removal], list[dict]]]:
    """Yield ``(chunk, rows)`` as chunks finish (any order) until all are done or ``should_stop()`` turns true.

    After ``should_stop()`` turns true no new chunk starts; chunks in flight finish and are yielded.
    """
    # Counted apart: a death aborts the whole loky pool, so the chunks of healthy workers in flight at that
    # moment are suspects too; a sticky error names its chunk. Two of either kind fail a chunk.
    deaths: Counter[int] = Counter()
    sticky: Counter[int] = Counter()
    pending = list(range(len(chunks)))
    threads = _torch_threads(cfg, n_workers)
    with tempfile.TemporaryDirectory(prefix="sweep-") as scratch, backend(cfg, n_workers) as recycle:
        slots_dir, n_slots = _pin_slots(cfg, n_workers, scratch)
        attempt = 0
        while pending and not should_stop():
            attempt += 1
            markers = Path(scratch, f"attempt-{attempt}")
            markers.mkdir()
            finished: set[int] = set()
            # Suspects of a death run alone, one at a time: a second death then names its culprit exactly.
            batch = [i for i in pending if deaths[i]][:1] or pending
            try:
                tasks = _tasks(cfg, chunks, batch, str(markers), slots_dir, n_slots, threads, should_stop)
                outputs = _parallel(-1 if cfg.backend == "dask" else n_workers)(tasks)
                for result in outputs:
                    if result.error is None:
                        finished.add(result.index)
                        yield chunks[result.index], result.rows
                        continue
                    log(f"worker {result.pid}: {result.error}; recycling the worker processes")
                    with warnings.catch_warnings():  # "tasks ... have been cancelled": they are re-queued
                        warnings.simplefilter("ignore", UserWarning)
                        outputs.close()  # joblib aborts the call: loky terminates its worker processes
                    recycle()
                    yield from _blame(chunks, [result.index], sticky, result.error, failed_rows, log)
                    break
            except _death_errors() as exc:
                in_flight = _in_flight(markers, [i for i in batch if i not in finished])
                error = f"worker process died ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                log(f"{error}; re-queuing {len(in_flight)} chunk(s) it had in flight")
                yield from _blame(chunks, in_flight, deaths, error, failed_rows, log)
            gave_up = {i for counter in (deaths, sticky) for i in counter if counter[i] >= MAX_DEATHS}
            pending = [i for i in pending if i not in finished and i not in gave_up]


def _torch_threads(cfg: SweepConfig, n_workers: int) -> int | None:
    """CPU threads per local worker process: this machine's cores shared out. None on Dask: a remote worker keeps
    its own setting (its host's cores are not the coordinator's; `dask worker --nthreads` / OMP_NUM_THREADS)."""
    if cfg.backend == "dask":
        return None
    return max(1, (os.cpu_count() or 1) // n_workers)


def _parallel(n_workers: int):
    from joblib import Parallel

    # One task per dispatch, none queued ahead: Ctrl-C lets only the chunks in flight finish.
    return Parallel(n_jobs=n_workers, return_as="generator_unordered", batch_size=1, pre_dispatch="n_jobs")


def _tasks(cfg, chunks, pending, markers, slots_dir, n_slots, threads, should_stop):
    from joblib import delayed

    coordinator = None if cfg.backend == "dask" else os.getpid()
    for index in pending:
        if should_stop():
            return
        yield delayed(measure_chunk)(cfg, index, chunks[index], markers, slots_dir, n_slots, threads, coordinator)


def _blame(chunks, indices, failures: Counter, error: str, failed_rows: FailedRows, log):
    """Count a failure against each chunk in flight; yield failed rows for those at ``MAX_DEATHS``."""
    for index in indices:
        failures[index] += 1
        if failures[index] >= MAX_DEATHS:
            log(f"chunk of {len(chunks[index])} variant(s) was in flight at {MAX_DEATHS} failures: recorded as failed")
            yield chunks[index], failed_rows(chunks[index], error)

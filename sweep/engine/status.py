"""What `sweep plan` prints: the plan against the DB, with an estimate of the run's wall time.

It loads no weights: the setup id is computed exactly as `sweep run` computes it (:mod:`identity`, from the config
and the tokenized text), so it counts what a run has stored; the estimate (:mod:`estimate`) times one random-init
layer of the same config and reads earlier chunks of the same shape from the DB.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import torch

from sweep import Log, search, store
from sweep.config import SweepConfig, batch_size_or_default, plan_spec
from sweep.engine import estimate, identity, models
from sweep.engine.adapters import n_layers_of
from sweep.engine.data import load_tokens, resolve_windows, used_tokens
from sweep.errors import SweepError
from sweep.engine.similarity import load_calibration
from sweep.plan import STRATEGIES, PlanSpec, count_variants, parse_key, parse_range, plan_variants, \
    signal_strategies, strategy_names, units_of, variant_key
from sweep.store.throughput import latency_rounds, measured_chunks


ESTIMATED_VARIANTS = 200_000
"""Plans up to this size are enumerated (to count what is measured and to price their chunks)."""


def describe_plan(cfg: SweepConfig, log: Log = print, imports_s: float | None = None) -> dict:
    """What ``sweep plan`` prints: variant count, how many are measured, and the run's expected wall time.

    Args:
        imports_s: seconds a new process takes to import sweep, torch and transformers (None: this process's age
            when it is a fresh one, i.e. `sweep plan` itself; see :data:`estimate.FRESH_PROCESS_S`).

    Raises:
        SweepError subclasses for bad input; without a DB, text that cannot be read only leaves the estimate out.
    """
    age = estimate.process_age()
    if imports_s is None and age is not None and age < estimate.FRESH_PROCESS_S:
        imports_s = age
    started = time.perf_counter()
    model_config = models.config_for(cfg)
    n_layers = n_layers_of(model_config)
    spec = plan_spec(cfg)
    n_variants = count_variants(n_layers, spec)
    db = store.open_db(cfg.db, create=False) if Path(cfg.db).exists() else None  # a foreign file: refused here
    windows = resolve_windows(cfg, model_config)
    try:
        tokens = load_tokens(cfg, models.tokenizer_for(cfg), windows)
    except SweepError as exc:
        if db is not None:  # needed to count what is measured
            raise
        info = _log_counts(cfg, n_layers, n_variants, 0, log)
        log(f"estimate: needs the evaluation text ({exc})")
        return info
    loading_s = time.perf_counter() - started
    setup = identity.evaluation_setup(cfg, model_config, tokens, windows)
    done = _done_keys(db, setup)
    variants = plan_variants(n_layers, spec) if n_variants <= ESTIMATED_VARIANTS else None
    measured = sum(variant_key(v) in done for v in variants) if variants is not None else len(done)
    info = _log_counts(cfg, n_layers, n_variants, measured, log)
    if variants is None or not info["todo"]:
        log("estimate: nothing to measure" if not info["todo"] else
            f"estimate: not computed for more than {ESTIMATED_VARIANTS:,} variants")
        return info
    calib_work, chosen = _calibration_work(cfg, spec, n_layers, log)
    work = estimate.PlanWork(todo=[v for v in variants if variant_key(v) not in done] + chosen,
                             done=[parse_key(k) for k in done], n_layers=n_layers,
                             n_tokens=used_tokens(len(tokens.ids), windows.max_tokens),
                             max_length=windows.max_length, stride=windows.stride)
    result = estimate.estimate_run(cfg, model_config, torch.as_tensor(tokens.ids[: work.n_tokens]), work,
                                   *_earlier_measurements(db, cfg, setup), imports_s=imports_s, loading_s=loading_s,
                                   batch_size=batch_size_or_default(cfg), calibration_work=calib_work)
    log(result.line(info["todo"]))
    _note_what_is_not_priced(cfg, log)
    return {**info, "estimate_seconds": result.seconds, "estimate_low_seconds": result.low_s,
            "estimate_high_seconds": result.high_s, "estimate_calibrated": result.calibrated,
            "estimate_startup_seconds": result.startup_s, "estimate_perplexity_seconds": result.perplexity_s,
            "estimate_latency_seconds": result.latency_s[1], "estimate_calibration_seconds": result.calibration_s}


def _log_counts(cfg: SweepConfig, n_layers: int, n_variants: int, measured: int, log: Log) -> dict:
    """Say how many variants the plan has and how many are measured; the counts as a dict."""
    todo = n_variants - measured
    log(f"{cfg.model}: {n_layers} layers; strategy {cfg.strategy}: {n_variants:,} variants "
        f"(baseline included), {measured:,} already measured in {cfg.db}, {todo:,} to go")
    _note_signal_variants(cfg, plan_spec(cfg), log)
    return {"n_layers": n_layers, "variants": n_variants, "measured": measured, "todo": todo}


def _done_keys(db, setup: identity.SetupIdentity) -> set[str]:
    """Variant keys the DB has for exactly this setup (none without a DB or the setup)."""
    setup_id = identity.find_setup(db, setup) if db is not None else None
    return store.done_keys(db, setup_id) if setup_id is not None else set()


def _earlier_measurements(db, cfg: SweepConfig, setup: identity.SetupIdentity) -> tuple[list, int | None]:
    """(chunks of this shape this host measured, the timed rounds of its newest latency phase) from the DB:
    same model row (name, revision, dtype), window, stride and device, any data, plan or ``--max-tokens``."""
    model = setup.model
    model_id = store.find_model(db, model.name, model.revision, model.dtype) if db is not None else None
    if model_id is None:
        return [], None
    host, fields = socket.gethostname(), setup.fields
    chunks = measured_chunks(db, model_id, fields["max_length"], fields["stride"], fields["device"], host)
    rounds = latency_rounds(db, model_id, fields["device"], host, fields["latency_settings"])
    return chunks, rounds


def _note_what_is_not_priced(cfg: SweepConfig, log: Log) -> None:
    """Say where the run will differ from the priced plan: racing stops early, workers split the work."""
    if cfg.race:
        log("  --race: eliminated variants stop after a slice of the windows, so the run takes less than this")
    if (cfg.workers or 1) > 1 or cfg.backend == "dask":
        log("  priced for one process: worker processes share the perplexity phase")


def _note_signal_variants(cfg: SweepConfig, spec: PlanSpec, log: Log) -> None:
    """`sweep plan` cannot count what angular/block-influence/greedy will choose without the model: say so."""
    signal = [s for s in strategy_names(spec.strategy) if s in signal_strategies()]
    if signal:
        log(f"  plus up to {_n_chosen(spec, signal)} variants that {', '.join(signal)} choose on the calibration "
            f"text ({cfg.calib_data}) when `sweep run` loads the model; not counted above, priced in the estimate")


def _sizes(spec: PlanSpec, name: str) -> list[int]:
    """The sizes a signal strategy chooses at: --n, or for the search the fractions of --budget-params (one each)."""
    if name == "search" and search.parse_budgets(spec.budget_params):
        return list(range(len(search.parse_budgets(spec.budget_params))))
    return parse_range(spec.n, "--n")


def _n_chosen(spec: PlanSpec, signal: list[str]) -> int:
    return sum(len(_sizes(spec, name)) for name in signal)


def _calibration_work(cfg: SweepConfig, spec: PlanSpec, n_layers: int,
                      log: Log) -> tuple[estimate.CalibrationWork | None, list]:
    """What the signal strategies will compute on the calibration text, and stand-ins for the variants they will
    choose (each size's, removing that many layers, distinct across strategies), for the estimate. Nothing stored
    in the DB is assumed (a resumed greedy path or search costs less than priced)."""
    names = [s for s in strategy_names(spec.strategy) if s in signal_strategies()]
    if not names:
        return None, []
    try:
        tokens = load_calibration(cfg, models.tokenizer_for(cfg))
    except SweepError as exc:
        log(f"  the calibration work is not priced: {exc}")
        return None, []
    n_tokens = used_tokens(len(tokens.ids), cfg.calib_max_tokens)
    records = [STRATEGIES[n] for n in names]
    units = units_of(n_layers, spec)
    per_layer = max(1, len(units) // n_layers)  # mix: two units per layer
    counts = parse_range(spec.n, "--n")
    greedy = any("greedy-path" in r.needs for r in records) or ("search" in names and not spec.budget_params)
    rounds = tuple(len(units) - k for k in range(max(counts))) if greedy else ()
    passes = []
    if "search" in names:
        budgets = search.parse_budgets(spec.budget_params)
        sizes = [max(1, round(b * n_layers)) * per_layer for b in budgets] if budgets else counts
        for size in sizes:
            budget = cfg.search_budget or search.default_budget(size, len(units), n_tokens)
            passes.append((budget / max(n_tokens, 1), max(1, size // per_layer)))
    work = estimate.CalibrationWork(n_tokens, any("signals" in r.needs for r in records), rounds, tuple(passes))
    # Chosen removals are mostly middle layers (the first and last are the costliest to lose): stand-ins start in
    # the middle, one layer apart per strategy, so they share the unpruned prefix as the real choices mostly do.
    sizes_of = {name: counts if name != "search" or not spec.budget_params else
                [max(1, round(b * n_layers)) for b in search.parse_budgets(spec.budget_params)] for name in names}
    chosen = []
    for offset, name in enumerate(names):
        for n in sizes_of[name]:
            blocks = n if name == "search" and spec.budget_params else n // per_layer  # counts are in units
            size = min(max(1, blocks), n_layers - 1)
            start = max(1, min(n_layers // 3 + offset, n_layers - size - 1))
            chosen.append(tuple(range(start, start + size)))
    return work, chosen

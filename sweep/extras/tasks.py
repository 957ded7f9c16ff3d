"""Downstream task accuracy of pruned variants through lm-evaluation-harness.

Each variant is pruned on the fly (:func:`sweep.engine.pruned`) and handed to lm-eval's ``HFLM`` as the model
object in memory, so nothing is exported. One row per (task settings, variant[, heal]) goes to ``task_results``
the moment it is measured; a re-run skips rows already there, and failures are rows with a status.

Perplexity hides what matters here: QA accuracy collapses at 40-55 % of layers removed while perplexity degrades
smoothly (Gromov et al. 2024, https://arxiv.org/abs/2403.17887), which is why this module exists.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import math
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sweep import ENGINE_VERSION, Log, engine, ranking, store
from sweep.config import SweepConfig, batch_size_or_default, plan_spec
from sweep.errors import ConfigError, MissingExtraError, SweepError
from sweep.plan import Removal, parse_key, parse_range, parse_remove, plan_variants, signal_strategies, \
    variant_key
from sweep.steps import is_block_variant

HEADLINE_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc")
"""The first of these that a task reports is its ``metric``/``value``/``stderr``; all go to ``metrics``."""


def require_lm_eval():
    """Import lm-eval or say which extra installs it.

    Raises:
        MissingExtraError: lm-eval is not installed.
    """
    try:
        import lm_eval
    except ImportError:
        raise MissingExtraError("`sweep tasks` needs lm-evaluation-harness: pip install 'sweep[tasks]'") from None
    return lm_eval


def task_names(cfg: SweepConfig) -> list[str]:
    """``--tasks boolq, arc_easy`` -> ``['boolq', 'arc_easy']`` (order kept, duplicates dropped)."""
    return list(dict.fromkeys(t.strip() for t in cfg.tasks.split(",") if t.strip()))


@functools.lru_cache(maxsize=4)
def task_manager(include: str | None, defaults: bool = True):
    """lm-eval's task index (cached: indexing lm-eval's ~15,000 task YAMLs takes seconds), plus ``include``.

    Raises:
        ConfigError: the include directory does not exist.
    """
    from pathlib import Path

    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include and not Path(include).is_dir():
        raise ConfigError(f"`--task-include` {include}: no such directory of task YAML files")
    return TaskManager(include_path=include, include_defaults=defaults)


def manager_for(names: Sequence[str], include: str | None):
    """The cheapest index that knows every task: only ``--task-include`` when it has them all, else lm-eval's too."""
    if include:
        local = task_manager(include, defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return task_manager(include, defaults=True)


def check_task_names(names: Sequence[str], manager) -> None:
    """Fail before any model loads when a task name is unknown (with the closest known name).

    Raises:
        ConfigError: naming the unknown task, a close match, and how to list every task.
    """
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(f"unknown lm-eval task {name!r} in `--tasks`{hint}; {len(known):,} tasks are known "
                              "(`lm-eval ls tasks` lists them; --task-include DIR adds your own YAML tasks)")


def task_version(name: str, manager) -> str:
    """The task's declared version plus a hash of its YAML, so an edited local task gets a new setup id."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    version = str((cfg.get("metadata") or {}).get("version", ""))
    path = getattr(entry, "yaml_path", None)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8] if path is not None and path.is_file() else ""
    return f"{version}:{digest}"


# ---------------------------------------------------------------------------------------------- variants


def newest_ppl_rows(db, model: str) -> list[dict]:
    """Measured whole-block rows of ``model``'s newest setup (:func:`sweep.ranking.newest_setup`), as the report's
    block sections show them (tasks evaluate layer removals; unit and order variants are not offered)."""
    newest = ranking.newest_setup(store.setups_overview(db), model)
    if newest is None:
        return []
    return [r for r in store.read_view(db, model=model, setup=newest["setup"])
            if ranking.is_measured(r) and is_block_variant(parse_key(r["removed"]))]


def select_variants(cfg: SweepConfig, n_layers: int, db) -> list[Removal]:
    """The variants `sweep tasks` evaluates, baseline first: --remove, else --best K, else --pareto, else --strategy.

    Raises:
        ConfigError: more than one of --remove, --best, --pareto.
        SweepError: --best/--pareto with no perplexity results of this model in --db.
    """
    given = [name for name, value in (("--remove", cfg.remove), ("--best", cfg.best), ("--pareto", cfg.pareto))
             if value]
    if len(given) > 1:
        raise ConfigError(f"choose variants with one of --remove, --best, --pareto (got {' and '.join(given)})")
    if cfg.remove:
        chosen = parse_remove(cfg.remove, n_layers)
    elif cfg.best or cfg.pareto:
        rows = newest_ppl_rows(db, cfg.model)
        if not rows:
            raise SweepError(f"--{'best' if cfg.best else 'pareto'} reads perplexities of {cfg.model} from "
                             f"{cfg.db}, which has none; run `sweep run --model {cfg.model}` first or use --remove")
        keys = (ranking.best_per_size(rows, cfg.best) if cfg.best
                else [rows[i]["removed"] for i in ranking.pareto_front(rows, "params")])
        chosen = [parse_key(k) for k in keys]
    else:
        chosen = plan_variants(n_layers, plan_spec(cfg))
        chosen += signal_choices(cfg, db)
    others = [variant_key(r) for r in chosen if not is_block_variant(r)]
    if others:
        raise ConfigError(f"`sweep tasks` evaluates whole-layer removals; {', '.join(others[:3])} "
                          f"{'is a unit or order variant' if len(others) == 1 else 'are unit or order variants'}")
    keys = dict.fromkeys([""] + [variant_key(r) for r in chosen])  # the baseline is the table's "base" column
    return [parse_key(k) for k in keys]


def signal_choices(cfg: SweepConfig, db) -> list[Removal]:
    """Variants that `sweep run --strategy angular|block-influence|greedy` chose for this model (stored choices).

    The signals need a calibration pass (and greedy a search), which `sweep run` does and records; `sweep tasks`
    reuses its choices for each n in ``--n`` rather than computing them again.

    Raises:
        SweepError: a signal strategy is asked for but no choice of it is stored for this model.
    """
    wanted = [s.strip() for s in cfg.strategy.split(",") if s.strip() in signal_strategies()]
    if not wanted:
        return []
    newest = ranking.newest_setup(store.setups_overview(db), cfg.model)
    choices = store.read_strategy_choices(db, newest["setup"]) if newest else []
    sizes = set(parse_range(cfg.n, "--n")) if cfg.n else None
    found = [c for c in choices if c["strategy"] in wanted and (sizes is None or c["n"] in sizes)]
    missing = [s for s in wanted if not any(c["strategy"] == s for c in found)]
    if missing:
        raise SweepError(f"--strategy {','.join(missing)}: no stored choice for {cfg.model} in {cfg.db}; run "
                         f"`sweep run --model {cfg.model} --strategy {','.join(missing)} --n {cfg.n or 1}` first "
                         "(it computes the signals and records which layers each strategy removes)")
    return [parse_key(c["removed"]) for c in found]


# ---------------------------------------------------------------------------------------------- evaluation


def headline(task_result: dict) -> tuple[str | None, float | None, float | None, dict]:
    """(metric, value, stderr, every metric) from one entry of lm-eval's ``results``.

    lm-eval keys metrics as ``"acc,none"`` and ``"acc_stderr,none"`` (metric, filter).
    """
    metrics = {k: v for k, v in task_result.items() if "," in k and isinstance(v, (int, float))}
    for name in HEADLINE_METRICS:
        for key, value in metrics.items():
            metric, filt = key.split(",", 1)
            if metric == name:
                stderr = metrics.get(f"{name}_stderr,{filt}")
                return name, float(value), (float(stderr) if isinstance(stderr, (int, float)) else None), metrics
    return None, None, None, metrics


def evaluate_tasks(model, tokenizer, removed: Removal, names: Sequence[str], cfg: SweepConfig,
                   manager) -> dict[str, dict]:
    """lm-eval results of one variant (pruned in memory) on ``names``: task -> lm-eval's result entry.

    Raises:
        whatever lm-eval raises (the caller turns it into failed rows).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with engine.pruned(model, removed), _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size_or_default(cfg))
        out = simple_evaluate(model=lm, tasks=list(names), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                              task_manager=manager, log_samples=False, random_seed=cfg.seed,
                              numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                              bootstrap_iters=1000)
    samples = out.get("n-samples", {})
    results = {}
    for name in names:
        entry = dict(out["results"].get(name, {}))
        entry["_n_samples"] = (samples.get(name) or {}).get("effective")
        results[name] = entry
    return results


def _why_no_value(name: str, value: float | None, metrics: dict) -> str:
    if not metrics:
        return (f"lm-eval reported no metric under {name!r} (a tag runs several tasks without an aggregate: "
                "name its tasks, or a group, in --tasks)")
    if value is not None:
        return f"{name}: headline metric is {value}"
    return f"no accuracy-like metric ({', '.join(HEADLINE_METRICS)}) among {sorted(metrics)}"


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs warnings meant for its own CLI on every call (e.g. that a model object was passed); keep errors."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_rows(removed: Removal, n_layers: int, names: Sequence[str], setups: dict[str, str],
              results: dict[str, dict] | None, error: str | None, seconds: float, device: str,
              heal_id: str = "") -> list[dict]:
    """``task_results`` rows of one variant: measured ones, or failed ones carrying ``error``."""
    base = {"removed": variant_key(removed), "heal_id": heal_id, "n_removed": len(removed),
            "n_layers": n_layers - len(removed), "eval_seconds": seconds / max(len(names), 1), "device": device,
            "host": socket.gethostname()}
    rows = []
    for name in names:
        row = {**base, "setup_id": setups[name]}
        if error is not None:
            rows.append({**row, "status": "failed", "error": error})
            continue
        metric, value, stderr, metrics = headline(results[name])
        status, why = ("ok", None) if value is not None and math.isfinite(value) else ("failed", _why_no_value(
            name, value, metrics))
        rows.append({**row, "metric": metric, "value": value, "stderr": stderr,
                     "metrics": json.dumps(metrics, sort_keys=True), "n_samples": results[name].get("_n_samples"),
                     "status": status, "error": why})
    return rows


# ---------------------------------------------------------------------------------------------- orchestration


@dataclass
class TasksSummary:
    """What a `sweep tasks` run did, for the closing line."""

    variants: int = 0
    already_done: int = 0
    measured: int = 0
    failed: int = 0
    setups: dict[str, str] = field(default_factory=dict)


def open_task_setups(cfg: SweepConfig, db, model, names: Sequence[str], manager, device: str) -> dict[str, str]:
    """One ``task_setups`` row per task (settings that change the numbers); return task -> setup id."""
    lm_eval = require_lm_eval()
    identity = engine.model_identity(cfg, model.config, next(model.parameters()).device)
    model_id = engine.register_model(db, identity)
    return {name: store.upsert_task_setup(db, model_id, {
        "task": name, "task_version": task_version(name, manager), "num_fewshot": cfg.num_fewshot,
        "task_limit": cfg.limit, "lm_eval_version": lm_eval.__version__, "weights": identity.weights,
        "dtype": identity.dtype, "device": device, "engine_version": ENGINE_VERSION,
    }) for name in names}


def measure_tasks(db, model, tokenizer, variants: Sequence[Removal], names: Sequence[str], setups: dict[str, str],
                  cfg: SweepConfig, manager, device: str, heal_id: str = "", progress: bool = True) -> TasksSummary:
    """Evaluate every (variant, task) not yet in ``task_results``; commit each variant's rows as they come.

    A failure (out of memory, a task that cannot load its data) becomes ``failed`` rows with the error; the
    other variants still run and a re-run retries the failed ones.
    """
    n_layers = engine.n_layers_of(model.config)
    done = {name: store.done_task_keys(db, setups[name], heal_id) for name in names}
    summary = TasksSummary(variants=len(variants), setups=dict(setups))
    todo = [(r, [n for n in names if variant_key(r) not in done[n]]) for r in variants]
    todo = [(r, missing) for r, missing in todo if missing]
    summary.already_done = len(variants) - len(todo)
    bar = tqdm(total=len(todo), desc="tasks", unit="variant", disable=not progress, dynamic_ncols=True)
    for removed, missing in todo:
        bar.set_postfix_str(f"removed [{variant_key(removed)}]")
        start, results, error = time.perf_counter(), None, None
        try:
            results = evaluate_tasks(model, tokenizer, removed, missing, cfg, manager)
        except torch.OutOfMemoryError as exc:
            error = f"out of memory at batch size {batch_size_or_default(cfg)}: {str(exc).splitlines()[0]}"
        except (KeyboardInterrupt, SweepError):
            raise
        except Exception as exc:  # a task that cannot run is data: a failed row, and the next variant goes on
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows = task_rows(removed, n_layers, missing, setups, results, error, time.perf_counter() - start,
                         device, heal_id)
        for row in rows:
            store.record_task_result(db, row)
        summary.measured += 1
        summary.failed += any(r["status"] != "ok" for r in rows)
        bar.update(1)
    bar.close()
    return summary


def load_model_and_tokenizer(cfg: SweepConfig):
    """The model (eval mode, chosen device and dtype) and its tokenizer (or --tokenizer)."""
    tokenizer = engine.tokenizer_for(cfg)
    model = engine.model_for(cfg)
    return model, tokenizer


def run_tasks(cfg: SweepConfig, log: Log = print, progress: bool = True) -> TasksSummary:
    """`sweep tasks`: evaluate the chosen variants on --tasks, storing accuracy and stderr per (task, variant).

    Cheap checks (lm-eval installed, task names, the variant plan, --db writable) come before the model loads.

    Raises:
        MissingExtraError, ConfigError, PlanError, StoreError, ModelLoadError.
    """
    start = time.perf_counter()
    store.check_writable(cfg.db)
    names = task_names(cfg)
    manager = manager_for(names, cfg.task_include)
    check_task_names(names, manager)
    n_layers = engine.n_layers_of(engine.config_for(cfg))
    db = store.open_db(cfg.db)
    variants = select_variants(cfg, n_layers, db)
    model, tokenizer = load_model_and_tokenizer(cfg)
    device = engine.device_name(next(model.parameters()).device)
    setups = open_task_setups(cfg, db, model, names, manager, device)
    log(f"{cfg.model}: {len(variants):,} variants x {len(names)} tasks ({', '.join(names)}"
        f"{f', limit {cfg.limit}' if cfg.limit else ''}, {cfg.num_fewshot}-shot) on {device}")
    summary = measure_tasks(db, model, tokenizer, variants, names, setups, cfg, manager, device, progress=progress)
    failed = f", {summary.failed} with failures (retried on the next run)" if summary.failed else ""
    log(f"done: {summary.measured:,} variants evaluated, {summary.already_done:,} already in {cfg.db}{failed} "
        f"in {time.perf_counter() - start:.0f} s (table task_results)")
    return summary

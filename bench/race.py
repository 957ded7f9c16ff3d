"""Benchmark: what racing (`--race`) buys over the full exhaustive sweep, on CPU, and what it would buy on a GPU.

    make bench-race                                  # 8 and 10 layers, the defaults below
    python bench/race.py --layers 8 10 --steps 600 --max-tokens 16384

For each layer count, a byte-level GPT-2 of the demo's width (64) is trained briefly on the Python standard library
(sweep.extras.demo's corpus and training loop, seeded: layers then matter differently, as in a real model; random
weights make every variant look alike and racing would have little to drop) and evaluated on the demo's held-out
text. Then, in one process and on the same setup: `sweep run --strategy exhaustive` (the full sweep) and the same
with `--race`. Reported per run: seconds, decoder layer calls and LM head calls (per variant too), and whether the
race found the same best k per number of removed layers with bit-identical numbers for its survivors.

The Llama-3.2-1B line is an estimate, not a measurement: the full 16-layer exhaustive sweep's call counts are exact
(the trie's formula), the race's are the full counts scaled by the call ratios measured here on the largest model,
and seconds come from FLOPs per call at an assumed sustained GPU throughput (``--gpu-tflops``). Saved as JSON under
bench/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import ranking  # noqa: E402
from sweep.config import SweepConfig  # noqa: E402
from sweep.engine.runner import run_sweep  # noqa: E402
from sweep.extras import demo  # noqa: E402

LLAMA = {"layers": 16, "hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "vocab": 128_256,
         "window": 1024, "tokens": 287_644}
"""Llama-3.2-1B (../shared/model-configs/llama-3.2-1b) on the WikiText-2 test split in 1,024-token windows; its
token count is taken as the GPT-2 tokenizer's (287,644: the Llama-3 tokenizer is not available offline here)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 10], help="layer counts (default: 8 10)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model (default: 600)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="evaluated tokens (bytes) (default: 16384)")
    parser.add_argument("--max-length", type=int, default=128, help="window length (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--race-k", type=int, default=3)
    parser.add_argument("--race-slices", default=SweepConfig.race_slices)
    parser.add_argument("--gpu-tflops", type=float, default=400.0,
                        help="assumed sustained bfloat16 TFLOP/s for the Llama estimate (default: 400, ~40 %% of an "
                             "H100's dense peak)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return parser.parse_args(argv)


def trained_model(n_layers: int, steps: int, out: Path) -> Path:
    """A demo-width byte GPT-2 with ``n_layers`` layers, trained ``steps`` seeded steps; its directory."""
    train_files, _ = demo.split_corpus()
    saved = demo.N_LAYER
    demo.N_LAYER = n_layers  # build_model reads it
    try:
        with torch.random.fork_rng(devices=[]):
            model = demo.build_model(seed=0)
            demo.train(model, demo.train_bytes(train_files), steps, seed=0, log=lambda s: None)
    finally:
        demo.N_LAYER = saved
    model.save_pretrained(out)
    demo.build_tokenizer().save_pretrained(out)
    return out


def rows(db: Path) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return {r["removed"]: dict(r) for r in conn.execute("SELECT * FROM results_vs_baseline")}


def measure(args, n_layers: int, tmp: Path, text: Path) -> dict:
    """Full exhaustive sweep and race on one trained model: seconds, calls, agreement."""
    model_dir = trained_model(n_layers, args.steps, tmp / f"model-{n_layers}")
    common = dict(model=str(model_dir), data=str(text), cache_dir=str(tmp / "cache"), max_length=args.max_length,
                  max_tokens=args.max_tokens, batch_size=args.batch_size, latency="off", strategy="exhaustive",
                  device="cpu", race_k=args.race_k, race_slices=args.race_slices)
    figures: dict = {"layers": n_layers, "variants": 2**n_layers}
    for name, race in (("full", False), ("race", True)):
        db = tmp / f"{name}-{n_layers}.db"
        start = time.perf_counter()
        summary = run_sweep(SweepConfig(**common, db=str(db), race=race), log=lambda s: None, progress=False)
        figures[name] = {"seconds": time.perf_counter() - start, "layer_calls": summary.layer_calls,
                         "head_calls": summary.head_calls,
                         "layer_calls_per_variant": summary.layer_calls / 2**n_layers,
                         "head_calls_per_variant": summary.head_calls / 2**n_layers}
    full, raced = rows(tmp / f"full-{n_layers}.db"), rows(tmp / f"race-{n_layers}.db")
    survivors = [r for r in raced.values() if r["status"] == "ok"]
    figures.update(
        windows=full[""]["n_windows"], survivors=len(survivors),
        eliminated=sum(r["status"] == "eliminated" for r in raced.values()),
        same_best_k=ranking.best_per_size(list(full.values()), args.race_k)
        == ranking.best_per_size(list(raced.values()), args.race_k),
        survivors_exact=all(full[r["removed"]]["ppl"] == r["ppl"] for r in survivors),
        layer_call_ratio=figures["race"]["layer_calls"] / figures["full"]["layer_calls"],
        head_call_ratio=figures["race"]["head_calls"] / figures["full"]["head_calls"],
        seconds_ratio=figures["race"]["seconds"] / figures["full"]["seconds"])
    return figures


def llama_estimate(layer_ratio: float, head_ratio: float, tflops: float) -> dict:
    """Seconds of a 16-layer exhaustive sweep of Llama-3.2-1B on the full WikiText-2 test, full and raced."""
    m = LLAMA
    windows = math.ceil(m["tokens"] / m["window"])
    kv = m["hidden"] * m["kv_heads"] // m["heads"]
    layer_params = 2 * m["hidden"] ** 2 + 2 * m["hidden"] * kv + 3 * m["hidden"] * m["intermediate"]
    layer_flops = 2 * layer_params * m["window"] + 4 * m["window"] ** 2 * m["hidden"]  # per window
    head_flops = 2 * m["hidden"] * m["vocab"] * m["window"]
    variants = 2 ** m["layers"]
    # The trie: one layer call per node but the unpruned path (from the capture forward), plus the capture's L-1.
    full_layers = (variants - 1 - (m["layers"] - 1) + (m["layers"] - 1)) * windows
    full_heads = variants * windows
    seconds = lambda layers, heads: (layers * layer_flops + heads * head_flops) / (tflops * 1e12)  # noqa: E731
    return {"windows": windows, "variants": variants, "layer_gflop_per_window": layer_flops / 1e9,
            "head_gflop_per_window": head_flops / 1e9, "assumed_tflops": tflops,
            "full_layer_calls": full_layers, "full_head_calls": full_heads,
            "full_hours": seconds(full_layers, full_heads) / 3600,
            "race_hours": seconds(full_layers * layer_ratio, full_heads * head_ratio) / 3600}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # fixed, as the demo trains: the same weights on every machine
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
               or platform.machine(), "torch": torch.__version__, "args": vars(args), "models": []}
    with tempfile.TemporaryDirectory(prefix="sweep-race-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        text = tmp / "heldout.txt"
        text.write_text(demo.heldout_text(demo.split_corpus()[1]), encoding="utf-8")
        for n_layers in args.layers:
            figures = measure(args, n_layers, tmp, text)
            results["models"].append(figures)
            print_model(figures)
    largest = results["models"][-1]
    results["llama_3_2_1b_estimate"] = llama_estimate(largest["layer_call_ratio"], largest["head_call_ratio"],
                                                      args.gpu_tflops)
    print_estimate(results["llama_3_2_1b_estimate"], largest["layers"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"race-cpu-{results['date'][:10]}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path}")
    return 0 if all(m["same_best_k"] and m["survivors_exact"] for m in results["models"]) else 1


def print_model(f: dict) -> None:
    full, race = f["full"], f["race"]
    print(f"{f['layers']} layers, {f['variants']:,} variants, {f['windows']} windows: "
          f"race kept {f['survivors']:,} to the end, eliminated {f['eliminated']:,}; "
          f"same best-k per n: {f['same_best_k']}, survivors exact: {f['survivors_exact']}")
    for name, run in (("full", full), ("race", race)):
        print(f"  {name:4s}  {run['seconds']:7.1f} s  layer calls {run['layer_calls']:>9,} "
              f"({run['layer_calls_per_variant']:.1f}/variant)  head calls {run['head_calls']:>9,} "
              f"({run['head_calls_per_variant']:.1f}/variant)")
    print(f"  race / full: seconds {f['seconds_ratio']:.2f}, layer calls {f['layer_call_ratio']:.2f}, "
          f"head calls {f['head_call_ratio']:.2f}")


def print_estimate(e: dict, from_layers: int) -> None:
    print(f"Llama-3.2-1B, 16 layers exhaustive ({e['variants']:,} variants), WikiText-2 test ({e['windows']} windows "
          f"of 1,024): full {e['full_hours']:.1f} h, race {e['race_hours']:.1f} h at {e['assumed_tflops']:.0f} "
          f"TFLOP/s (estimate: call ratios of the {from_layers}-layer race, "
          f"{e['layer_gflop_per_window']:.0f} GFLOP per layer call, {e['head_gflop_per_window']:.0f} per head call)")


if __name__ == "__main__":
    raise SystemExit(main())

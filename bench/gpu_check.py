"""`make gpu-check`: one command that proves (or disproves) the GPU targets on one H100, in at most 8 minutes.

    make gpu-check                               # on a machine with a CUDA GPU and ../shared (or --shared DIR)
    python3 bench/gpu_check.py --shared shared --out bench/results

Stages, each with its own time limit so that a failing or slow one never loses the others' figures (the JSON is
rewritten after every stage):

1. ``pytest -m gpu`` (the tests that skip on CPU);
2. bfloat16 against float32: GPT-2 (random init), full WikiText-2 test, a few variants in both dtypes;
3. Llama-3.2-1B (random init, max-length 2048, bfloat16): one full variant (target <= 1.2 s), then the
   single-layer sweep, `sweep run --strategy single` end to end (target <= 25 s);
4. the levers, compared on GPT-2 over every subset of the last 4 layers: the chunked head compiled and eager, the
   online log-sum-exp head, liger-kernel's fused linear + cross-entropy (when installed), and compiled decoder
   layers; each against the default's perplexities;
5. GPT-2 exhaustive (4,096 variants), full WikiText-2 test, `sweep run` end to end into a fresh results.db
   (target <= 5 min). Last, as the one stage that can use its whole limit; a run stopped there reports its
   projected time.

Prints each target as met or missed with its figure, and saves everything under bench/results/.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WHEELS = ROOT / "bench" / "wheels"
SITE = Path(tempfile.gettempdir()) / "sweep-gpu-check-site"


def install_carried_wheels() -> None:
    """On a GPU machine without network: sweep's pure-Python dependencies its image may lack (sqlite-utils and the
    two packages it needs beyond the image's), and liger-kernel for the fused-head lever, from the wheels that
    `make gpu-wheels` downloads into bench/wheels (git-ignored; the call to the GPU machine carries the folder),
    installed into a temporary folder put first on the path (this process's and its children's)."""
    wanted = ("sqlite_utils", "click_default_group", "sqlite_fts4", "liger_kernel")
    if not torch.cuda.is_available() or all(importlib.util.find_spec(m) for m in wanted) or not WHEELS.is_dir():
        return
    wheels = [str(w) for w in sorted(WHEELS.glob("*.whl"))]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(SITE), *wheels], check=True)
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = str(SITE) + os.pathsep + os.environ.get("PYTHONPATH", "")


install_carried_wheels()

from sweep.config import SweepConfig  # noqa: E402
from sweep.engine import models  # noqa: E402
from sweep.engine.data import EvalSetup, load_text, tokenize  # noqa: E402
from sweep.engine.device import device_name  # noqa: E402
from sweep.engine.perplexity import BFLOAT16_PPL_BOUND  # noqa: E402
from sweep.engine.worker import Worker  # noqa: E402

TARGETS = {
    # figure: (limit, comparison, what it is)
    "gpt2_exhaustive_seconds": (300.0, "<=", "GPT-2 exhaustive sweep (4,096 variants), full test, end to end"),
    "llama_full_variant_seconds": (1.2, "<=", "Llama-3.2-1B, one full variant (max-length 2048)"),
    "llama_single_sweep_seconds": (25.0, "<=", "Llama-3.2-1B single-layer sweep, end to end"),
    "bf16_max_ppl_deviation": (BFLOAT16_PPL_BOUND, "<=", "bfloat16 vs float32 perplexity, GPT-2"),
    "pytest_gpu_failed": (0, "<=", "pytest -m gpu failures"),
}
STAGE_LIMITS = {"pytest": 75, "bf16": 60, "llama": 100, "levers": 120, "gpt2": 310}
"""Seconds each stage may take (a sweep past its target is stopped there and recorded as missed), in the order the
stages run: GPT-2 exhaustive last, since it is the one that can use its whole limit (on 2026-12-04, run before the
levers, it left them 37 s and two levers unmeasured)."""
TOTAL_LIMIT = 480


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=None,
                        help="folder with model-configs/, tokenizers/gpt2 and data/wikitext-2-raw-v1/test.parquet "
                             "(default: ../shared, else ./shared)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--stages", nargs="*", default=list(STAGE_LIMITS), choices=list(STAGE_LIMITS))
    return parser.parse_args(argv)


class Check:
    """The figures so far, saved after every stage; stages run in order within the total time limit."""

    def __init__(self, args, shared: Path, work: Path):
        self.args, self.shared, self.work, self.started = args, shared, work, time.perf_counter()
        device = torch.device("cuda")
        self.figures = {"device": device_name(device), "torch": torch.__version__,
                        "python": platform.python_version(), "liger_kernel": _installed("liger_kernel"),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": {}}
        name = "".join(c if c.isalnum() else "-" for c in self.figures["device"]).strip("-").lower()
        self.path = Path(args.out) / f"gpu-check-{name}-{self.figures['date'][:10]}.json"
        self.text = prepare_text(shared, work)

    def stage(self, name: str, fn) -> None:
        left = TOTAL_LIMIT - (time.perf_counter() - self.started)
        if name not in self.args.stages or left < 20:
            self.figures["stages"][name] = {"status": "skipped" if name not in self.args.stages else "no time left"}
            return
        print(f"== {name} (at most {min(STAGE_LIMITS[name], left):.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            result = fn(min(STAGE_LIMITS[name], left))
            self.figures["stages"][name] = {"status": "done", **result}
        except Exception as exc:  # one stage's failure must not lose the others' figures
            traceback.print_exc()
            self.figures["stages"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        self.figures["stages"][name]["stage_seconds"] = time.perf_counter() - start
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.figures, indent=2, default=str) + "\n")


def _installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def prepare_text(shared: Path, work: Path) -> Path:
    """WikiText-2 test as one .txt (rows joined with blank lines, as sweep joins them): reading it needs no
    `datasets` package, which the GPU image may lack."""
    import pyarrow.parquet as pq

    rows = pq.read_table(shared / "data" / "wikitext-2-raw-v1" / "test.parquet").column("text").to_pylist()
    path = work / "wikitext-2-test.txt"
    path.write_text("\n\n".join(rows), encoding="utf-8")
    return path


def sweep_command(check: Check, model: str, db: Path, limit: float, *flags: str) -> dict:
    """`sweep run` as a user types it (a new process: imports, model build, tokens, DB, every variant), stopped at
    ``limit`` seconds; returns its wall time and what reached the DB."""
    command = [sys.executable, "-m", "sweep", "run", "--model", str(check.shared / "model-configs" / model),
               "--random-init", "--tokenizer", str(check.shared / "tokenizers" / "gpt2"), "--data", str(check.text),
               "--db", str(db), "--cache-dir", str(check.work / "cache"), "--quiet", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=check.work, timeout=limit, capture_output=True, text=True)
        status = "done" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-1500:]}"
        print(done.stdout[-1500:], flush=True)
    except subprocess.TimeoutExpired:
        status = f"stopped at {limit:.0f} s"
    seconds = time.perf_counter() - start
    rows = []
    if db.exists():
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT status, latency_noisy FROM results").fetchall()
    return {"seconds": seconds if status == "done" else math.inf, "wall_seconds": seconds, "run": status,
            "rows": len(rows), "rows_ok": sum(r[0] == "ok" for r in rows),
            "noisy_latency_rows": sum(r[1] == 1 for r in rows)}


def tokens_for(check: Check):
    return tokenize(load_text(str(check.text)), models.load_tokenizer(str(check.shared / "tokenizers" / "gpt2")),
                    str(check.text), check.work / "cache")


def worker_for(check: Check, model: str, dtype: str, max_length: int, **cfg) -> Worker:
    loaded = models.load_model(str(check.shared / "model-configs" / model), dtype=dtype, device="cuda",
                               random_init=True)
    config = SweepConfig(latency="off", max_length=max_length, **cfg)
    return Worker(loaded, tokens_for(check), EvalSetup(max_length, max_length, None), config)


def gpu_test_files() -> list[str]:
    """The test modules with GPU tests: collecting only these keeps optional packages (lm-eval, datasette, ...)
    that the GPU image lacks out of the run."""
    return [str(p) for p in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.gpu" in p.read_text()]


def pytest_stage(check: Check, limit: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()]
    try:
        done = subprocess.run(command, cwd=ROOT, timeout=limit, capture_output=True, text=True)
        tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    except subprocess.TimeoutExpired:
        return {"summary": f"stopped at {limit:.0f} s", "pytest_gpu_failed": math.inf}
    failed = sum(int(w.split()[0]) for w in tail.split(",") if "failed" in w or "error" in w)
    print(tail, flush=True)
    return {"summary": tail, "pytest_gpu_failed": failed}


BF16_VARIANTS = [(), (0,), (11,), (5, 6), (1, 4, 9)]


def bf16_stage(check: Check, limit: float) -> dict:
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        worker = worker_for(check, "gpt2", dtype, 1024, batch_size=0)
        ppl[dtype] = [row["ppl"] for row in worker.evaluate_many(BF16_VARIANTS)]
        del worker
        torch.cuda.empty_cache()
    deviation = max(abs(b / f - 1) for b, f in zip(ppl["bfloat16"], ppl["float32"]))
    return {"variants": [list(v) for v in BF16_VARIANTS], "ppl": ppl, "bf16_max_ppl_deviation": deviation,
            "bound": BFLOAT16_PPL_BOUND}


def llama_stage(check: Check, limit: float) -> dict:
    worker = worker_for(check, "llama-3.2-1b", "auto", 2048, batch_size=0)
    worker.evaluate([])  # warm-up (and compilation of the head)
    torch.cuda.synchronize()
    start = time.perf_counter()
    row = worker.evaluate([])
    full = time.perf_counter() - start
    figures = {"llama_full_variant_seconds": full, "batch_size": worker.batch_size, "head": worker.head_loss.name,
               "full_ppl": row["ppl"]}
    del worker
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(dir=check.work) as tmp:
        sweep = sweep_command(check, "llama-3.2-1b", Path(tmp) / "results.db", limit - full - 20,
                              "--strategy", "single", "--max-length", "2048")
    figures.update({f"single_sweep_{k}": v for k, v in sweep.items()}, llama_single_sweep_seconds=sweep["seconds"])
    return figures


def gpt2_stage(check: Check, limit: float) -> dict:
    db = check.work / "gpt2-exhaustive.db"  # a fresh results.db
    sweep = sweep_command(check, "gpt2", db, limit, "--strategy", "exhaustive")
    return {**sweep, "gpt2_exhaustive_seconds": sweep["seconds"], "variants": 4096,
            "projected_seconds": projected_seconds(sweep, 4096)}


def projected_seconds(sweep: dict, variants: int) -> float:
    """A sweep stopped at its limit: its wall time scaled to the whole plan at the rate its rows reached the DB
    (start-up included in the rate, so the projection errs long). E.g. 3,171 rows in 310 s -> 4,096 in 400 s."""
    if sweep["rows"] == 0:
        return math.inf
    return sweep["wall_seconds"] * max(variants / sweep["rows"], 1.0)


LEVERS = {
    "chunked head, compiled (default)": {"head": "chunked", "compile": "on"},
    "online log-sum-exp head": {"head": "online"},
    "fused head (liger-kernel)": {"head": "fused"},
    "compiled decoder layers + compiled head": {"head": "chunked", "compile": "on", "compile_layers": True},
    "chunked head, eager": {"head": "chunked", "compile": "off"},
}
"""The GPU levers, as sweep's own switches (`--head`, `--compile`, `--compile-layers`)."""


def levers_stage(check: Check, limit: float) -> dict:
    removals = [r for k in range(5) for r in itertools.combinations(range(8, 12), k)]  # every subset of the last 4
    results, reference, started = {}, None, time.perf_counter()
    for name, switches in LEVERS.items():
        if time.perf_counter() - started > limit - 20:
            results[name] = {"status": "no time left"}
            continue
        if switches.get("head") == "fused" and not _installed("liger_kernel"):
            results[name] = {"status": "liger-kernel not installed (carry its wheel: docs/benchmark.md)"}
            continue
        worker = worker_for(check, "gpt2", "auto", 1024, batch_size=0, **switches)
        worker.evaluate_many(removals[:2])  # warm-up and compilation, not timed
        torch.cuda.synchronize()
        start = time.perf_counter()
        rows = worker.evaluate_many(removals)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ppl = [r["ppl"] for r in rows]
        reference = reference or ppl
        results[name] = {"seconds": seconds, "per_variant_seconds": seconds / len(removals),
                         "head": worker.head_loss.name, "batch_size": worker.batch_size,
                         "max_ppl_deviation_from_default": max(abs(p / q - 1) for p, q in zip(ppl, reference))}
        print(f"  {name:42} {seconds:7.2f} s for {len(removals)} variants", flush=True)
        del worker
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return {"levers": results}


def verdicts(figures: dict) -> list[str]:
    """One line per target: met or MISSED with the figure (or pending when its stage gave none)."""
    values, projected = {}, {}
    for stage in figures["stages"].values():
        values.update({k: v for k, v in stage.items() if k in TARGETS})
        if "projected_seconds" in stage:  # a sweep stopped at its limit
            projected.update({k: stage["projected_seconds"] for k in stage if k in TARGETS})
    lines = []
    for key, (limit, op, what) in TARGETS.items():
        value = values.get(key)
        if value is None:
            lines.append(f"  {what}: no figure (stage failed or skipped)")
            continue
        met = value <= limit if op == "<=" else value >= limit
        stopped = ""
        if math.isinf(value) and key in projected:
            stopped = f" (stopped at its limit; projected {projected[key]:.0f} s)"
        lines.append(f"  {what}: {value:.4g} (target {op} {limit:g}) {'met' if met else 'MISSED'}{stopped}")
    return lines


def find_shared(given: str | None) -> Path:
    for candidate in ([Path(given)] if given else [ROOT.parent / "shared", ROOT / "shared"]):
        if (candidate / "model-configs" / "gpt2").is_dir():
            return candidate
    raise SystemExit(f"gpu-check: no shared folder with model-configs/gpt2 ({given or '../shared or ./shared'})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: needs a CUDA GPU (the targets are for one H100)", file=sys.stderr)
        return 2
    shared = find_shared(args.shared)
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args, shared, Path(tmp))
        check.save()
        for name in STAGE_LIMITS:  # their order is STAGE_LIMITS's; each stage is the function <name>_stage
            fn = globals()[f"{name}_stage"]
            check.stage(name, lambda limit, fn=fn: fn(check, limit))
        check.figures["total_seconds"] = time.perf_counter() - check.started
        check.figures["verdicts"] = verdicts(check.figures)
        check.save()
    print(f"GPU targets ({check.figures['device']}, {check.figures['total_seconds']:.0f} s):",
          *check.figures["verdicts"], f"saved {check.path}", sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

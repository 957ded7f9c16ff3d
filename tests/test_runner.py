"""End to end through the runner: results stored, resumed, shared latency, interruption, ../shared data."""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from conftest import GPT2_TOKENIZER, WIKITEXT_TEST, need_shared
from sweep.cli import main
from sweep.config import SweepConfig
from sweep.engine.runner import run_sweep
from sweep.intervals import change_pct


def rows(db, sql="select * from results_vs_baseline order by n_removed, removed"):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute(sql)]


def quick_cfg(model_dir, data, db, tmp_path, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), data=str(data), db=str(db), cache_dir=str(tmp_path / "cache"),
                  max_length=64, max_tokens=1024, latency_seq=8, latency_warmup=1, decode_tokens=2)
    values.update(overrides)
    return SweepConfig(**values)


def test_resume_skips_completed_variants(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single,last-n", n="2")
    first = run_sweep(cfg, log=lambda s: None, progress=False)
    assert first.measured == 6 and first.planned == 6  # baseline, 4 singles, (2,3)
    before = rows(db)
    second = run_sweep(cfg, log=lambda s: None, progress=False)
    assert second.measured == 0 and second.already_done == 6
    assert rows(db) == before
    # A bigger plan on the same setup measures only the new variants.
    third = run_sweep(SweepConfig(**{**cfg.__dict__, "strategy": "exhaustive"}), log=lambda s: None, progress=False)
    assert third.measured == 16 - 6
    assert len(rows(db)) == 16


def test_different_setup_adds_rows_without_overwriting(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", latency="off"),
              log=lambda s: None, progress=False)
    run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", latency="off",
                        max_length=32), log=lambda s: None, progress=False)
    all_rows = rows(db)
    assert len(all_rows) == 10 and len({r["setup"] for r in all_rows}) == 2


def test_view_compares_each_variant_with_its_baseline(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single"),
              log=lambda s: None, progress=False)
    view = rows(db)
    baseline = next(r for r in view if r["removed"] == "")
    for r in view:
        assert r["status"] == "ok"
        # the view's SQL and intervals.change_pct state one rule twice: they must agree
        assert r["ppl_change_pct"] == pytest.approx(change_pct(r["ppl"], baseline["ppl"]), rel=1e-12)
        assert r["speed_change_pct"] == pytest.approx(change_pct(r["speed_ms"], baseline["speed_ms"]), rel=1e-12)
        assert r["params_change_pct"] == pytest.approx(change_pct(r["params"], baseline["params"]), rel=1e-12)
        assert r["n_layers"] == 4 - r["n_removed"]
        assert math.isclose(r["ppl"], math.exp(r["nll_sum"] / r["n_tokens"]), rel_tol=1e-12)
    per_layer = baseline["params"] - view[1]["params"]
    assert all(r["params"] == baseline["params"] - per_layer * r["n_removed"] for r in view)


def test_latency_measured_once_per_shape_signature(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="exhaustive", max_tokens=256),
              log=lambda s: None, progress=False)
    results = rows(db, "select * from results")
    assert len(results) == 16
    # GPT-2 layers all have one shape: the signature is the number of kept layers, so 5 measurements.
    assert len({r["latency_from"] for r in results}) == 5
    for r in results:
        twin = next(t for t in results if t["removed"] == r["latency_from"])
        assert twin["n_layers"] == r["n_layers"] and twin["prefill_ms"] == r["prefill_ms"]


def test_per_variant_latency_times_every_variant(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", latency="per-variant",
                        max_tokens=256, decode_tokens=0), log=lambda s: None, progress=False)
    results = rows(db, "select * from results")
    assert sorted(r["latency_from"] for r in results) == sorted(r["removed"] for r in results)


@pytest.mark.slow
def test_sigint_stops_after_current_variant_exits_130_and_resume_completes(tiny_gpt2_dir, sample_text_file, tmp_path):
    """Ctrl-C lands while the first variant is held mid-evaluation (the test-only ``hold`` fault), so the run cannot
    have finished first: it completes that variant, records itself interrupted and exits 130."""
    db, faults = tmp_path / "r.db", tmp_path / "faults"
    faults.mkdir()
    args = [sys.executable, "-m", "sweep", "run", "--model", str(tiny_gpt2_dir), "--data", str(sample_text_file),
            "--db", str(db), "--cache-dir", str(tmp_path / "cache"), "--strategy", "exhaustive", "--max-length", "64",
            "--max-tokens", "1024", "--latency", "off", "--engine", "per-variant", "--quiet"]
    held = {**os.environ, "SWEEP_FAULTS": "hold=120", "SWEEP_FAULTS_DIR": str(faults), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=held)
    deadline = time.time() + 120
    while not (faults / "held").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (faults / "held").exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGINT)
    said = []
    for line in proc.stdout:  # unbuffered: released only once the handler has said it will stop
        said.append(line)
        if line.startswith("Ctrl-C: stopping after the current variant"):
            break
    (faults / "release").touch()
    out, err = proc.communicate(timeout=120)
    out = "".join(said) + out
    assert proc.returncode == 130, err
    assert "interrupted: measured 1 variants" in out
    partial = rows(db, "select * from results")
    assert len(partial) == 1 and partial[0]["status"] == "ok"  # the variant in flight, and no other
    assert rows(db, "select status from runs") == [{"status": "interrupted"}]
    assert sqlite3.connect(db).execute("pragma integrity_check").fetchone()[0] == "ok"
    assert main(args[3:]) == 0  # the same command resumes (in this process: one interpreter start fewer)
    final = rows(db, "select removed from results")
    assert len(final) == 16 and len({r["removed"] for r in final}) == 16


@pytest.mark.slow
def test_wikitext_with_real_gpt2_tokenizer_matches_recipe(tmp_path):
    """Integration: the real GPT-2 tokenizer and WikiText-2 test split from ../shared."""
    need_shared(WIKITEXT_TEST)
    need_shared(GPT2_TOKENIZER)
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from test_measure import recipe_perplexity

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=256)).eval()
    model_dir = tmp_path / "gpt2-tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    db = tmp_path / "r.db"
    cfg = SweepConfig(model=str(model_dir), data=str(WIKITEXT_TEST), db=str(db), cache_dir=str(tmp_path / "c"),
                      max_length=256, stride=128, max_tokens=2048, strategy="single", latency="off")
    run_sweep(cfg, log=lambda s: None, progress=False)
    setup = rows(db, "select * from setups")[0]
    assert setup["data_tokens"] == 287_644  # the guide's "\n\n".join of the test split, GPT-2 tokens
    from datasets import load_dataset

    text = "\n\n".join(load_dataset("parquet", data_files=str(WIKITEXT_TEST), split="train")["text"])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :2048]
    want = recipe_perplexity(model, ids, 256, 128)
    got = rows(db, "select ppl from results where removed = ''")[0]["ppl"]
    assert got == pytest.approx(want, rel=1e-5)


def test_random_init_weights_are_a_different_setup(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", latency="off")
    first = run_sweep(cfg, log=lambda s: None, progress=False)
    second = run_sweep(SweepConfig(**{**cfg.__dict__, "random_init": True}), log=lambda s: None, progress=False)
    assert first.measured == second.measured == 5 and first.setup != second.setup


def test_changed_latency_settings_are_a_different_setup(tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "r.db"
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", latency="off")
    run_sweep(cfg, log=lambda s: None, progress=False)
    timed = run_sweep(SweepConfig(**{**cfg.__dict__, "latency": "shared", "max_tokens": 256}),
                      log=lambda s: None, progress=False)
    assert timed.measured == 5
    assert all(r["prefill_ms"] for r in rows(db, "select prefill_ms from results where setup_id = '%s'" % timed.setup))


def test_latency_failure_leaves_perplexity_and_says_why(tiny_gpt2_dir, sample_text_file, tmp_path, monkeypatch):
    from sweep.engine import latency

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(latency, "time_decode", broken)
    db = tmp_path / "r.db"
    summary = run_sweep(quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", max_tokens=256),
                        log=lambda s: None, progress=False)
    assert summary.measured == 5
    for r in rows(db, "select * from results"):
        assert r["status"] == "ok" and r["ppl"] > 0 and r["prefill_ms"] is None
        assert "latency failed: RuntimeError: no kernel" in r["error"]


def test_stop_during_latency_phase_measures_nothing_and_resumes(tiny_gpt2_dir, sample_text_file, tmp_path,
                                                                monkeypatch):
    from sweep.engine import runner

    class StopAtOnce(runner.StopFlag):
        def __enter__(self):
            self.stop = True
            return self

    monkeypatch.setattr(runner, "StopFlag", StopAtOnce)
    db = tmp_path / "r.db"
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="single", max_tokens=256)
    summary = run_sweep(cfg, log=lambda s: None, progress=False)
    assert summary.interrupted and summary.measured == 0
    assert rows(db, "select status from runs") == [{"status": "interrupted"}]
    monkeypatch.undo()
    assert run_sweep(cfg, log=lambda s: None, progress=False).measured == 5


def test_perplexity_is_committed_before_latency_and_a_stopped_latency_phase_resumes(tiny_gpt2_dir, sample_text_file,
                                                                                    tmp_path, monkeypatch):
    from sweep.engine.worker import Worker

    monkeypatch.setattr(Worker, "measure_latency", lambda self, needed, progress=None, should_stop=None: {})
    db = tmp_path / "r.db"
    cfg = quick_cfg(tiny_gpt2_dir, sample_text_file, db, tmp_path, strategy="exhaustive", max_tokens=256)
    first = run_sweep(cfg, log=lambda s: None, progress=False)  # as if Ctrl-C came during the latency phase
    assert first.interrupted and first.measured == 16
    stored = rows(db, "select * from results")
    assert all(r["ppl"] > 0 and r["prefill_ms"] is None and r["latency_signature"] for r in stored)
    monkeypatch.undo()
    resumed = run_sweep(cfg, log=lambda s: None, progress=False)
    assert resumed.measured == 0 and not resumed.interrupted  # perplexity is not measured again
    after = {r["removed"]: r for r in rows(db, "select * from results")}
    assert {k: r["ppl"] for k, r in after.items()} == {r["removed"]: r["ppl"] for r in stored}
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in after.values())
    # One measurement per number of kept layers (0-4), shared by every variant of that signature.
    assert len({r["latency_from"] for r in after.values()}) == 5
    for r in after.values():
        assert after[r["latency_from"]]["n_layers"] == r["n_layers"]
        assert after[r["latency_from"]]["prefill_ms"] == r["prefill_ms"]

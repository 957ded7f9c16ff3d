"""`make bench` on a tiny model: every stage runs, and the figures it saves are consistent with what it ran."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs every stage of the benchmark end to end

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_every_stage_and_reads_the_sweep_back_from_its_db(tiny_gpt2_dir, sample_text_file, tmp_path):
    bench = load_bench()
    argv = ["--model-config", str(tiny_gpt2_dir), "--tokenizer", str(tiny_gpt2_dir), "--data", str(sample_text_file),
            "--device", "cpu", "--max-length", "64", "--max-tokens", "640", "--batch-size", "4",
            "--exhaustive-layers", "2", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    [saved] = tmp_path.glob("*.json")
    figures = json.loads(saved.read_text())
    assert figures["device"] == "cpu" and figures["tokens"] == 640
    assert figures["engine_fp32_rel_diff"] < 1e-5  # the engine reproduces the guide's recipe
    assert figures["trie_ok"] and figures["exhaustive_variants"] == 4  # every subset of the last 2 layers
    # Exhaustive over 4 GPT-2 layers: 16 variants, and one latency measurement per number of kept layers (0-4).
    assert figures["sweep_variants"] == figures["rows"] == 16
    assert figures["latency_measurements"] == 5
    assert figures["prefill_spread_max"] >= 0 and figures["commits"] >= 1
    assert figures["sweep_recipe_ratio"] == pytest.approx(
        figures["recipe_seconds"] / (figures["sweep_seconds"] / 16))


def test_targets_need_a_gpu_and_name_their_protocols(capsys):
    bench = load_bench()
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present: --targets would run for minutes")
    assert bench.main(["--targets", "gpt2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--targets", "gpt3"])
    assert set(bench.PROTOCOLS) == set(bench.TARGETS)


def test_table_times_the_reference_loop_and_both_sweep_commands_and_saves_ratios(tiny_gpt2_dir, sample_text_file,
                                                                                  tmp_path):
    bench = load_bench()
    argv = ["--table", "--table-models", f"{tiny_gpt2_dir}:64", "--tokenizer", str(tiny_gpt2_dir), "--data",
            str(sample_text_file), "--max-tokens", "320", "--out", str(tmp_path), "--no-real", "--no-search",
            "--latency-budget", "2"]
    assert bench.main(argv) == 0
    [saved] = tmp_path.glob("cpu-table-*.json")
    figures = json.loads(saved.read_text())
    row = figures["models"][str(tiny_gpt2_dir)]
    assert figures["tokens"] == 320 and row["max_length"] == 64
    for key in ("reference", "sweep_latency_off", "sweep_latency_default"):
        assert len(row[key]) == 1 and row[key][0]["seconds"] > 0 and "load_1min" in row[key][0]
    # the whole command reproduces the reference loop's perplexities (16 variants of a 4-layer model)
    assert row["sweep_latency_off"][0]["max_ppl_deviation"] < 1.2e-6
    assert row["ratio_latency_off"] == pytest.approx(row["reference_min"] / row["sweep_latency_off_min"])
    # exhaustive over 4 layers: head + 2 layers per variant one by one, head + 15/16 layer through the trie
    head, layer = row["head_macs_per_token"], row["layer_macs_per_token"]
    assert row["sharing_limit"] == pytest.approx((head + 2 * layer) / (head + 15 / 16 * layer))
    assert row["head_floor_seconds"] > 0
    assert row["command_floor_seconds"] == pytest.approx(figures["import_seconds"] + row["head_floor_seconds"])
    # `sweep plan`'s estimate of each command, next to its measured time: from the probe into the fresh DB, and for
    # the default latency also calibrated on the --latency off run of the same shape
    for key in ("sweep_latency_off", "sweep_latency_default"):
        [measured] = row[key]
        estimate = measured["estimate"]
        assert not estimate["calibrated"] and estimate["line"].startswith("estimate: ")
        assert 0 < estimate["low_seconds"] <= estimate["seconds"] <= estimate["high_seconds"]
        assert estimate["error"] == pytest.approx(estimate["seconds"] / measured["seconds"] - 1)
    assert "estimate_calibrated" not in row["sweep_latency_off"][0]
    assert row["sweep_latency_default"][0]["estimate_calibrated"]["calibrated"]


def test_sharing_limit_of_distilgpt2_is_the_issues_1_37():
    bench = load_bench()
    config = bench.SHARED / "model-configs" / "distilgpt2"
    if not config.exists():
        pytest.skip(f"{config} not found: this test needs ../shared")
    limits = bench.table_limits(config, 1024, 2)
    assert limits["sharing_limit"] == pytest.approx(1.37, abs=0.005)
    assert limits["head_macs_per_token"] == 768 * 50257


def test_the_smollm2_rows_compute_limit_counts_the_loops_and_the_tries_layer_passes():
    from transformers import AutoConfig

    bench = load_bench()
    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49_152)
    limits = bench.real_model_limits(config)
    # one by one: the full model and 30 models of 29 layers; the trie: the full model, then each variant's suffix
    loop_passes = 30 + sum(29 for _ in range(30))
    trie_passes = 30 + sum(30 - 1 - removed for removed in range(30))
    assert (loop_passes, trie_passes) == (900, 465)
    head, layer = limits["head_macs_per_token"], limits["layer_macs_per_token"]
    assert head == 576 * 49_152
    assert limits["compute_limit"] == pytest.approx((31 * head + loop_passes * layer) / (31 * head + trie_passes * layer))
    assert limits["compute_limit"] == pytest.approx(1.63, abs=0.005)  # the issue's FLOP count


def test_race_bench_compares_the_race_with_the_full_sweep_and_estimates_llama(tmp_path):
    spec = importlib.util.spec_from_file_location("race_bench", ROOT / "bench" / "race.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--layers", "4", "--steps", "20", "--max-tokens", "2560", "--max-length", "64", "--out", str(tmp_path)]
    assert bench.main(argv) == 0  # same best k per n, survivors exact
    [saved] = tmp_path.glob("race-cpu-*.json")
    figures = json.loads(saved.read_text())
    [model] = figures["models"]
    assert model["variants"] == 16 and model["survivors"] + model["eliminated"] == 16
    assert model["full"]["head_calls"] == 16 * math.ceil(model["windows"] / 8)  # one per variant per batch
    estimate = figures["llama_3_2_1b_estimate"]
    assert estimate["variants"] == 65_536 and estimate["race_hours"] <= estimate["full_hours"]


def test_search_speed_runs_the_same_search_in_the_trie_and_one_candidate_at_a_time(tmp_path, byte_tokenizer_dir):
    from transformers import AutoTokenizer

    from tiny import tiny_model

    bench = load_bench()
    model = tiny_model("llama", n_layers=6, vocab=256, seed=1)
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(byte_tokenizer_dir).save_pretrained(tmp_path / "m")
    calib = str(Path(__file__).parent / "data" / "calib.txt")
    runs = {engine: bench.search_speed(str(tmp_path / "m"), calib, tmp_path, engine, n=2, passes=6,
                                       calib_tokens=512, max_length=64) for engine in ("trie", "per-variant")}
    for run in runs.values():
        assert run["candidates"] > 1 and 0 < run["passes"] <= 6 and run["passes_per_second"] > 0
    assert runs["trie"]["best"] == runs["per-variant"]["best"]
    assert runs["trie"]["candidates"] == runs["per-variant"]["candidates"]

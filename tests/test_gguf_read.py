"""``--model file.gguf`` offline, on a tiny Llama written as llama.cpp lays it out (tests/gguf_tiny.py): the file
must read back as exactly the model it was written from, sweeps on it equal the guide's recipe, the converted
checkpoint is cached, and each bad input is one clear error."""
from __future__ import annotations

import shutil
import sqlite3

import pytest
import torch

from gguf_tiny import write_tiny_llama_gguf
from sweep.config import SweepConfig
from sweep.engine import gguf_read, models
from sweep.errors import ArchitectureError, MissingExtraError, ModelLoadError

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a 4-layer Q8_0/F32 Llama GGUF, the transformers model it holds)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_llama_gguf(path)


def _probe():
    return torch.arange(40)[None] % 200 + 3  # (1, 40)


def test_a_gguf_reads_back_as_the_model_it_was_written_from_and_is_cached(tiny_gguf, tmp_path):
    path, want = tiny_gguf
    cache = tmp_path / "cache"
    with torch.no_grad():
        expected = want(_probe()).logits
        first = models.load_model(str(path), dtype="float32", device="cpu", cache_dir=str(cache))
        assert torch.equal(first(_probe()).logits, expected)
        folder = gguf_read.cache_folder(path, cache)
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        again = models.load_model(str(path), dtype="float32", device="cpu", cache_dir=str(cache))  # from the cache
        assert torch.equal(again(_probe()).logits, expected)
    assert getattr(again.config, "quantization_config", None) is None  # an ordinary checkpoint: save_pretrained works
    assert models.load_config(str(path), cache_dir=str(cache)).num_hidden_layers == 4


def test_without_a_cache_directory_the_file_is_read_directly(tiny_gguf):
    path, want = tiny_gguf
    model = models.load_model(str(path), dtype="float32", device="cpu", cache_dir=None)
    with torch.no_grad():
        assert torch.equal(model(_probe()).logits, want(_probe()).logits)


def test_the_weights_fingerprint_is_the_files_content(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)
    config = models.load_config(str(path), cache_dir=None)
    assert models.weights_fingerprint(str(path), config) == models.weights_fingerprint(str(copy), config)
    assert models.weights_fingerprint(str(path), config) == "gguf:" + gguf_read.file_sha256(path)[:16]
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    copy.write_bytes(bytes(data))
    assert models.weights_fingerprint(str(copy), config) != models.weights_fingerprint(str(path), config)


def test_a_sweep_of_a_gguf_equals_the_recipe_on_the_physically_pruned_model(tiny_gguf, byte_tokenizer_dir,
                                                                           sample_text_file, tmp_path):
    from sweep.engine import adapters
    from sweep.engine.runner import run_sweep
    from test_measure import recipe_perplexity
    from transformers import AutoTokenizer

    path, want = tiny_gguf
    db = tmp_path / "r.db"
    cfg = SweepConfig(model=str(path), tokenizer=str(byte_tokenizer_dir), data=str(sample_text_file), db=str(db),
                      cache_dir=str(tmp_path / "cache"), max_length=64, max_tokens=512, strategy="single",
                      latency="off")
    run_sweep(cfg, log=lambda s: None, progress=False)
    conn = sqlite3.connect(db)
    got = dict(conn.execute("select removed, ppl from results"))
    assert conn.execute("select weights from setups").fetchone()[0].startswith("gguf:")
    ids = AutoTokenizer.from_pretrained(byte_tokenizer_dir)(sample_text_file.read_text(),
                                                            return_tensors="pt").input_ids[:, :512]
    assert got[""] == pytest.approx(recipe_perplexity(want, ids, 64, 64), rel=1e-5)
    for layer in range(4):
        with adapters.pruned(want, [layer]):
            assert got[str(layer)] == pytest.approx(recipe_perplexity(want, ids, 64, 64), rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad inputs


def test_a_missing_gguf_file_says_so_and_never_mentions_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file") as err:
        models.load_model(str(tmp_path / "nothing.gguf"), device="cpu")
    assert "hub" not in str(err.value)


def test_a_file_that_is_not_gguf_says_so(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.load_config(str(bad), cache_dir=None)


def test_a_truncated_gguf_is_named_truncated_or_corrupt(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        models.load_model(str(cut), device="cpu", cache_dir=str(tmp_path / "cache"))


def test_an_architecture_transformers_cannot_read_lists_those_it_can(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ArchitectureError, match="rwkv6.*llama"):
        models.load_config(str(path), cache_dir=None)


def test_a_quantization_type_gguf_cannot_dequantize_is_named(tiny_gguf, tmp_path, monkeypatch):
    import gguf

    def unsupported(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf, "dequantize", unsupported)  # transformers imports it from gguf at load time
    with pytest.raises(ModelLoadError, match="cannot be dequantized.*Q8_0|Q8_0.*cannot be dequantized"):
        models.load_model(str(tiny_gguf[0]), device="cpu", cache_dir=None)


def test_without_the_gguf_extra_the_error_names_it(tiny_gguf, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"sweep\[gguf\]"):
        models.load_config(str(tiny_gguf[0]), cache_dir=None)


def test_a_local_file_that_is_not_gguf_is_not_sent_to_the_hub(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="must be a GGUF") as err:
        models.load_config(str(other))
    assert "hub" not in str(err.value)


# ---------------------------------------------------------------------------------------------- every command


def test_tasks_on_a_gguf_equal_the_reference_accuracy(tiny_gguf, byte_tokenizer_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from sweep.engine import adapters
    from sweep.extras.tasks import run_tasks
    from test_tasks import reference_accuracy, task_rows, tasks_config
    from toy_tasks import arithmetic_docs, write_task
    from transformers import AutoTokenizer

    path, want = tiny_gguf
    task_dir = write_task(tmp_path / "tasks", "toy_arith", arithmetic_docs())
    cfg = tasks_config(path, task_dir, tmp_path / "r.db", tokenizer=str(byte_tokenizer_dir), remove="1",
                       cache_dir=str(tmp_path / "cache"))
    summary = run_tasks(cfg, log=lambda s: None, progress=False)
    assert summary.failed == 0
    rows = task_rows(tmp_path / "r.db")
    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    with adapters.pruned(want, [1]):
        assert rows["1"][0] == pytest.approx(reference_accuracy(want, tokenizer, arithmetic_docs()))


def test_heal_and_the_signal_strategies_run_on_a_gguf(tiny_gguf, byte_tokenizer_dir, sample_text_file, tmp_path):
    pytest.importorskip("peft")
    from sweep.config import build_config
    from sweep.engine.runner import run_sweep
    from sweep.extras.heal import heal_variant

    path, _ = tiny_gguf
    common = {"model": str(path), "tokenizer": str(byte_tokenizer_dir), "data": str(sample_text_file),
              "db": str(tmp_path / "r.db"), "cache_dir": str(tmp_path / "cache"), "max_tokens": 384,
              "max_length": 64, "latency": "off", "device": "cpu", "calib_data": str(sample_text_file),
              "calib_max_tokens": 256}
    run_sweep(build_config(**common, strategy="angular,block-influence,greedy", n="1-2"), log=lambda s: None,
              progress=False)
    healed = heal_variant(build_config(**common, heal_data=str(sample_text_file), heal_steps=2, heal_seq=64,
                                       heal_batch_size=2, heal_eval_every=1, heal_eval_batches=1, lora_r=2,
                                       lora_alpha=4), (1,), log=lambda s: None, progress=False)
    assert healed["status"] == "ok" and healed["ppl"] > 0
    conn = sqlite3.connect(tmp_path / "r.db")
    chosen = {r[0] for r in conn.execute("select strategy from strategy_choices")}
    assert chosen == {"angular", "block-influence", "greedy"}

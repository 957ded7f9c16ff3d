"""The offline demo model: corpus split, byte-level tokenizer, a short real build and its reuse."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers

from sweep.extras import demo

pytestmark = pytest.mark.slow  # trains the demo model, several times

TEXT = "déf grüße(x):  # naïve ✓ 日本語 🙂\n\treturn x <|endoftext|> \r\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[str]]:
    """One real (3-second) build shared by the module, with the log lines it printed."""
    lines: list[str] = []
    out = demo.build_demo(tmp_path_factory.mktemp("demo"), steps=40, seed=0, log=lines.append)
    return out, lines


def test_split_is_disjoint_and_excludes_tests():
    train, heldout = demo.split_corpus()
    assert train and heldout
    assert not set(train) & set(heldout)
    assert len(heldout) < len(train)
    for f in train + heldout:
        assert f.suffix == ".py"
        assert not {"test", "tests", "site-packages"} & set(f.parts[-4:-1])
    assert (train, heldout) == demo.split_corpus()  # deterministic


def test_heldout_text_is_whole_lines_within_cap():
    _, heldout = demo.split_corpus()
    text = demo.heldout_text(heldout, cap=20_000)
    assert 0 < len(text.encode()) <= 20_000
    assert text.endswith("\n")


def test_tokenizer_is_byte_level_and_round_trips():
    tok = demo.build_tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # one token per byte, id == byte value, no specials added
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_id == demo.EOS_ID and len(tok) == demo.EOS_ID + 1
    assert sorted(demo._byte_to_unicode().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_model_init_is_seeded():
    a, b, c = demo.build_model(0), demo.build_model(0), demo.build_model(1)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_build_writes_everything(built):
    out, lines = built
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "heldout.txt", "demo.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "demo.json").read_text())
    assert meta["version"] == demo.VERSION and meta["seed"] == 0 and meta["steps"] == 40
    assert meta["steps"] > 0
    assert any("held-out byte perplexity" in line for line in lines)


def test_build_reloads_offline(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == len(TEXT.encode("utf-8"))
    assert tok.decode(ids[0]) == TEXT
    assert model.config.n_layer == 4 and model.config.vocab_size == len(tok)
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_training_beats_uniform_bytes(built):
    out, _ = built
    meta = json.loads((out / "demo.json").read_text())
    # Invariants, not golden numbers: even a few seconds of training must beat guessing uniformly over bytes.
    assert meta["train_loss"] < math.log(256)
    assert meta["heldout_byte_perplexity"] < 256


def test_heldout_text_is_the_heldout_files(built):
    out, _ = built
    text = (out / "heldout.txt").read_text(encoding="utf-8")
    assert text and text == demo.heldout_text(demo.split_corpus()[1])


def test_reuse_does_not_retrain(built):
    out, _ = built
    before = {p: p.stat().st_mtime_ns for p in (out / "demo.json", out / "model" / "model.safetensors")}
    lines: list[str] = []
    assert demo.build_demo(out, steps=40, seed=0, log=lines.append) == out
    assert lines and "reusing" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert demo.main(["--out", str(out), "--steps", "40"]) == 0  # the CLI takes the same reuse path
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_other_settings_are_not_reused(built):
    out, _ = built
    meta = out / "demo.json"
    assert demo._reusable(meta, seed=0, steps=40)
    assert not demo._reusable(meta, seed=1, steps=40)
    assert not demo._reusable(meta, seed=0, steps=800)


def test_builds_are_identical_whatever_the_callers_thread_count(tmp_path):
    """The model depends on seeds and steps only: whatever threads the caller uses (here: one, then two), every
    build gets the same weights, bit for bit."""
    import torch

    first = demo.build_demo(tmp_path / "a", steps=20, seed=0, log=lambda _: None)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        second = demo.build_demo(tmp_path / "b", steps=20, seed=0, log=lambda _: None)
    finally:
        torch.set_num_threads(saved)
    assert (first / "model" / "model.safetensors").read_bytes() == (second / "model" / "model.safetensors").read_bytes()
    assert (first / "heldout.txt").read_text() == (second / "heldout.txt").read_text()

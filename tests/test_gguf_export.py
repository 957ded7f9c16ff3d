"""`sweep export` from a GGUF source, offline on the tiny Llama GGUF (tests/gguf_tiny.py): ``--out x.gguf`` writes a
GGUF that reloads as the variant sweep measured, ``--out DIR`` a dequantized Hugging Face checkpoint, and what
cannot be exported is refused with the reason."""
from __future__ import annotations

import pytest
import torch

from gguf_tiny import write_tiny_llama_gguf
from sweep.config import SweepConfig
from sweep.engine import adapters, export_variant, gguf_read
from sweep.errors import ExportError

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_llama_gguf(path)


def _cfg(path, tmp_path, tokenizer=None) -> SweepConfig:
    return SweepConfig(model=str(path), tokenizer=str(tokenizer) if tokenizer else None,
                       cache_dir=str(tmp_path / "cache"))


PROBE = torch.arange(24)[None] % 90 + 4  # (1, 24)


@pytest.mark.parametrize("key", ["1,2", "0", "r2", "s1"])
def test_a_gguf_export_reloads_as_the_variant_in_memory(tiny_gguf, tmp_path, key):
    from sweep.plan import parse_remove

    path, model = tiny_gguf
    out = tmp_path / "variant.gguf"
    line = export_variant(_cfg(path, tmp_path), key, out)
    assert str(out) in line
    reloaded = gguf_read.read_model(out, torch.float32, cache_dir=None)
    variant = parse_remove(key, 4)[0]
    with torch.no_grad(), adapters.applied(model, variant):
        want = model(PROBE, use_cache=False).logits
        n_blocks = len(adapters.decoder_layers(model))
    with torch.no_grad():
        got = reloaded(PROBE, use_cache=False).logits
    assert len(adapters.decoder_layers(reloaded)) == reloaded.config.num_hidden_layers == n_blocks
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_gguf_source_exports_to_a_hugging_face_directory(tiny_gguf, tmp_path, byte_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    path, model = tiny_gguf
    out = tmp_path / "hf"
    export_variant(_cfg(path, tmp_path, byte_tokenizer_dir), "3", out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad(), adapters.pruned(model, [3]):
        want = model(PROBE).logits
    with torch.no_grad():
        assert torch.allclose(reloaded(PROBE).logits, want, rtol=1e-6, atol=1e-6)


def test_a_gguf_export_of_a_non_gguf_source_says_how_to_convert(tiny_gpt2_dir, tmp_path):
    with pytest.raises(ExportError, match="not one. Convert"):
        export_variant(SweepConfig(model=str(tiny_gpt2_dir)), "1", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_unit_variant_is_refused_for_gguf_with_the_reason(tiny_gguf, tmp_path):
    with pytest.raises(ExportError, match="attention-only"):
        export_variant(_cfg(tiny_gguf[0], tmp_path), "a1", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

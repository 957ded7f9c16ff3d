"""Pruned GGUF files, checked against the source file as read by this file's own parser (not gguf.GGUFReader,
which the writer uses): every kept tensor byte for byte, every field in its type, per-layer arrays cut.

The real-model lane (``-m real``) also reloads a written SmolLM2 variant with transformers and compares it with
the source model with the same blocks removed in memory.
"""
from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as T  # noqa: E402

from sweep.engine.gguf_write import write_gguf_variant  # noqa: E402
from sweep.errors import ExportError, MissingExtraError  # noqa: E402

# ---------------------------------------------------------------------------------------------- our own parser

_SCALARS = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
            T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}


class Parsed:
    """A GGUF file as the format describes it (github.com/ggml-org/ggml/blob/master/docs/gguf.md), read with
    struct: ``fields[key] = (type, value, raw bytes of type and value)`` (arrays: ``((ARRAY, element type),
    [values], raw)``, strings as bytes) and ``tensors[name] = (ggml type, dims, data bytes)``, in file order."""

    def __init__(self, path: Path):
        self.buf = memoryview(Path(path).read_bytes())
        assert bytes(self.buf[:4]) == b"GGUF"
        # A file for the other byte order has its version's low half zero (the version is small).
        self.order = "<" if struct.unpack_from("<I", self.buf, 4)[0] & 0xFFFF else ">"
        self.pos = 4
        self.version, n_tensors, n_fields = self._take("IQQ")
        self.fields = {}
        for _ in range(n_fields):
            key = self._string().decode()
            start = self.pos
            vtype, value = self._value(T(self._take("I")[0]))
            self.fields[key] = (vtype, value, bytes(self.buf[start:self.pos]))
        self.fields_end = self.pos
        infos = [self._tensor_info() for _ in range(n_tensors)]
        self.alignment = self.fields.get("general.alignment", (None, 32))[1]
        self.data_start = -(-self.pos // self.alignment) * self.alignment
        self.tensors, self.offsets = {}, {}
        for name, dims, ggml_type, offset in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n_bytes = math.prod(dims) // block * type_size
            start = self.data_start + offset
            assert start + n_bytes <= len(self.buf), f"{name} runs past the end of the file"
            self.tensors[name] = (ggml_type, dims, bytes(self.buf[start:start + n_bytes]))
            self.offsets[name] = start

    def _take(self, fmt: str) -> tuple:
        values = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(self.order + fmt)
        return values

    def _string(self) -> bytes:
        (n,) = self._take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def _value(self, vtype: T):
        if vtype == T.STRING:
            return vtype, self._string()
        if vtype in _SCALARS:
            return vtype, self._take(_SCALARS[vtype])[0]
        assert vtype == T.ARRAY
        element, n = T(self._take("I")[0]), self._take("Q")[0]
        if element in _SCALARS:
            return (vtype, element), list(self._take(f"{n}{_SCALARS[element]}"))
        return (vtype, element), [self._value(element)[1] for _ in range(n)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], Q, int]:
        name = self._string().decode()
        (n_dims,) = self._take("I")
        dims = self._take(f"{n_dims}Q")
        ggml_type, offset = self._take("IQ")
        return name, dims, Q(ggml_type), offset


# ---------------------------------------------------------------------------------------------- synthetic files

BLOCKS = 4
SOURCE_BLOCK_ORDER = (1, 0, 3, 2)
"""The synthetic file writes its blocks out of order, as converters sorting names as text do (blk.1, blk.10...)."""

PER_LAYER = {
    "llama.feed_forward_length": ([64, 48, 32, 16], T.UINT32),
    "llama.attention.head_count_kv": ([8, -4, 2, -1], T.INT32),
    "llama.swiglu_clamp_exp": ([0.5, 1.5, 2.5, 3.25], T.FLOAT32),
    "llama.attention.sliding_window_pattern": ([True, False, True, False], T.BOOL),
    "xielu.beta": ([0.25, 0.5, 0.75, 1.0], T.FLOAT32),
}
"""Per-layer arrays: numbers or booleans, one per block, under ``llama.`` (or a listed key outside it)."""

OTHER_FIELDS = {
    "general.name": ("tiny test llama", T.STRING),
    "general.languages": (["en", "fr"], T.ARRAY, T.STRING),
    "general.file_type": (3, T.UINT32),
    "llama.context_length": (1 << 40, T.UINT64),
    "llama.embedding_length": (64, T.UINT32),
    "llama.vocab_size": (16, T.INT32),
    "llama.rope.freq_base": (10000.5, T.FLOAT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
    "llama.rope.dimension_sections": ([16, 8, 8, 0], T.ARRAY, T.INT32),
    "llama.classifier.output_labels": (["a", "b", "c", "d"], T.ARRAY, T.STRING),
    "tokenizer.ggml.model": ("gpt2", T.STRING),
    "tokenizer.ggml.tokens": (["<s>", "é", "▁the", "日本"], T.ARRAY, T.STRING),
    "tokenizer.ggml.token_type": ([3, 1, 1, 1], T.ARRAY, T.INT32),
    "tokenizer.ggml.scores": ([0.0, -1.0, -2.5, -3.25], T.ARRAY, T.FLOAT32),
    "tokenizer.ggml.bos_token_id": (0, T.UINT32),
    "tokenizer.ggml.add_bos_token": (True, T.BOOL),
    "tokenizer.chat_template": ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %} ✓",
                                T.STRING),
    "test.int8": (-5, T.INT8), "test.uint16": (65535, T.UINT16), "test.int64": (-(1 << 40), T.INT64),
    "test.float64": (0.1, T.FLOAT64), "test.empty_string": ("", T.STRING),
    "general.quantization_version": (2, T.UINT32),
}
"""Fields that must come out unchanged; the arrays of 4 entries look per-layer but are not."""


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _add_tensors(writer, rng) -> None:
    writer.add_tensor("rope_freqs.weight", _f32(rng, 16))
    writer.add_tensor("token_embd.weight", gguf.quantize(_f32(rng, 16, 64), Q.Q8_0), raw_dtype=Q.Q8_0)
    for b in SOURCE_BLOCK_ORDER:
        writer.add_tensor(f"blk.{b}.attn_norm.weight", _f32(rng, 64))
        writer.add_tensor(f"blk.{b}.attn_q.weight", gguf.quantize(_f32(rng, 64, 64), Q.Q4_1), raw_dtype=Q.Q4_1)
        writer.add_tensor(f"blk.{b}.ffn_up.weight", _f32(rng, 32, 64).astype(np.float16))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", gguf.quantize(_f32(rng, 64, 32), Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", _f32(rng, 64))
    writer.add_tensor("output.weight", _f32(rng, 16, 64).astype(np.float16))


def make_source(path: Path, *, edit=None, alignment: int | None = 64, block_count: int | None = BLOCKS,
                endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    """A 4-block llama GGUF; ``edit(writer)`` adds fields and tensors before it is written."""
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    if block_count is not None:
        writer.add_key_value("llama.block_count", block_count, T.UINT32)
    for key, (value, vtype) in PER_LAYER.items():
        writer.add_key_value(key, value, T.ARRAY, sub_type=vtype)
    for key, (value, vtype, *sub) in OTHER_FIELDS.items():
        writer.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    _add_tensors(writer, np.random.default_rng(0))
    if edit is not None:
        edit(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def parsed_source(source) -> Parsed:
    return Parsed(source)


ORDERS = {
    "remove-1": [0, 2, 3],
    "remove-first-and-last": [1, 2],
    "keep-one": [3],
    "keep-all": [0, 1, 2, 3],
    "swap": [1, 0, 2, 3],
    "repeat": [0, 1, 1, 2],
    "reverse-and-repeat": [3, 2, 1, 0, 0],
}


@pytest.fixture(scope="module", params=list(ORDERS.values()), ids=list(ORDERS))
def variant(request, source, tmp_path_factory):
    """(order, what the writer says it wrote, the output as our parser reads it)."""
    order = request.param
    written = write_gguf_variant(source, order, tmp_path_factory.mktemp("out") / "variant.gguf")
    return order, written, Parsed(written.path)


def _source_name(name: str, order: list[int]) -> str:
    """The source tensor an output tensor must be a copy of, stated here independently of the writer."""
    if not name.startswith("blk."):
        return name
    _, j, rest = name.split(".", 2)
    return f"blk.{order[int(j)]}.{rest}"


def _expected_names(parsed_source: Parsed, order: list[int]) -> list[str]:
    names = list(parsed_source.tensors)
    block_rests = [n.split(".", 2)[2] for n in names if n.startswith(f"blk.{SOURCE_BLOCK_ORDER[0]}.")]
    blocks = [f"blk.{j}.{rest}" for j in range(len(order)) for rest in block_rests]
    return ["rope_freqs.weight", "token_embd.weight", *blocks, "output_norm.weight", "output.weight"]


# ---------------------------------------------------------------------------------------------- tensors


def test_each_output_tensor_is_its_source_tensor_byte_for_byte(variant, parsed_source):
    order, _, out = variant
    assert list(out.tensors) == _expected_names(parsed_source, order)
    for name, (ggml_type, dims, data) in out.tensors.items():
        src_type, src_dims, src_data = parsed_source.tensors[_source_name(name, order)]
        assert (ggml_type, dims) == (src_type, src_dims), name
        assert data == src_data, f"{name} differs from {_source_name(name, order)}"


def test_the_synthetic_file_holds_every_tensor_type_and_distinct_blocks(parsed_source):
    """Guards the checks above: identical blocks or a single type would let a wrong copy pass."""
    types = {t for t, _, _ in parsed_source.tensors.values()}
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_1} <= types
    per_block = [parsed_source.tensors[f"blk.{b}.attn_q.weight"][2] for b in range(BLOCKS)]
    assert len(set(per_block)) == BLOCKS


def test_tensor_data_keeps_the_source_alignment(variant):
    _, _, out = variant
    assert out.alignment == 64
    assert all(offset % 64 == 0 for offset in out.offsets.values())


def test_the_default_alignment_stays_unset(tmp_path):
    source = make_source(tmp_path / "src.gguf", alignment=None)
    out = Parsed(write_gguf_variant(source, [0, 3], tmp_path / "out.gguf").path)
    assert "general.alignment" not in out.fields
    assert all(offset % 32 == 0 for offset in out.offsets.values())


def test_a_big_endian_file_stays_big_endian_and_byte_identical(tmp_path):
    source = make_source(tmp_path / "src.gguf", endianess=gguf.GGUFEndian.BIG)
    src, out = Parsed(source), Parsed(write_gguf_variant(source, [2, 1], tmp_path / "out.gguf").path)
    assert (src.order, out.order) == (">", ">")
    assert out.fields["llama.feed_forward_length"][1] == [32, 48]
    assert out.tensors["blk.0.attn_q.weight"][2] == src.tensors["blk.2.attn_q.weight"][2]


# ---------------------------------------------------------------------------------------------- metadata


def test_block_count_and_per_layer_arrays_follow_the_order(variant, parsed_source):
    order, written, out = variant
    assert out.fields["llama.block_count"][:2] == (T.UINT32, len(order))
    for key in PER_LAYER:
        src_type, src_values, _ = parsed_source.fields[key]
        assert out.fields[key][:2] == (src_type, [src_values[i] for i in order]), key
    assert set(written.per_layer_fields) == set(PER_LAYER)


def test_every_other_field_is_copied_with_its_type_and_value(variant, parsed_source):
    order, _, out = variant
    changed = {"llama.block_count", *PER_LAYER}
    recorded = {"sweep.source_blocks", "sweep.source_block_count"}
    for key, (_, _, raw) in parsed_source.fields.items():
        if key not in changed:
            assert out.fields[key][2] == raw, key  # raw bytes: the type tag and the value
    assert set(out.fields) == set(parsed_source.fields) | recorded
    assert list(out.fields)[0] == "general.architecture"


def test_the_edit_is_recorded_in_the_file(variant):
    order, _, out = variant
    assert out.fields["sweep.source_blocks"][:2] == ((T.ARRAY, T.UINT32), order)
    assert out.fields["sweep.source_block_count"][:2] == (T.UINT32, BLOCKS)


def test_a_variant_of_a_variant_records_blocks_of_the_original(source, tmp_path):
    first = write_gguf_variant(source, [0, 2, 3], tmp_path / "first.gguf")
    second = Parsed(write_gguf_variant(first.path, [2, 0], tmp_path / "second.gguf").path)
    assert second.fields["sweep.source_blocks"][1] == [3, 0]
    assert second.fields["sweep.source_block_count"][1] == BLOCKS
    assert second.fields["llama.feed_forward_length"][1] == [16, 64]
    assert second.tensors["blk.0.attn_q.weight"][2] == Parsed(source).tensors["blk.3.attn_q.weight"][2]


def test_what_was_written_is_reported(variant):
    order, written, out = variant
    assert (written.architecture, written.source_block_count, written.block_count) == ("llama", BLOCKS, len(order))
    assert written.n_tensors == len(out.tensors)
    assert written.n_bytes == os.path.getsize(written.path) == len(out.buf)


# ---------------------------------------------------------------------------------------------- refusals


def _cut(at):
    """The source file cut at byte ``at(parsed source)``."""
    return lambda source, parsed: source.read_bytes()[:at(parsed)]


UNREADABLE = {
    "empty": _cut(lambda p: 0),
    "cut-in-header": _cut(lambda p: 12),
    "cut-in-metadata": _cut(lambda p: p.fields_end // 2),
    "cut-in-tensor-infos": _cut(lambda p: (p.fields_end + p.data_start) // 2),
    "cut-in-tensor-data": _cut(lambda p: (p.data_start + len(p.buf)) // 2),
    "cut-in-last-tensor": _cut(lambda p: max(p.offsets.values()) + 1),
    "garbage": lambda source, parsed: np.random.default_rng(1).bytes(4096),
    "magic-then-garbage": lambda source, parsed: b"GGUF" + b"\xff" * 4092,
    "text": lambda source, parsed: b"not a model\n" * 100,
}


@pytest.mark.parametrize("content", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_an_unreadable_source_is_an_export_error(content, source, parsed_source, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content(source, parsed_source))
    with pytest.raises(ExportError, match="not a readable GGUF"):
        write_gguf_variant(bad, [0], tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == [bad]


def test_a_missing_source_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="not a readable GGUF"):
        write_gguf_variant(tmp_path / "absent.gguf", [0], tmp_path / "out.gguf")


@pytest.mark.parametrize("order", [[], [4], [-1], [0, 1, 7], [0, 1.5]],
                         ids=["empty", "past-the-end", "negative", "one-bad", "not-an-index"])
def test_an_order_that_does_not_fit_the_source_is_an_export_error(order, source, tmp_path):
    with pytest.raises(ExportError, match="empty|out of range|block indices"):
        write_gguf_variant(source, order, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _with_field(key, value, vtype, sub_type=None):
    return lambda writer: writer.add_key_value(key, value, vtype, sub_type=sub_type)


def _with_tensor(name: str):
    return lambda writer: writer.add_tensor(name, np.zeros(8, dtype=np.float32))


REFUSED = {
    "block-name-not-a-number": (_with_tensor("blk.x.attn_k.weight"), "not a block tensor name"),
    "block-name-leading-zero": (_with_tensor("blk.01.attn_k.weight"), "not a block tensor name"),
    "block-past-block-count": (_with_tensor("blk.4.attn_k.weight"), "block 4, but block_count is 4"),
    "leading-dense-blocks": (_with_field("llama.leading_dense_block_count", 1, T.UINT32), "by their index"),
    "swa-every-third": (_with_field("llama.attention.sliding_window_pattern", 3, T.UINT32), "by their index"),
    "split-file": (_with_field("split.count", 2, T.UINT16), "split GGUF"),
    "per-layer-tensor": (_with_tensor("per_layer_token_embd.weight"), "one slice per layer"),
    "nested-array": (_with_field("llama.nested", [[1, 2], [3]], T.ARRAY, T.ARRAY), "array of arrays"),
}


@pytest.mark.parametrize("edit, message", list(REFUSED.values()), ids=list(REFUSED))
def test_a_file_that_cannot_be_exported_faithfully_is_an_export_error(edit, message, tmp_path):
    source = make_source(tmp_path / "src.gguf", edit=edit)
    with pytest.raises(ExportError, match=message):
        write_gguf_variant(source, [0, 1], tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_a_source_without_block_count_is_an_export_error(tmp_path):
    source = make_source(tmp_path / "src.gguf", block_count=None)
    with pytest.raises(ExportError, match="no llama.block_count"):
        write_gguf_variant(source, [0], tmp_path / "out.gguf")


def test_a_uniform_schedule_field_is_copied(tmp_path):
    source = make_source(tmp_path / "src.gguf", edit=_with_field("llama.leading_dense_block_count", 0, T.UINT32))
    out = Parsed(write_gguf_variant(source, [0, 1], tmp_path / "out.gguf").path)
    assert out.fields["llama.leading_dense_block_count"][:2] == (T.UINT32, 0)


def test_a_failed_write_leaves_no_file_and_an_old_file_untouched(source, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the previous export")

    def disk_full(self, **_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        write_gguf_variant(source, [0, 1], out)
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_without_the_gguf_package_the_error_names_the_extra(source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'sweep\[gguf\]'"):
        write_gguf_variant(source, [0], tmp_path / "out.gguf")


# ---------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf) -> Path:
    return smollm2_gguf


@pytest.mark.real
def test_real_variant_copies_every_kept_tensor_and_field(smollm2_source, tmp_path):
    order = [i for i in range(30) if i not in (3, 17)]
    written = write_gguf_variant(smollm2_source, order, tmp_path / "variant.gguf")
    src, out = Parsed(smollm2_source), Parsed(written.path)
    assert out.fields["llama.block_count"][:2] == (T.UINT32, 28)
    assert len(out.tensors) == written.n_tensors == len(src.tensors) - 2 * 9
    for name, tensor in out.tensors.items():
        assert tensor == src.tensors[_source_name(name, order)], name
    assert {t for t, _, _ in out.tensors.values()} == {Q.Q4_1, Q.Q8_0, Q.F32}
    for key, (_, _, raw) in src.fields.items():
        if key != "llama.block_count":
            assert out.fields[key][2] == raw, key
    assert written.per_layer_fields == ()
    assert out.fields["sweep.source_blocks"][1] == order


REAL_ORDER = [0, 1, 2, 28, 29]
"""Few blocks: the reloaded variant is small; the blocks on both ends are where order mistakes would show."""


@pytest.fixture(scope="module")
def real_models(smollm2_source, tmp_path_factory):
    """(the source model, the variant written with REAL_ORDER and reloaded), both float32 from GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from sweep.engine import models
    from test_real import CACHE

    folder = tmp_path_factory.mktemp("smollm2-variant")
    written = write_gguf_variant(smollm2_source, REAL_ORDER, folder / "variant.gguf")
    variant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=written.path.name, dtype=torch.float32)
    # The source as sweep reads it: transformers' dequantized model, from the lane's converted-checkpoint cache.
    model = models.load_model(str(smollm2_source), dtype="float32", device="cpu", cache_dir=str(CACHE))
    return model.eval(), variant.eval()


PROBE = [[1, 504, 3458, 282, 4649, 314, 2795, 28, 476, 1345, 8186, 30, 378, 253, 1023, 2327,
          9005, 28, 198, 4057, 314, 1125, 416, 7465, 30, 2, 1072, 1429, 6041, 325, 7203, 30]]
"""32 token ids, fixed so the test needs no tokenizer."""


@pytest.mark.real
def test_real_variant_reloads_with_its_block_count(real_models):
    _, variant = real_models
    assert variant.config.num_hidden_layers == len(REAL_ORDER)


@pytest.mark.real
def test_real_variant_matches_the_source_with_those_blocks_removed_in_memory(real_models):
    import torch

    from sweep.engine.adapters import pruned

    model, variant = real_models
    ids = torch.tensor(PROBE)
    removed = [i for i in range(model.config.num_hidden_layers) if i not in REAL_ORDER]
    greedy = dict(max_new_tokens=8, do_sample=False, use_cache=True, attention_mask=torch.ones_like(ids))
    with torch.no_grad(), pruned(model, removed):
        expected_logits = model(ids).logits  # (1, 32, vocab)
        expected_tokens = model.generate(ids, **greedy)
    with torch.no_grad():
        logits = variant(ids).logits
        tokens = variant.generate(ids, **greedy)
    assert (logits - expected_logits).abs().max() <= 1e-5 * expected_logits.abs().max()
    assert tokens.tolist() == expected_tokens.tolist()

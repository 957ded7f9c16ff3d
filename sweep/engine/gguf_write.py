"""Writing a GGUF file (llama.cpp's format) with decoder blocks removed, repeated or reordered, byte for byte.

A variant is given by ``order``: ``order[j]`` is the source block that becomes block ``j`` of the output, so
removing blocks 3 and 17 of a 30-block model is ``order = [0, 1, 2, 4, ..., 16, 18, ..., 29]``, and
``[0, 1, 1, 2]`` or ``[1, 0, 2]`` repeat or swap blocks. The file is read with ``gguf.GGUFReader`` and written
with ``gguf.GGUFWriter``; nothing is dequantized or requantized. The rules:

Tensors
    - A block tensor ``blk.{src}.<rest>`` is written as ``blk.{j}.<rest>`` for every ``j`` with
      ``order[j] == src`` (a repeated block is copied once per occurrence); a block absent from ``order`` is
      dropped. Every copied tensor keeps its quantization type (Q4_1, Q8_0, F16, F32...), its shape and its
      bytes exactly.
    - Every other tensor (``token_embd``, ``output_norm``, ``output``, ``rope_freqs``...) is copied unchanged.
    - Order in the file: the non-block tensors that came before the first block tensor, then blocks
      ``0 .. len(order)-1`` (each block's tensors in their source order), then the other non-block tensors.
      The data alignment is the source's (``general.alignment``, 32 when unset) and so is the byte order.

Metadata
    - ``{arch}.block_count`` (``arch`` = ``general.architecture``) becomes ``len(order)``, in its own type.
    - A *per-layer* array, one entry per block, becomes ``[arr[src] for src in order]`` in its own element
      type. A field is per-layer when it is an array of numbers or booleans, of exactly ``block_count``
      entries, under the ``{arch}.`` prefix (``llama.feed_forward_length``, ``openelm.attention.head_count``,
      ``lfm2.attention.head_count_kv``, ``gemma3n.attention.sliding_window_pattern``...), or one of the few
      per-layer keys llama.cpp keeps outside that prefix (:data:`PER_LAYER_OUTSIDE_ARCH`). The prefix rule is
      what keeps the tokenizer whole: ``tokenizer.ggml.*`` arrays (tokens, scores, token types) whose length
      happens to equal ``block_count``, as in tiny test models, are not per layer. Arrays of
      strings (``{arch}.classifier.output_labels``) and :data:`FIXED_LENGTH_ARRAYS` are never per layer.
      (``llama-quantize --prune-layers`` leaves these arrays at their source length, which breaks loading: a
      known open bug of llama.cpp's own layer pruning.)
    - Every other field keeps its key, its exact type (UINT32 stays UINT32, INT32 stays INT32) and its value:
      the tokenizer, the chat template, ``general.*``. Strings are copied as bytes, never re-encoded. The
      header counts (``GGUF.version``, ``GGUF.tensor_count``, ``GGUF.kv_count``) are the writer's own.
    - The edit is recorded: ``sweep.source_blocks`` (UINT32 array, one entry per output block: its index in the
      original model) and ``sweep.source_block_count`` (UINT32). Loaders ignore keys they do not know
      (transformers logs them, llama.cpp looks keys up by name). ``sweep.source_blocks`` is itself per layer,
      so exporting a variant of an exported file composes the two edits and still points into the original.

Worked example: a 4-block llama file and ``order = [0, 2, 2]`` (drop blocks 1 and 3, run block 2 twice)::

    source tensors                 output tensors
    token_embd.weight     Q8_0     token_embd.weight     Q8_0   same bytes
    blk.0.attn_q.weight   Q4_1     blk.0.attn_q.weight   Q4_1   bytes of source blk.0.attn_q.weight
    blk.1.attn_q.weight   Q4_1     blk.1.attn_q.weight   Q4_1   bytes of source blk.2.attn_q.weight
    blk.2.attn_q.weight   Q4_1     blk.2.attn_q.weight   Q4_1   bytes of source blk.2.attn_q.weight
    blk.3.attn_q.weight   Q4_1     output_norm.weight    F32    same bytes
    output_norm.weight    F32

    field                        source                 output
    llama.block_count            UINT32 4               UINT32 3
    llama.feed_forward_length    UINT32 [64,48,32,16]   UINT32 [64,32,32]   per layer: cut
    tokenizer.ggml.token_type    INT32 [1,1,3,3]        INT32 [1,1,3,3]     not under llama.: kept
    sweep.source_blocks          -                      UINT32 [0,2,2]      the record of the edit
    sweep.source_block_count     -                      UINT32 4

Refused with :class:`~sweep.errors.ExportError` (the file could not be exported faithfully): a source that is
not a readable GGUF, no ``{arch}.block_count``, an empty order or an index out of range, a ``blk.*`` tensor name
that is not ``blk.<index>.<name>`` with an index below ``block_count``, a split (sharded) file, a nested or empty
metadata array (``GGUFReader`` flattens the one and ``GGUFWriter`` refuses the other), a field of
:data:`INDEX_DEPENDENT_FIELDS` that makes blocks differ by their index (the first N dense, every Nth MoE...),
and tensors outside the blocks that hold per-layer slices (:data:`PER_LAYER_TENSOR_PREFIXES`). The output is
written to a temporary name beside ``out`` and renamed at the end, so a failed export leaves no half file.

Not detected: schedules that llama.cpp derives from the block index in code rather than metadata (e.g. the
sliding-window pattern of Gemma 2/3 or Cohere 2, ``hparams.set_swa_pattern``): moving a block there changes its
attention type.
"""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sweep.errors import ExportError, MissingExtraError

if TYPE_CHECKING:
    from gguf import GGUFReader, GGUFWriter, ReaderField, ReaderTensor

SOURCE_BLOCKS_KEY = "sweep.source_blocks"
"""UINT32 array: for each output block, the index of the block of the original model it is a copy of."""

SOURCE_BLOCK_COUNT_KEY = "sweep.source_block_count"
"""UINT32: the block count of the original model."""

HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
"""Fields GGUFReader reports from the file header; GGUFWriter writes its own."""

PER_LAYER_OUTSIDE_ARCH = ("xielu.alpha_p", "xielu.alpha_n", "xielu.beta", "xielu.eps", SOURCE_BLOCKS_KEY)
"""Per-layer arrays outside the ``{arch}.`` prefix: Apertus' xIELU activation parameters (one per layer, see
gguf.constants.Keys.xIELU) and our own record of source blocks."""

FIXED_LENGTH_ARRAYS = ("rope.dimension_sections",)
"""Arrays under ``{arch}.`` whose length is fixed by the format, never per layer (M-RoPE has 4 sections)."""

INDEX_DEPENDENT_FIELDS = {
    "leading_dense_block_count": 0,   # the first N blocks are dense, the rest MoE (DeepSeek, GLM-4.5)
    "nextn_predict_layers": 0,        # the last N blocks are multi-token-prediction heads (GLM-4.5)
    "n_deepstack_layers": 0,          # the first N blocks take deepstack vision features (Qwen3-VL)
    "attention.shared_kv_layers": 0,  # the last N blocks reuse earlier KV caches (Gemma 3n)
    "moe_every_n_layers": 1,          # every Nth block is MoE (Nomic-BERT-MoE)
    "interleave_moe_layer_step": 1,   # every Nth block is MoE (Llama 4)
    "full_attention_interval": 1,     # every Nth block is full attention (Qwen3-Next)
    "rescale_every_n_layers": 0,      # hidden state halved every N blocks (RWKV 6)
    "attention.sliding_window_pattern": 1,  # as a number: every Nth block is global (as an array: per layer)
}
"""Scalar fields under ``{arch}.`` by which a block's role depends on its index, with the largest value for
which all blocks are alike: any other value cannot survive removing or moving blocks."""

PER_LAYER_TENSOR_PREFIXES = ("per_layer_token_embd.", "per_layer_model_proj.")
"""Non-block tensors made of one slice per layer (Gemma 3n), which would need cutting too."""

_BLOCK_TENSOR = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")


@dataclass(frozen=True)
class GGUFWritten:
    """What :func:`write_gguf_variant` wrote."""

    path: Path
    """The output file."""
    architecture: str
    """``general.architecture`` of the source (and of the output)."""
    source_block_count: int
    """``{arch}.block_count`` of the source."""
    block_count: int
    """``{arch}.block_count`` of the output: ``len(order)``."""
    n_tensors: int
    """Tensors written (non-block tensors plus each output block's tensors)."""
    per_layer_fields: tuple[str, ...]
    """The per-layer metadata arrays that were cut to ``order`` (besides ``{arch}.block_count``)."""
    n_bytes: int
    """Size of the output file."""


def write_gguf_variant(source: str | os.PathLike, order: Sequence[int], out: str | os.PathLike) -> GGUFWritten:
    """Write ``source`` with block ``j`` of the output a byte-for-byte copy of source block ``order[j]``.

    Args:
        source: a GGUF file.
        order: the source block of each output block; the kept blocks in order to remove blocks, repeats and
            swaps allowed (see the module docstring for a worked example).
        out: the file to write; replaced only once the new file is complete.

    Returns:
        What was written.

    Raises:
        ExportError: the source is not a readable GGUF, the order does not fit it, or the file cannot be
            exported faithfully (the reasons are listed in the module docstring).
        MissingExtraError: the ``gguf`` package is not installed.
    """
    source, out = Path(source), Path(out)
    reader = _read(source)
    arch = _architecture(reader, source)
    n_source = _block_count(reader, arch, source)
    order = _checked_order(order, n_source)
    _refuse_unfaithful(reader, arch, source)
    tensors = _tensor_plan(reader, order, n_source)
    per_layer = tuple(key for key, field in reader.fields.items() if _is_per_layer(key, field, arch, n_source))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _write(reader, arch, order, n_source, tensors, set(per_layer), tmp)
        os.replace(tmp, out)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot write {out}: {_first_line(exc)}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFWritten(out, arch, n_source, len(order), len(tensors),
                       tuple(k for k in per_layer if k != SOURCE_BLOCKS_KEY), out.stat().st_size)


# ---------------------------------------------------------------------------------------------- reading


def _gguf():
    """The gguf package, or the pip extra that installs it."""
    try:
        import gguf
    except ImportError as exc:
        raise MissingExtraError("writing GGUF files needs the gguf package: pip install 'sweep[gguf]'") from exc
    return gguf


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# What GGUFReader raises on a truncated or corrupt file: a bad magic or version (ValueError), a read past the end
# (IndexError on an empty slice, ValueError from reshape), a duplicate key (KeyError), an unknown type enum
# (ValueError), an empty file (ValueError from mmap), a missing one (OSError).
_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, OverflowError, MemoryError)


def _read(source: Path) -> GGUFReader:
    gguf = _gguf()
    try:
        return gguf.GGUFReader(source)
    except _READ_ERRORS as exc:
        raise ExportError(f"{source} is not a readable GGUF file; is it truncated or corrupt? "
                          f"({_first_line(exc)})") from exc


def _architecture(reader: GGUFReader, source: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None or not field.types or field.types[0].name != "STRING":
        raise ExportError(f"{source}: no general.architecture string")
    return bytes(field.parts[-1]).decode("utf-8")


def _block_count(reader: GGUFReader, arch: str, source: Path) -> int:
    field = reader.fields.get(f"{arch}.block_count")
    if field is None or len(field.types) != 1 or not isinstance(field.contents(), int):
        raise ExportError(f"{source}: no {arch}.block_count, so its blocks cannot be told apart")
    return field.contents()


def _checked_order(order: Sequence[int], n_source: int) -> list[int]:
    try:
        blocks = [operator.index(i) for i in order]  # ints and numpy ints; 1.5 is an error, not block 1
    except TypeError as exc:
        raise ExportError(f"the block order must be a list of block indices, not {order!r}") from exc
    if not blocks:
        raise ExportError("the block order is empty: an output needs at least one block")
    wrong = [i for i in blocks if not 0 <= i < n_source]
    if wrong:
        raise ExportError(f"block order {wrong} out of range: the source has blocks 0..{n_source - 1}")
    return blocks


def _refuse_unfaithful(reader: GGUFReader, arch: str, source: Path) -> None:
    """Files whose blocks cannot be moved or removed by renaming tensors and cutting per-layer arrays alone."""
    for suffix, uniform in INDEX_DEPENDENT_FIELDS.items():
        field = reader.fields.get(f"{arch}.{suffix}")
        value = field.contents() if field is not None and len(field.types) == 1 else None  # arrays: per layer
        if isinstance(value, (int, float)) and value > uniform:
            raise ExportError(f"{source}: {arch}.{suffix} = {value} gives blocks roles by their index; "
                              "removing or moving blocks would change them, so sweep does not export this file")
    if "split.count" in reader.fields and reader.fields["split.count"].contents() > 1:
        raise ExportError(f"{source} is one shard of a split GGUF; merge it first (llama-gguf-split --merge)")
    sliced = [t.name for t in reader.tensors if t.name.startswith(PER_LAYER_TENSOR_PREFIXES)]
    if sliced:
        raise ExportError(f"{source}: {', '.join(sliced)} hold one slice per layer outside the blocks; "
                          "sweep does not cut tensors, so it does not export this file")


def _is_per_layer(key: str, field: ReaderField, arch: str, n_source: int) -> bool:
    """One entry per block: see the module docstring for why only numbers under ``{arch}.`` qualify."""
    gguf = _gguf()
    if field.types[:1] != [gguf.GGUFValueType.ARRAY] or len(field.data) != n_source:
        return False
    if _element_type(field) in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
        return False
    if key in PER_LAYER_OUTSIDE_ARCH:
        return True
    return key.startswith(f"{arch}.") and key.removeprefix(f"{arch}.") not in FIXED_LENGTH_ARRAYS


def _element_type(field: ReaderField):
    """An array's element type, from the file (``field.types`` lacks it when the array is empty)."""
    gguf = _gguf()
    return gguf.GGUFValueType(int(field.parts[3][0]))  # parts: key length, key, value type, element type, count


# ---------------------------------------------------------------------------------------------- tensors


def _block_of(name: str, n_source: int) -> tuple[int, str] | None:
    """``(block index, rest of the name)`` of a block tensor; None for the others."""
    if not name.startswith("blk."):
        return None
    match = _BLOCK_TENSOR.fullmatch(name)
    if match is None:
        raise ExportError(f"tensor {name!r}: not a block tensor name sweep understands (blk.<index>.<name>)")
    block = int(match.group(1))
    if block >= n_source:
        raise ExportError(f"tensor {name!r} is in block {block}, but block_count is {n_source}")
    return block, match.group(2)


def _tensor_plan(reader: GGUFReader, order: list[int], n_source: int) -> list[tuple[str, ReaderTensor]]:
    """``(output name, source tensor)`` of every tensor to write, in the order of the module docstring."""
    before: list[tuple[str, ReaderTensor]] = []
    after: list[tuple[str, ReaderTensor]] = []
    blocks: dict[int, list[tuple[str, ReaderTensor]]] = {}
    for tensor in reader.tensors:
        block = _block_of(tensor.name, n_source)
        if block is not None:
            blocks.setdefault(block[0], []).append((block[1], tensor))
        else:
            (after if blocks else before).append((tensor.name, tensor))
    kept = [(f"blk.{j}.{rest}", tensor) for j, src in enumerate(order) for rest, tensor in blocks.get(src, [])]
    return before + kept + after


# ---------------------------------------------------------------------------------------------- writing


def _write(reader: GGUFReader, arch: str, order: list[int], n_source: int,
           tensors: list[tuple[str, ReaderTensor]], per_layer: set[str], path: Path) -> None:
    gguf = _gguf()
    # The source's byte order for the metadata the writer packs and for the tensors, which are then copied
    # without a swap: their bytes stay the source's.
    writer = gguf.GGUFWriter(path, arch, endianess=reader.endianess)
    try:
        _copy_metadata(writer, reader, arch, order, n_source, per_layer)
        for name, tensor in tensors:
            # Quantized data comes as bytes (uint8, shape in bytes), which the writer turns back into the
            # element shape for raw_dtype; F32/F16/I* come as their numpy type and shape.
            writer.add_tensor(name, tensor.data, raw_dtype=tensor.tensor_type, tensor_endianess=reader.endianess)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _copy_metadata(writer: GGUFWriter, reader: GGUFReader, arch: str, order: list[int], n_source: int,
                   per_layer: set[str]) -> None:
    for key, field in reader.fields.items():
        # GGUFWriter writes general.architecture itself, first, from ``arch``.
        if key in HEADER_FIELDS or key == "general.architecture":
            continue
        value, vtype, sub_type = _field_value(key, field)
        if key == f"{arch}.block_count":
            value = len(order)
        elif key in per_layer:
            value = [value[src] for src in order]
        if key == "general.alignment":
            writer.add_custom_alignment(value)  # sets the data alignment too, not only the key
        else:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
    if SOURCE_BLOCKS_KEY not in reader.fields:  # else it was cut above, composing this edit with the earlier one
        types = _gguf().GGUFValueType
        writer.add_key_value(SOURCE_BLOCKS_KEY, list(order), types.ARRAY, sub_type=types.UINT32)
        writer.add_key_value(SOURCE_BLOCK_COUNT_KEY, n_source, types.UINT32)


def _field_value(key: str, field: ReaderField) -> tuple[Any, Any, Any]:
    """``(value, type, element type)`` as GGUFWriter.add_key_value takes them; strings as raw bytes."""
    gguf = _gguf()
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]), vtype, None
    if vtype != gguf.GGUFValueType.ARRAY:
        return field.parts[-1].tolist()[0], vtype, None
    element = _element_type(field)
    if element == gguf.GGUFValueType.ARRAY:
        raise ExportError(f"metadata {key}: an array of arrays, which GGUFReader flattens; it cannot be copied")
    if not field.data:
        raise ExportError(f"metadata {key}: an empty array, which GGUFWriter cannot write")
    if element == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], vtype, element
    return [field.parts[i].tolist()[0] for i in field.data], vtype, element

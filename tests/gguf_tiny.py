"""A tiny Llama written as a GGUF file the way llama.cpp's converter lays it out (tensor names ``blk.N.attn_q``...,
query and key rows permuted for its rotary layout), from a seeded random-init transformers model: an offline
GGUF whose correct reading is known, since it must give back the model it was written from."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tiny import tiny_model

# transformers name inside a decoder layer -> llama.cpp's name inside ``blk.N.``
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def rotary_interleaved(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for query/key projections: within each head, the two rotary halves interleaved.

    A head's rows ``[x0..x(d/2-1), y0..y(d/2-1)]`` (transformers' rotate-half layout) become
    ``[x0, y0, x1, y1, ...]``. Example, one head of 4 rows [a, b, c, d]: -> [a, c, b, d].
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2  # (n_heads, 2, d/2, cols) -> (n_heads, d/2, 2, cols)
    return weight.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def rotary_halves(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`rotary_interleaved`: [a, c, b, d] -> [a, b, c, d]."""
    rows, cols = weight.shape
    half = rows // n_heads // 2  # (n_heads, d/2, 2, cols) -> (n_heads, 2, d/2, cols)
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_llama_gguf(path: Path, n_layers: int = 4, vocab: int = 256, seed: int = 0, quantize: bool = True):
    """Write the seeded tiny Llama (tests/tiny.py) to ``path``; return the model it came from.

    With ``quantize`` the 2-D weights whose rows are a multiple of 32 wide are stored as Q8_0 (what the real
    file does with its embedding), the rest in F32: the reader must dequantize, and exactness is then against the
    Q8_0-rounded weights, which the returned model holds.
    """
    import gguf
    import torch

    model = tiny_model("llama", n_layers=n_layers, vocab=vocab, seed=seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    tensors = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        for hf_name, param in layer.state_dict().items():
            tensors[f"blk.{i}.{LAYER_TENSORS[hf_name]}"] = param
    for name, tensor in tensors.items():
        array = tensor.detach().float().numpy()
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(kind)
        stored = rotary_interleaved(array, heads) if heads else array
        if quantize and array.ndim == 2 and array.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            raw = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(name, raw, raw_dtype=qtype)  # shape from the bytes
            rounded = gguf.quants.dequantize(raw, qtype).reshape(stored.shape)
            with torch.no_grad():  # the model keeps what the file holds
                tensor.copy_(torch.from_numpy(rotary_halves(rounded, heads) if heads else rounded))
        else:
            writer.add_tensor(name, np.ascontiguousarray(stored, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model

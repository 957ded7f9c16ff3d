"""Tiny seeded random-init models of each supported family, built from config (no network)."""
from __future__ import annotations

import torch

FAMILIES = ("gpt2", "gpt_neo", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


def tiny_config(family: str, n_layers: int = 4, vocab: int = 96):
    """A 4-layer, 32-wide config of ``family`` (layer types alternate where the family has them)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=32, n_layer=n_layers, n_head=4, n_positions=128)
    if family == "gpt_neo":
        kinds = (["global", "local"] * n_layers)[:n_layers]
        return AutoConfig.for_model("gpt_neo", vocab_size=vocab, hidden_size=32, num_layers=n_layers, num_heads=4,
                                    max_position_embeddings=128, window_size=8,
                                    attention_types=[[[k], 1] for k in kinds])
    if family == "opt":
        return AutoConfig.for_model("opt", vocab_size=vocab, hidden_size=32, num_hidden_layers=n_layers,
                                    num_attention_heads=4, ffn_dim=64, max_position_embeddings=128,
                                    word_embed_proj_dim=32)
    extra = {}
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        extra["num_key_value_heads"] = 2
    if family in ("qwen3", "gemma", "gemma2"):
        extra["head_dim"] = 8
    if family == "gemma2":
        extra.update(sliding_window=8, layer_types=(["sliding_attention", "full_attention"] * n_layers)[:n_layers])
    if family == "qwen2":
        extra.update(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    if family == "mistral":
        extra.update(sliding_window=8)
    if family == "phi3":
        extra.update(pad_token_id=0)
    return AutoConfig.for_model(family, **common, **extra)


def tiny_model(family: str = "gpt2", n_layers: int = 4, seed: int = 0, vocab: int = 96):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, n_layers, vocab)
    config.bos_token_id = config.eos_token_id = 1
    if hasattr(config, "pad_token_id"):
        config.pad_token_id = 0
    # GPT-Neo has no SDPA path; Gemma2's soft-capping needs eager attention.
    attn = "eager" if family in ("gpt_neo", "gemma2") else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def train_briefly(model, tokenizer, text: str, steps: int, lr: float, window: int = 64, batch: int = 8):
    """``steps`` seeded AdamW steps of next-token loss on random ``window``-token windows of ``text`` (frozen
    parameters stay frozen), so that a tiny model's layers differ in what they cost; returns it in eval mode."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // window * window].view(-1, window)  # (n, window)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        chunk = windows[torch.randint(0, len(windows), (batch,), generator=gen)]
        loss = model(chunk, labels=chunk).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def db_rows(db, sql: str) -> list[dict]:
    """The rows of ``sql`` on the SQLite file ``db`` as dicts, read without sweep (tests check what was stored)."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()

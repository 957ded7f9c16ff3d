"""The measuring engine (torch): load a model once, evaluate its variants, and store each result as it comes.

Modules, from the bottom up (each imports only those above it in this list):

- :mod:`~sweep.engine.adapters`: one record per model family; removal in place, replay, signatures;
- :mod:`~sweep.engine.gguf_read`, :mod:`~sweep.engine.gguf_write`: GGUF files in (cached conversion) and out;
- :mod:`~sweep.engine.models`: loading models and tokenizers, weights fingerprints, export;
- :mod:`~sweep.engine.data`: evaluation text, tokenization cache, evaluation windows;
- :mod:`~sweep.engine.device`: device names, sticky errors, memory, batch sizes;
- :mod:`~sweep.engine.perplexity`: the guide's windowing and weighting rule, the chunked LM head + loss;
- :mod:`~sweep.engine.trie`: many variants as a trie over their kept layers (prefix sharing);
- :mod:`~sweep.engine.latency`: prefill and decode timings;
- :mod:`~sweep.engine.identity`: the model row and setup id of a sweep, defined once;
- :mod:`~sweep.engine.faults`: test-only fault injection;
- :mod:`~sweep.engine.worker`: a model on one device turning removals into result rows;
- :mod:`~sweep.engine.similarity`: calibration signals and the signal-guided strategies' choices;
- :mod:`~sweep.engine.parallel`: worker processes (joblib) and Dask clusters;
- :mod:`~sweep.engine.runner`: `sweep run`; :mod:`~sweep.engine.status`: `sweep plan`.

This file is the engine's public interface: the CLI and :mod:`sweep.extras` use only what it exports.
"""
from __future__ import annotations

import os
from pathlib import Path

# Before torch loads: its OpenMP runtime reads this once. Threads that finish a parallel region sleep instead of
# spinning for the next one, so on a busy machine they stop burning the cores the other threads wait for
# (measured on a loaded 2-core machine: 1.2 s per training step of a tiny model with two spinning threads, 0.19 s
# with two passive ones, 0.18 s with one). Idle, passive threads cost a wake-up per region (docs/benchmark.md).
# Set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sweep.config import SweepConfig
from sweep.engine.adapters import decoder_layers, lora_target_modules, n_layers_of, pruned
from sweep.engine.data import EvalSetup, TokenizedText, describe, load_text, load_tokens, resolve_windows, tokenize
from sweep.engine.device import device_name
from sweep.engine.identity import (ModelIdentity, SetupIdentity, evaluation_setup, model_identity, register_model,
                                   register_setup)
from sweep.engine.models import (checkpoint_dtype, config_for, export_gguf, export_pruned, load_model,
                                 load_model_4bit, model_for, tokenizer_for)
from sweep.engine.runner import Summary, measure_variants, open_setup, run_sweep
from sweep.engine.similarity import run_similarity
from sweep.engine.status import describe_plan
from sweep.engine.worker import Worker, load_worker
from sweep.errors import PlanError
from sweep.plan import Removal, parse_remove, variant_key
from sweep.steps import is_block_variant, steps_of


def one_removal(cfg: SweepConfig, text: str | None, command: str) -> tuple[Removal, int]:
    """The single group of layers ``--remove`` names for ``command`` (export, heal), checked against the model.

    Returns:
        (removed layers, the model's layer count).

    Raises:
        PlanError: no group, several groups, or a layer out of range.
    """
    n_layers = n_layers_of(config_for(cfg))
    removals = parse_remove(text, n_layers) if text else []
    if len(removals) != 1 or not removals[0]:
        raise PlanError(f'`--remove` for {command} takes one group of layers to remove, e.g. --remove "9,10,11"')
    if command != "export" and not is_block_variant(removals[0]):
        raise PlanError(f"`--remove` for {command} takes whole layers to remove; {variant_key(removals[0])!r} "
                        "is a unit or order variant")
    return removals[0], n_layers


def export_variant(cfg: SweepConfig, remove: str, out: str | Path) -> str:
    """`sweep export`: save the model without the ``--remove`` layers so it reloads with ``from_pretrained``, or,
    when ``out`` ends in ``.gguf``, as a GGUF file with the source's tensors copied byte for byte.

    The checkpoint's dtype is kept unless ``--dtype`` says otherwise (auto would upcast to float32 on CPU); a GGUF
    source exported to a directory is saved dequantized (float32).

    Returns:
        The line to print.
    """
    removed, n_layers = one_removal(cfg, remove, "export")
    if str(out).lower().endswith(".gguf"):
        saved = export_gguf(cfg.model, removed, out, cfg.cache_dir)
    else:
        tokenizer = tokenizer_for(cfg)
        dtype = checkpoint_dtype(config_for(cfg)) if cfg.dtype == "auto" else cfg.dtype
        model = load_model(cfg.model, cfg.revision, dtype, "cpu" if cfg.device == "auto" else cfg.device,
                           cfg.random_init, cfg.trust_remote_code, cfg.cache_dir)
        saved = export_pruned(model, tokenizer, removed, out)
    if not is_block_variant(removed):
        n_saved = len(steps_of(removed, n_layers))
        return f"saved {cfg.model} as variant {variant_key(removed)} ({n_saved} layers, from {n_layers}) to {saved}"
    return (f"saved {cfg.model} without layers {variant_key(removed)} ({n_layers - len(removed)} of {n_layers} "
            f"layers) to {saved}")


__all__ = [
    "EvalSetup", "ModelIdentity", "SetupIdentity", "Summary", "TokenizedText", "Worker", "config_for",
    "decoder_layers", "describe", "describe_plan", "device_name", "evaluation_setup",
    "export_pruned", "export_variant", "load_model", "load_model_4bit", "load_text", "load_tokens", "load_worker",
    "lora_target_modules", "measure_variants", "model_for", "model_identity", "n_layers_of", "one_removal",
    "open_setup", "pruned", "register_model", "register_setup", "resolve_windows", "run_similarity", "run_sweep",
    "tokenize", "tokenizer_for",
]

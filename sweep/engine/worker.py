"""One device's work: hold a loaded model and its evaluation tokens, evaluate variants without reloading.

A worker knows nothing about the database or the plan: it turns a removal into a result row (a dict with the
columns of ``store.RESULT_COLUMNS``), and measurement failures (out of memory, NaN) into rows with a status.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from sweep.config import CPU_BATCH_SIZE, SweepConfig
from sweep.engine import adapters, latency, models, perplexity, trie
from sweep.engine.device import (MemoryProbe, batch_size_for, device_name, free_memory, memory_probe,
                                 retry_batch_sizes)
from sweep.engine.data import EvalSetup, TokenizedText, load_tokens, resolve_windows, used_tokens
from sweep.engine.faults import injected_delay, injected_fault
from sweep import steps as variant_steps
from sweep.plan import kept_layers, variant_key
from sweep.store.schema import WINDOW_NLL, WINDOW_TOKENS


class Worker:
    """A model on one device plus the tokens to evaluate it on.

    ``memory`` is where the automatic batch size reads device memory (default: the device's own probe; None on
    CPU); tests pass a simulated one.
    """

    def __init__(self, model: nn.Module, tokens: TokenizedText, setup: EvalSetup, cfg: SweepConfig,
                 memory: MemoryProbe | None = None):
        self.model = model
        self.tokens = tokens
        self.cfg = cfg
        self.setup = setup
        self.device = next(model.parameters()).device
        n_eval = used_tokens(len(tokens.ids), setup.max_tokens)
        self.token_ids = torch.as_tensor(tokens.ids[:n_eval]).to(self.device)  # (N,) moved once
        # Bytes covered by the evaluated tokens, pro rata when --max-tokens cuts the text.
        self.tokens_per_byte = len(tokens.ids) / tokens.n_bytes
        self.n_layers = adapters.n_layers_of(model.config)
        self.layer_params = adapters.layer_params(model)
        self.total_params = adapters.total_params(model)
        self.embedding_params = adapters.embedding_params(model)
        self.hidden_fn, self.logits_fn, self.split_head = self._split_head()
        self.trie_ok = self.split_head and self._trie_reproduces_backbone()
        if cfg.compile_layers:
            compile_layers(model)
        self.head_loss = self._head_loss()
        self.memory = memory if memory is not None else memory_probe(self.device)
        self.batch_size = cfg.batch_size or self._auto_batch_size()
        self.host = socket.gethostname()
        self.device_name = device_name(self.device)
        self.calls = trie.CallCounts()
        """Layer and head calls of every evaluation so far (the bench reads them)."""
        self.captures = trie.CaptureCache(trie.capture_budget(self.device.type))
        """The trie's capture forwards, kept for the next trie pass over the same windows (CPU only)."""

    # ------------------------------------------------------------------------------------------ head

    def _head_loss(self):
        """The LM head + loss ``--head`` asks for (:mod:`perplexity`); online and fused need a plain linear head."""
        cfg, head = self.cfg, self.model.get_output_embeddings()
        choice = cfg.head if cfg.head != "auto" else ("chunked" if self.device.type == "cuda" else "online")
        linear = self.split_head and isinstance(head, nn.Linear)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if choice == "online" and linear:
            return perplexity.OnlineHeadLoss(head.weight, head.bias, softcap)
        if choice == "fused" and linear and not softcap:
            fused = perplexity.fused_head_loss(head.weight, head.bias)
            if fused is not None:
                return fused
            warnings.warn("--head fused needs liger-kernel and CUDA; using the chunked head", stacklevel=2)
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda")
        return perplexity.HeadLoss(self.logits_fn, compiled=use_compile)

    def _auto_batch_size(self) -> int:
        """Windows per batch from free device memory (``--batch-size 0``); CPU_BATCH_SIZE without a memory probe.

        One window of the full model is run and its peak memory above the resident weights measured (activations,
        attention mask, a head chunk's logits); the trie adds one residual stream (1, T, H) per depth, up to L + 1
        of them. Both grow linearly with the batch, so the batch is free memory / per-window cost
        (:func:`batch_size_for`).
        """
        if self.memory is None:
            return CPU_BATCH_SIZE
        length = min(self.setup.max_length, len(self.token_ids))
        probe = self.token_ids[:length][None]  # (1, T)
        resident = self.memory.start_peak()
        with torch.no_grad():
            hidden = self.hidden_fn(probe)  # (1, T, H)
            perplexity.window_nll(self.head_loss, hidden, probe, length)
        transient = self.memory.peak_bytes() - resident
        depth = self.n_layers + 1 if self.trie_ok and self.cfg.engine == "trie" else 1
        per_window = transient + depth * hidden.numel() * hidden.element_size()
        del hidden
        n_windows = len(perplexity.windows(len(self.token_ids), self.setup.max_length, self.setup.stride))
        return batch_size_for(self.memory.free_bytes(), per_window, n_windows)

    def _split_head(self):
        """Run backbone and LM head separately (so the head can be chunked) when that reproduces the model.

        The split is checked once against the model's own logits; architectures that post-process logits in
        ways we do not know fall back to full-model logits.
        """
        model = self.model
        backbone = model.base_model
        head = model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)

        def hidden_fn(ids: torch.Tensor) -> torch.Tensor:
            return backbone(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)

        def logits_fn(hidden: torch.Tensor) -> torch.Tensor:
            logits = head(hidden)  # (B, t, V)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            return logits

        probe = self.token_ids[: min(16, len(self.token_ids))][None]
        with torch.no_grad():
            want = model(input_ids=probe, use_cache=False).logits.float()
            got = logits_fn(hidden_fn(probe)).float()
        tol = 1e-4 if want.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 2e-2
        if got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol):
            return hidden_fn, logits_fn, True
        return (lambda ids: model(input_ids=ids, use_cache=False).logits), (lambda logits: logits), False

    def _trie_reproduces_backbone(self) -> bool:
        """Replaying captured layer calls must give the backbone's own output, or the trie engine is not used."""
        probe = self.token_ids[: min(16, len(self.token_ids))][None]
        # The full model, and a variant without layer 0 and a middle layer (catches layer arguments that
        # carry state from earlier layers, which a full replay alone would not).
        checks = [[], sorted({0, self.n_layers // 2})] if self.n_layers > 1 else [[]]
        # Same kernels on the same shapes: equal up to float32 rounding; half precision gets the head check's margin.
        tol = 1e-4 if next(self.model.parameters()).dtype == torch.float32 else 2e-2
        try:
            with torch.no_grad():
                calls = adapters.capture_layer_calls(self.model, probe)
                finish = adapters.final_norm_fn(self.model)
                for removed in checks:
                    hidden = calls.hidden
                    for i in kept_layers(removed, self.n_layers):
                        before = hidden.clone()
                        hidden_in, hidden = hidden, adapters.call_layer(self.model, i, hidden, calls)
                        # The trie feeds one stream to several children: a layer that writes into its input
                        # would corrupt its siblings' input.
                        if not torch.equal(hidden_in, before):
                            return False
                    got = finish(hidden).float()
                    with adapters.pruned(self.model, removed):
                        want = self.hidden_fn(probe).float()
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
                        return False
        except Exception:  # an architecture whose layers cannot be replayed: use the per-variant engine
            return False
        return True

    # ------------------------------------------------------------------------------------------ variants

    def steps_of(self, removed: Sequence) -> variant_steps.Steps:
        """The step sequence of a variant (:func:`sweep.steps.steps_of`)."""
        return variant_steps.steps_of(removed, self.n_layers)

    def check_variants(self, variants: Sequence[Sequence]) -> None:
        """Refuse, before anything is measured, variants this model cannot run (:func:`adapters.check_steps`)."""
        for removed in variants:
            if not variant_steps.is_block_variant(removed):
                adapters.check_steps(self.model, self.steps_of(removed))

    def params_of(self, removed: Sequence) -> tuple[int, int]:
        """(total, non-embedding) parameters of a variant: exact, without building it.

        A removed branch's weights (and its pre-norm's) do not count; a repeated layer counts once per
        occurrence, as in the exported model that holds a copy of it per occurrence.
        """
        if variant_steps.is_block_variant(removed):
            total = self.total_params - sum(self.layer_params[i] for i in removed)
        else:
            calls = [m for step in self.steps_of(removed) for m in variant_steps.members(step)]
            total = (self.total_params - sum(self.layer_params)
                     + sum(self.layer_params[m.layer] if m.branches == "am" else self._step_params(m) for m in calls))
        return total, total - self.embedding_params

    def _step_params(self, step: variant_steps.Step) -> int:
        cache = self.__dict__.setdefault("_step_param_counts", {})
        if step not in cache:
            cache[step] = adapters.step_params(self.model, step)
        return cache[step]

    def _base_row(self, removed: Sequence) -> dict:
        total, non_embedding = self.params_of(removed)
        if variant_steps.is_block_variant(removed):
            kept = kept_layers(removed, self.n_layers)
            n_removed, n_layers, kept_text = len(removed), len(kept), variant_key(kept)
        else:
            steps = self.steps_of(removed)
            n_removed, n_layers = variant_steps.n_removed(removed), variant_steps.n_calls(steps)
            kept_text = variant_steps.steps_text(steps)
        return {"removed": variant_key(removed), "n_removed": n_removed, "n_layers": n_layers,
                "kept_layers": kept_text, "params": total, "params_non_embedding": non_embedding,
                "device": self.device_name, "host": self.host}

    def failed_row(self, removed: Sequence[int], error: str) -> dict:
        """A ``failed`` result row for a variant whose measurement could not finish (the error says why)."""
        return {**self._base_row(removed), "status": "failed", "error": error}

    def release_device(self) -> None:
        """Move the model off the GPU (the coordinator's copy, once worker processes take over the GPUs)."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            free_memory(self.device)

    def _row(self, removed: Sequence[int], result: perplexity.Perplexity, seconds: float) -> dict:
        """A result row from a perplexity; NaN or inf perplexity makes it ``diverged``."""
        if injected_fault("nan", removed):
            result = perplexity.Perplexity(math.nan, result.n_tokens, (math.nan,) * len(result.window_nll or ()),
                                           result.window_tokens)
        ppl = result.ppl
        row = {**self._base_row(removed), "nll_sum": result.nll_sum, "n_tokens": result.n_tokens,
               WINDOW_NLL: list(result.window_nll or ()), WINDOW_TOKENS: list(result.window_tokens or ()),
               "n_bytes": round(len(self.token_ids) / self.tokens_per_byte), "ppl": ppl,
               "bpb": perplexity.bits_per_byte(result.nll_sum, result.n_tokens, self.tokens_per_byte),
               "eval_seconds": seconds, "status": "ok", "error": None}
        if not math.isfinite(ppl):
            row.update(status="diverged", error=f"perplexity is {ppl} (NLL sum {result.nll_sum})")
        return row

    def n_windows(self) -> int:
        """Scored windows of the evaluated text: the length of every complete per-window loss array."""
        return len(perplexity.scored_windows(len(self.token_ids), self.setup.max_length, self.setup.stride))

    def row_of_windows(self, removed: Sequence[int], window_nll: list[float], window_tokens: list[int],
                       seconds: float) -> dict:
        """The result row of a variant from its per-window losses (e.g. slices measured apart, joined by a race)."""
        return self._row(removed, perplexity.Perplexity.of_windows(window_nll, window_tokens), seconds)

    def evaluate(self, removed: Sequence[int], window_range: tuple[int, int] | None = None) -> dict:
        """Perplexity and parameters of one variant, as a result row (status ok, diverged or failed), with its
        per-window losses (``window_nll``, ``window_tokens``: of the windows in ``window_range``, default all).

        Out of memory: retried once with half the batch, then recorded as ``failed`` with the error.
        """
        start = time.perf_counter()
        for batch_size in retry_batch_sizes(self.batch_size):
            try:
                if injected_fault("oom", removed, batch_size < self.batch_size):
                    raise torch.OutOfMemoryError("injected by SWEEP_FAULTS")
                with adapters.applied(self.model, removed):
                    result = perplexity.perplexity(self.hidden_fn, self.head_loss, self.token_ids,
                                                   self.setup.max_length, self.setup.stride, batch_size,
                                                   self.device, window_range)
                self._count_plain(removed, window_range, batch_size)
                return self._row(removed, result, time.perf_counter() - start)
            except torch.OutOfMemoryError as exc:
                free_memory(self.device)
                error = f"out of memory at batch size {batch_size}: {str(exc).splitlines()[0]}"
        return {**self._base_row(removed), "status": "failed", "eval_seconds": time.perf_counter() - start,
                "error": error}

    def _count_plain(self, removed: Sequence[int], window_range: tuple[int, int] | None, batch_size: int) -> None:
        """Calls of one per-variant evaluation: per batch, every kept layer and one head call."""
        first, stop = window_range or (0, self.n_windows())
        scored = perplexity.scored_windows(len(self.token_ids), self.setup.max_length, self.setup.stride)
        n_batches = len(perplexity.window_batches(scored[first:stop], batch_size))
        self.calls.add(trie.CallCounts(n_batches * (self.n_layers - len(removed)), n_batches, n_batches))

    def estimate_seconds(self, variants: Sequence[Sequence[int]], shared: bool = True) -> float:
        """Seconds to evaluate ``variants``, extrapolated from timing one batch of windows (takes seconds).

        Cost model: a variant keeping k of L layers costs ``head + k/L * (full - head)`` per batch, where
        ``full`` is the unpruned batch time and ``head`` the time with every layer removed. With prefix sharing the
        layers are counted once per trie node instead, plus one capture forward per batch whose layer outputs
        the unpruned prefix reuses: an exhaustive GPT-2 sweep runs 4,084 + 11 layer calls per batch, not 24,576.
        ``shared=False`` prices each variant alone (an upper bound for a small sub-trie).
        """
        n_batches = math.ceil(len(perplexity.windows(len(self.token_ids), self.setup.max_length, self.setup.stride))
                              / self.batch_size)
        full, head = self._batch_seconds()
        per_layer = max(full - head, 0.0) / max(self.n_layers, 1)
        if shared and self.cfg.engine == "trie" and self.trie_ok and len(variants) > 1:
            variants_trie = trie.build_trie({variant_key(v): self.steps_of(v) for v in variants})
            # nodes + the capture forward, less the unpruned prefix the trie takes from that forward
            layer_calls = (trie.layer_calls(variants_trie) + self.n_layers - 1
                           - trie.unpruned_prefix(variants_trie, self.n_layers))
            return n_batches * (head * len(variants) + per_layer * layer_calls)
        return sum(n_batches * (head + per_layer * variant_steps.n_calls(self.steps_of(v))) for v in variants)

    def _batch_seconds(self) -> tuple[float, float]:
        """Seconds of one batch of windows through the full model and with every layer removed (after a warm-up).

        On CPU one window of at most ``ESTIMATE_POSITIONS`` positions is timed and scaled to the batch's token rows
        (work grows linearly with rows there; the three timings would otherwise cost three batches of a sweep).
        On a GPU, where small inputs do not fill the device, the first batch itself is timed.
        """
        # The first batch of equal-length windows (a shorter last window is never stacked with full ones).
        ids = next(perplexity.scored_batches(self.token_ids, self.setup.max_length, self.setup.stride,
                                             self.batch_size)).input_ids  # (B, T)
        scale = 1.0
        if self.device.type == "cpu" and ids.numel() > ESTIMATE_POSITIONS:
            scale = ids.numel() / min(ids.shape[1], ESTIMATE_POSITIONS)
            ids = ids[:1, :ESTIMATE_POSITIONS]  # (1, t)

        def seconds(removed: Sequence[int]) -> float:
            with adapters.pruned(self.model, removed), torch.no_grad():
                start = time.perf_counter()
                perplexity.window_nll(self.head_loss, self.hidden_fn(ids), ids, ids.shape[1])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return (time.perf_counter() - start) * scale

        seconds([])  # warm-up
        return seconds([]), seconds(range(self.n_layers))

    def evaluate_many(self, removals: Sequence[Sequence[int]],
                      window_range: tuple[int, int] | None = None) -> list[dict]:
        """Result rows of several variants: one prefix-sharing trie pass when possible, else one by one.

        ``window_range``: only these scored windows [first, stop) (racing); default the whole text.
        """
        injected_delay(len(removals))
        for removed in removals:
            if injected_fault("kill", removed):
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a segfault would
            if injected_fault("sticky", removed):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by SWEEP_FAULTS)")
        if self.cfg.engine != "trie" or not self.trie_ok or len(removals) == 1:
            return [self.evaluate(r, window_range) for r in removals]
        kept = {variant_key(r): self.steps_of(r) for r in removals}
        start = time.perf_counter()
        for batch_size in retry_batch_sizes(self.batch_size):
            try:
                if any(injected_fault("oom", r, batch_size < self.batch_size, once=False) for r in removals):
                    raise torch.OutOfMemoryError("injected by SWEEP_FAULTS")
                results = trie.trie_perplexities(self.model, kept, self.head_loss, self.token_ids,
                                                 self.setup.max_length, self.setup.stride, batch_size,
                                                 window_range, self.calls, self.captures)
                seconds = (time.perf_counter() - start) / len(removals)
                return [self._row(r, results[variant_key(r)], seconds) for r in removals]
            except torch.OutOfMemoryError:
                self.captures.clear()
                free_memory(self.device)
        return [self.evaluate(r, window_range) for r in removals]  # the trie's cache did not fit: one at a time

    # ------------------------------------------------------------------------------------------ latency

    def signature(self, removed: Sequence) -> str:
        if variant_steps.is_block_variant(removed):
            return adapters.shape_signature(self.model, kept_layers(removed, self.n_layers))
        return adapters.shape_signature(self.model, self.steps_of(removed))

    def measure_latency(self, representatives: dict[str, Sequence[int]], progress=None,
                        should_stop=lambda: False, timer: latency.Timer | None = None) -> dict[str, dict]:
        """Latency columns of one variant per shape signature (:func:`latency.measure_latency`, interleaved)."""
        with latency.cpu_threads(self.device, self.cfg.latency_threads):
            return latency.measure_latency(self.model, representatives, seq=self.cfg.latency_seq,
                                           decode_tokens=self.cfg.decode_tokens, repeats=latency_repeats(self.cfg),
                                           seed=self.cfg.seed, timer=timer, progress=progress,
                                           should_stop=should_stop)


def latency_repeats(cfg: SweepConfig) -> latency.Repeats:
    """The repeat rule of ``cfg``'s latency flags."""
    return latency.Repeats(min_repeats=cfg.latency_repeats, max_repeats=cfg.latency_max_repeats,
                           precision=cfg.latency_precision, budget_s=cfg.latency_budget, warmup=cfg.latency_warmup)


ESTIMATE_POSITIONS = 256
"""Positions of the one window the CPU time estimate runs (see :meth:`Worker._batch_seconds`)."""


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer's ``forward`` in place (``--compile-layers``): the trie and the
    per-variant engine call the same modules, so both run compiled layers; the module call, and with it the
    trie's capture hooks, stays eager. Equal to eager up to float rounding (tested)."""
    for layer in adapters.decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=False)


def load_worker(cfg: SweepConfig) -> Worker:
    """Load model, tokenizer and tokens for ``cfg`` (cheap checks first, weights last).

    Raises:
        ModelLoadError, ArchitectureError, DataError, ConfigError.
    """
    windows = resolve_windows(cfg, models.config_for(cfg))
    tokens = load_tokens(cfg, models.tokenizer_for(cfg), windows)
    return Worker(models.model_for(cfg), tokens, windows, cfg)

"""One device's work: hold a loaded model and its evaluation tokens, evaluate variants without reloading.

A worker knows nothing about the database or the plan: it turns a removal into a result row (a dict with the
columns of ``store.RESULT_COLUMNS``), and measurement failures (out of memory, NaN) into rows with a status.
"""
from __future__ import annotations

import gc
import math
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sweep import measure, models
from sweep.measure import STICKY_ERRORS, is_sticky_error  # noqa: F401 - part of the worker's interface
from sweep.config import CPU_BATCH_SIZE, SweepConfig
from sweep.data import TokenizedText, describe, load_text, tokenize
from sweep.errors import ConfigError, DataError
from sweep.plan import kept_layers, variant_key


@dataclass(frozen=True)
class EvalSetup:
    """The resolved evaluation windows (defaults filled in from the model)."""

    max_length: int
    stride: int
    max_tokens: int | None


def model_context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_windows(cfg: SweepConfig, model_config) -> EvalSetup:
    """Fill in max_length (min(context, 1024)) and stride (= max_length), and check them against the model.

    Raises:
        ConfigError: max-length beyond the model's context, or stride larger than max-length.
    """
    context = model_context(model_config)
    max_length = cfg.max_length or min(context or 1024, 1024)
    if context and max_length > context:
        raise ConfigError(f"`--max-length` {max_length} exceeds the model's context of {context} tokens")
    stride = cfg.stride or max_length
    if stride > max_length:
        raise ConfigError(f"`--stride` ({stride}) is larger than `--max-length` ({max_length}): tokens would be skipped")
    return EvalSetup(max_length, stride, cfg.max_tokens)


def load_tokens(cfg: SweepConfig, tokenizer, setup: EvalSetup) -> TokenizedText:
    """Load, tokenize (cached) and check that the text fills at least one window.

    Raises:
        DataError: empty text or fewer tokens than one window.
    """
    name = describe(cfg.data, cfg.data_config, cfg.split)
    text = load_text(cfg.data, cfg.data_config, cfg.split, cfg.text_column)
    tokens = tokenize(text, tokenizer, name, cfg.cache_dir)
    n_eval = min(len(tokens.ids), setup.max_tokens or len(tokens.ids))
    if n_eval < setup.max_length:
        limit = " (capped by --max-tokens)" if setup.max_tokens and setup.max_tokens < len(tokens.ids) else ""
        raise DataError(f"--data {cfg.data}: {n_eval:,} tokens{limit}, fewer than one window of "
                        f"--max-length {setup.max_length}; lower --max-length or give more text")
    return tokens


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


class Worker:
    """A model on one device plus the tokens to evaluate it on."""

    def __init__(self, model: nn.Module, tokens: TokenizedText, setup: EvalSetup, cfg: SweepConfig):
        self.model = model
        self.tokens = tokens
        self.cfg = cfg
        self.setup = setup
        self.device = next(model.parameters()).device
        n_eval = min(len(tokens.ids), setup.max_tokens or len(tokens.ids))
        self.token_ids = torch.as_tensor(tokens.ids[:n_eval]).to(self.device)  # (N,) moved once
        # Bytes covered by the evaluated tokens, pro rata when --max-tokens cuts the text.
        self.tokens_per_byte = len(tokens.ids) / tokens.n_bytes
        self.n_layers = models.n_layers_of(model.config)
        self.layer_params = models.layer_params(model)
        self.total_params = models.total_params(model)
        self.embedding_params = models.embedding_params(model)
        self.hidden_fn, self.logits_fn, self.split_head = self._split_head()
        self.trie_ok = self.split_head and self._trie_reproduces_backbone()
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda")
        self.head_loss = measure.HeadLoss(self.logits_fn, compiled=use_compile)
        self.batch_size = cfg.batch_size or self._auto_batch_size()
        self.host = socket.gethostname()
        self.device_name = device_name(self.device)

    # ------------------------------------------------------------------------------------------ head

    def _auto_batch_size(self) -> int:
        """Windows per batch from free GPU memory (``--batch-size 0``); CPU_BATCH_SIZE on CPU.

        One window of the full model is run and its peak memory above the resident weights measured (activations,
        attention mask, a head chunk's logits); the trie adds one residual stream (1, T, H) per depth, up to L + 1
        of them. Both grow linearly with the batch, so the batch is free memory / per-window cost
        (:func:`measure.batch_size_for`).
        """
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        length = min(self.setup.max_length, len(self.token_ids))
        probe = self.token_ids[:length][None]  # (1, T)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        resident = torch.cuda.memory_allocated(self.device)
        with torch.no_grad():
            hidden = self.hidden_fn(probe)  # (1, T, H)
            measure.window_nll(self.head_loss, hidden, probe, length)
        transient = torch.cuda.max_memory_allocated(self.device) - resident
        depth = self.n_layers + 1 if self.trie_ok and self.cfg.engine == "trie" else 1
        per_window = transient + depth * hidden.numel() * hidden.element_size()
        del hidden
        free, _ = torch.cuda.mem_get_info(self.device)
        n_windows = len(measure.windows(len(self.token_ids), self.setup.max_length, self.setup.stride))
        return measure.batch_size_for(free, per_window, n_windows)

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
                calls = models.capture_layer_calls(self.model, probe)
                finish = models.final_norm_fn(self.model)
                for removed in checks:
                    hidden = calls.hidden
                    for i in kept_layers(removed, self.n_layers):
                        before = hidden.clone()
                        hidden_in, hidden = hidden, models.call_layer(self.model, i, hidden, calls)
                        # The trie feeds one stream to several children: a layer that writes into its input
                        # would corrupt its siblings' input.
                        if not torch.equal(hidden_in, before):
                            return False
                    got = finish(hidden).float()
                    with models.pruned(self.model, removed):
                        want = self.hidden_fn(probe).float()
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
                        return False
        except Exception:  # an architecture whose layers cannot be replayed: use the per-variant engine
            return False
        return True

    # ------------------------------------------------------------------------------------------ variants

    def params_of(self, removed: Sequence[int]) -> tuple[int, int]:
        """(total, non-embedding) parameters of a variant: exact, without building it."""
        total = self.total_params - sum(self.layer_params[i] for i in removed)
        return total, total - self.embedding_params

    def _base_row(self, removed: Sequence[int]) -> dict:
        total, non_embedding = self.params_of(removed)
        kept = kept_layers(removed, self.n_layers)
        return {"removed": variant_key(removed), "n_removed": len(removed), "n_layers": len(kept),
                "kept_layers": variant_key(kept), "params": total, "params_non_embedding": non_embedding,
                "device": self.device_name, "host": self.host}

    def failed_row(self, removed: Sequence[int], error: str) -> dict:
        """A ``failed`` result row for a variant whose measurement could not finish (the error says why)."""
        return {**self._base_row(removed), "status": "failed", "error": error}

    def release_device(self) -> None:
        """Move the model off the GPU (the coordinator's copy, once worker processes take over the GPUs)."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            _free_memory(self.device)

    def _row(self, removed: Sequence[int], result: measure.Perplexity, seconds: float) -> dict:
        """A result row from a perplexity; NaN or inf perplexity makes it ``diverged``."""
        if injected_fault("nan", removed):
            result = measure.Perplexity(nll_sum=math.nan, n_tokens=result.n_tokens)
        ppl = result.ppl
        row = {**self._base_row(removed), "nll_sum": result.nll_sum, "n_tokens": result.n_tokens,
               "n_bytes": round(len(self.token_ids) / self.tokens_per_byte), "ppl": ppl,
               "bpb": measure.bits_per_byte(result.nll_sum, result.n_tokens, self.tokens_per_byte),
               "eval_seconds": seconds, "status": "ok", "error": None}
        if not math.isfinite(ppl):
            row.update(status="diverged", error=f"perplexity is {ppl} (NLL sum {result.nll_sum})")
        return row

    def evaluate(self, removed: Sequence[int]) -> dict:
        """Perplexity and parameters of one variant, as a result row (status ok, diverged or failed).

        Out of memory: retried once with half the batch, then recorded as ``failed`` with the error.
        """
        start = time.perf_counter()
        for batch_size in _retry_batch_sizes(self.batch_size):
            try:
                if injected_fault("oom", removed, batch_size < self.batch_size):
                    raise torch.OutOfMemoryError("injected by SWEEP_FAULTS")
                with models.pruned(self.model, removed):
                    result = measure.perplexity(self.hidden_fn, self.head_loss, self.token_ids,
                                                self.setup.max_length, self.setup.stride, batch_size, self.device)
                return self._row(removed, result, time.perf_counter() - start)
            except torch.OutOfMemoryError as exc:
                _free_memory(self.device)
                error = f"out of memory at batch size {batch_size}: {str(exc).splitlines()[0]}"
        return {**self._base_row(removed), "status": "failed", "eval_seconds": time.perf_counter() - start,
                "error": error}

    def estimate_seconds(self, variants: Sequence[Sequence[int]], shared: bool = True) -> float:
        """Seconds to evaluate ``variants``, extrapolated from timing one batch of windows (takes seconds).

        Cost model: a variant keeping k of L layers costs ``head + k/L * (full - head)`` per batch, where
        ``full`` is the unpruned batch time and ``head`` the time with every layer removed. With prefix sharing the
        layers are counted once per trie node instead (plus one capture forward per batch): an exhaustive GPT-2
        sweep runs 4,095 layer calls per batch, not 24,576. ``shared=False`` prices each variant alone (an upper
        bound for a small sub-trie).
        """
        n_batches = math.ceil(len(measure.windows(len(self.token_ids), self.setup.max_length, self.setup.stride))
                              / self.batch_size)
        full, head = self._batch_seconds()
        per_layer = max(full - head, 0.0) / max(self.n_layers, 1)
        if shared and self.cfg.engine == "trie" and self.trie_ok and len(variants) > 1:
            from sweep import prefix

            trie = prefix.build_trie({variant_key(v): kept_layers(v, self.n_layers) for v in variants})
            layer_calls = prefix.layer_calls(trie) + self.n_layers - 1  # nodes + the capture forward
            return n_batches * (head * len(variants) + per_layer * layer_calls)
        return sum(n_batches * (head + per_layer * (self.n_layers - len(v))) for v in variants)

    def _batch_seconds(self) -> tuple[float, float]:
        """Seconds of one batch of windows through the full model and with every layer removed (after a warm-up)."""
        sample = measure.windows(len(self.token_ids), self.setup.max_length, self.setup.stride)[: self.batch_size]
        length = sample[0].end - sample[0].begin
        ids = torch.stack([self.token_ids[w.begin : w.begin + length] for w in sample])  # (B, T)

        def seconds(removed: Sequence[int]) -> float:
            with models.pruned(self.model, removed), torch.no_grad():
                start = time.perf_counter()
                measure.window_nll(self.head_loss, self.hidden_fn(ids), ids, ids.shape[1])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return time.perf_counter() - start

        seconds([])  # warm-up
        return seconds([]), seconds(range(self.n_layers))

    def evaluate_many(self, removals: Sequence[Sequence[int]]) -> list[dict]:
        """Result rows of several variants: one prefix-sharing trie pass when possible, else one by one."""
        _injected_delay(len(removals))
        for removed in removals:
            if injected_fault("kill", removed):
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a segfault would
            if injected_fault("sticky", removed):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by SWEEP_FAULTS)")
        if self.cfg.engine != "trie" or not self.trie_ok or len(removals) == 1:
            return [self.evaluate(r) for r in removals]
        from sweep import prefix

        kept = {variant_key(r): kept_layers(r, self.n_layers) for r in removals}
        start = time.perf_counter()
        for batch_size in _retry_batch_sizes(self.batch_size):
            try:
                if any(injected_fault("oom", r, batch_size < self.batch_size, once=False) for r in removals):
                    raise torch.OutOfMemoryError("injected by SWEEP_FAULTS")
                results = prefix.trie_perplexities(self.model, kept, self.head_loss, self.token_ids,
                                                   self.setup.max_length, self.setup.stride, batch_size)
                seconds = (time.perf_counter() - start) / len(removals)
                return [self._row(r, results[variant_key(r)], seconds) for r in removals]
            except torch.OutOfMemoryError:
                _free_memory(self.device)
        return [self.evaluate(r) for r in removals]  # the trie's cache did not fit: one variant at a time

    # ------------------------------------------------------------------------------------------ latency

    def signature(self, removed: Sequence[int]) -> str:
        return models.shape_signature(self.model, kept_layers(removed, self.n_layers))

    def measure_latency(self, representatives: dict[str, Sequence[int]], progress=None,
                        should_stop=lambda: False) -> dict[str, dict]:
        """Prefill and decode latency of one variant per signature, with repeats interleaved across variants.

        Interleaving (repeat r of every variant before repeat r+1 of any) spreads thermal or background drift
        evenly, so it favours no variant. Returns signature -> latency columns of a result row, or nothing
        when ``should_stop()`` turns true between rounds (Ctrl-C).
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        prompt = torch.randint(0, vocab, (1, cfg.latency_seq), generator=gen).to(self.device)  # (1, T)
        samples = {sig: {"prefill": [], "decode": []} for sig in representatives}
        failed: dict[str, str] = {}
        rounds = cfg.latency_warmup + cfg.latency_repeats
        for round_idx in range(rounds):
            if should_stop():
                return {}
            for sig, removed in representatives.items():
                if sig in failed:
                    continue
                try:
                    prefill_ms, decode_ms = self._time_variant(removed, prompt)
                except Exception as exc:  # a latency failure is data: perplexity is still measured
                    _free_memory(self.device)
                    failed[sig] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    continue
                if round_idx >= cfg.latency_warmup:
                    samples[sig]["prefill"].append(prefill_ms)
                    samples[sig]["decode"].append(decode_ms)
            if progress is not None:
                progress(round_idx + 1, rounds)
        return {sig: ({"latency_error": failed[sig]} if sig in failed
                      else _latency_columns(s, variant_key(representatives[sig]))) for sig, s in samples.items()}

    def _time_variant(self, removed: Sequence[int], prompt: torch.Tensor) -> tuple[float, float]:
        """One prefill and (if asked) one decode timing of a variant, in ms and ms per token."""
        with models.pruned(self.model, removed):
            prefill_ms = measure.time_once(measure.prefill_call(self.model, prompt), self.device)
            decode_ms = math.nan
            if self.cfg.decode_tokens:
                decode_ms = measure.time_decode(self.model, prompt, self.cfg.decode_tokens, self.device)
        return prefill_ms, decode_ms


def _latency_columns(samples: dict[str, list[float]], source_key: str) -> dict:
    prefill = measure.summarize(samples["prefill"])
    columns = {"prefill_ms": prefill.median_ms, "prefill_iqr_ms": prefill.iqr_ms, "prefill_repeats": prefill.repeats,
               "decode_ms_per_token": None, "decode_iqr_ms": None, "latency_from": source_key}
    if samples["decode"] and all(math.isfinite(x) for x in samples["decode"]):
        decode = measure.summarize(samples["decode"])
        columns.update(decode_ms_per_token=decode.median_ms, decode_iqr_ms=decode.iqr_ms)
    return columns


def _retry_batch_sizes(batch_size: int) -> list[int]:
    """The configured batch size, then half of it once (when that is smaller)."""
    return [batch_size] + ([batch_size // 2] if batch_size > 1 else [])


def _free_memory(device: torch.device) -> None:
    """Return freed GPU memory to the device. Collect first: a compiled head holds its module in a reference
    cycle (torch.compile keeps the bound method), which only the cycle collector frees."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def load_worker(cfg: SweepConfig) -> Worker:
    """Load model, tokenizer and tokens for ``cfg`` (cheap checks first, weights last).

    Raises:
        ModelLoadError, ArchitectureError, DataError, ConfigError.
    """
    model_config = models.load_config(cfg.model, cfg.revision, cfg.trust_remote_code)
    setup = resolve_windows(cfg, model_config)
    tokens = load_tokens(cfg, load_tokenizer(cfg), setup)
    model = models.load_model(cfg.model, cfg.revision, cfg.dtype, cfg.device, cfg.random_init, cfg.trust_remote_code)
    return Worker(model, tokens, setup, cfg)


def load_tokenizer(cfg: SweepConfig):
    """The --tokenizer if given, else the one saved with the model."""
    if cfg.tokenizer:
        return models.load_tokenizer(cfg.tokenizer, None, cfg.trust_remote_code)
    return models.load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code)


# ---------------------------------------------------------------------------------------------- fault injection

FAULTS_ENV = "SWEEP_FAULTS"
"""TEST-ONLY fault injection, read here and nowhere else; unset in normal use (then every check is a dict lookup).

``SWEEP_FAULTS="oom=1|2,3;nan=0;kill-once=4;sticky=5"``: ``KIND=KEYS`` pairs separated by ``;``, variant keys
separated by ``|`` (``baseline`` for the unpruned model). Kinds:

- ``oom``: evaluating the variant raises ``torch.OutOfMemoryError`` at every batch size (-> ``failed`` row);
  ``oom-retry``: only at the configured batch size (the half-batch retry succeeds);
- ``nan``: the variant's NLL becomes NaN (-> ``diverged`` row);
- ``kill``: the process evaluating a chunk with the variant kills itself with SIGKILL;
- ``sticky``: the chunk raises a CUDA "illegal memory access" error (a sticky error that poisons the process);
- ``delay=SECONDS``: every variant takes this much longer (gives fault tests time to strike mid-sweep).

A ``-once`` suffix (``kill-once``) fires only the first time across all processes, using marker files in
``$SWEEP_FAULTS_DIR`` (required then).
"""


def _parse_faults(spec: str) -> dict[str, set[str]]:
    faults: dict[str, set[str]] = {}
    for part in filter(None, spec.split(";")):
        kind, _, keys = part.partition("=")
        faults[kind.strip()] = {"" if k == "baseline" else k.strip() for k in keys.split("|")}
    return faults


def injected_fault(kind: str, removed: Sequence[int], retrying: bool = False, once: bool = True) -> bool:
    """Whether ``$SWEEP_FAULTS`` asks for a fault of ``kind`` on this variant now (see ``FAULTS_ENV``).

    ``retrying`` (oom only): this is the half-batch retry, which ``oom-retry`` lets succeed. ``once=False``
    checks without consuming a ``-once`` marker.
    """
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return False
    faults, key = _parse_faults(spec), variant_key(removed)
    if key in faults.get(kind, ()) or (kind == "oom" and not retrying and key in faults.get("oom-retry", ())):
        return True
    if key not in faults.get(f"{kind}-once", ()):
        return False
    marker = os.path.join(os.environ["SWEEP_FAULTS_DIR"], f"{kind}-once-{key or 'baseline'}")
    if not once:
        return not os.path.exists(marker)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _injected_delay(n_variants: int) -> None:
    spec = os.environ.get(FAULTS_ENV)
    delay = _parse_faults(spec).get("delay") if spec else None
    if delay:
        time.sleep(float(next(iter(delay))) * n_variants)

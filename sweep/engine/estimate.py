"""How long a `sweep run` will take, priced by what this machine measures (what `sweep plan` prints).

A run's wall time is start-up + perplexity + latency, each counted in the units the engine runs:

- **perplexity**: per batch of windows, decoder layer calls x the batch's positions and LM head calls x its scored
  rows (what :class:`~sweep.engine.trie.CallCounts` counts), chunk by chunk as the runner cuts the plan: each chunk
  is its own sub-trie; the first pays the capture forward (L - 1 layers, less the unpruned prefix it reuses), and
  the later ones too unless the worker keeps every batch's capture (:func:`sweep.engine.trie.keeps_captures`: on
  CPU, when they fit its budget);
- **latency**: rounds x the prefill and decode of one variant per shape signature, from ``--latency-repeats``
  rounds (every median settled) to the ``--latency-budget`` (never settled);
- **start-up**: a new process's imports, building (or loading) the model, the worker's checks and first timing;
- **calibration**: what the signal strategies spend on the calibration text before their choices are measured
  (:class:`CalibrationWork`): one pass for angular and Block Influence, greedy's rounds (each a trie of its
  candidates), and the search's budget (an upper bound: a search that converges stops before it).

The prices come from a **probe** of 1-3 s: one decoder layer and the LM head of the same config, built
with random weights (speed does not depend on weight values; no checkpoint is read), timed on a window of the
plan's length. Where results.db holds chunks of the same shape that this host measured (same model, dtype, window
and device: :func:`sweep.store.throughput.measured_chunks`), their measured seconds against what the probe prices
them at calibrate the perplexity price, and the estimate is one figure; from the probe alone it is a range.

Example, the issue's case (8 x 64 GPT-2, 4,096 tokens, T = 256, exhaustive): after `--strategy single` measured 9
variants at 1.4 s each, the old estimate multiplied that by the 247 variants to go (5 min 53 s); a variant of the
exhaustive trie runs about one layer, not seven, so its chunks are priced at their layer and head calls instead.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from sweep import steps as variant_steps
from sweep.config import SweepConfig
from sweep.engine import adapters, latency, perplexity, trie
from sweep.engine.models import resolve_device, resolve_dtype
from sweep.engine.runner import FIRST_CHUNK, PER_VARIANT_GROUP, next_chunk_size, trie_order
from sweep.engine.worker import ESTIMATE_POSITIONS, latency_repeats
from sweep.plan import format_duration, parse_key
from sweep.store.throughput import MeasuredChunk


PROBE_SPREAD = 0.3
"""Relative half-width of a probe-only range: one probe of a shared machine sees its load of that second."""

PROBE_POSITIONS = 1024
"""At most this many positions of a window are run through the probe's layer (longer windows scaled linearly)."""

PROBE_MACS = 1e10
"""Multiply-adds one timed probe call may take (about 0.1 s on the 2-core VM's AVX-512 cores when idle)."""

PROBE_HEAD_ROWS = 256
"""Rows the head probe times at least."""

BUILD_PER_NORMAL = 5.0
"""Building a random-init model costs about this many times filling its parameters with ``normal_`` (measured:
DistilGPT-2, 82 M parameters, 5.6 s against 1.05 s, on the shared 2-core VM)."""


@dataclass(frozen=True)
class Geometry:
    """The batches a run feeds the model: what perplexity prices multiply."""

    batches: int
    positions: int
    """Window positions of all batches (B x T summed): what one layer call over the whole text sees."""
    rows: int
    """Scored rows of all batches: what one head call over the whole text sees."""
    window: int
    """Tokens of the first (longest) window."""


def geometry(n_tokens: int, max_length: int, stride: int, batch_size: int) -> Geometry:
    """The batches of :func:`perplexity.scored_batches` over ``n_tokens`` tokens, counted without tokens."""
    groups = perplexity.window_batches(perplexity.scored_windows(n_tokens, max_length, stride), batch_size)
    positions = rows = 0
    for group in groups:
        length = group[0].end - group[0].begin
        positions += len(group) * length
        rows += len(group) * (length - max(1, length - group[0].n_targets))  # as perplexity.window_nll scores
    first = groups[0][0] if groups else None
    return Geometry(len(groups), positions, rows, first.end - first.begin if first else 0)


@dataclass(frozen=True)
class Prices:
    """Seconds per unit of work of one shape on this machine."""

    layer_s: float
    """One decoder layer call, per window position."""
    head_s: float
    """Final norm + LM head + loss, per scored row."""
    forward_s: float
    """A forward's embeddings and final norm, per position (the capture forward, each per-variant forward)."""
    prefill_s: tuple[float, float]
    """Batch-1 prefill of ``--latency-seq`` tokens: (without layers, per layer call)."""
    decode_s: tuple[float, float]
    """One greedy decode step: (without layers, per layer call)."""
    build_s: float
    """Building or loading the whole model (and importing its class)."""
    probe_s: float = 0.0
    """How long the probe took."""


# ---------------------------------------------------------------------------------------------- work


def sub_trie_calls(steps: Sequence[variant_steps.Steps], n_layers: int, captured: bool = False) -> tuple[int, int]:
    """(layer calls, head calls) of one batch of a chunk evaluated as one trie, as ``trie.trie_perplexities``
    counts them: the capture forward's L - 1 layers (none when an earlier pass's capture is kept: ``captured``),
    the trie's nodes less the unpruned prefix that forward computed, and one head call per distinct step
    sequence."""
    root = trie.build_trie({str(i): s for i, s in enumerate(steps)})
    layers = (0 if captured else n_layers - 1) + trie.layer_calls(root) - trie.unpruned_prefix(root, n_layers)
    return layers, len(set(steps))


def chunk_seconds(steps: Sequence[variant_steps.Steps], n_layers: int, geo: Geometry, prices: Prices,
                  captured: bool = False) -> float:
    """Seconds of one chunk over the whole text: a sub-trie (with ``captured``, one whose capture forward an
    earlier pass kept), or a lone variant (which the worker evaluates on its own, with a plain forward)."""
    if len(steps) == 1:
        layers, heads, forward = variant_steps.n_calls(steps[0]), 1, prices.forward_s
    else:
        layers, heads = sub_trie_calls(steps, n_layers, captured)
        forward = 0.0 if captured else prices.forward_s
    return geo.positions * (forward + layers * prices.layer_s) + geo.rows * heads * prices.head_s


def perplexity_seconds(todo: Sequence, n_layers: int, geo: Geometry, prices: Prices, shared: bool,
                       keeps_captures: bool = False, captured: bool = False) -> float:
    """Seconds of the perplexity phase: ``todo`` cut into chunks as the runner cuts it (trie order, a first chunk
    of :data:`FIRST_CHUNK`, then chunks of about ``CHUNK_SECONDS`` at the price of the last one), each priced by
    :func:`chunk_seconds`; one variant at a time without prefix sharing (``shared`` False). With
    ``keeps_captures`` the worker keeps the capture of its first trie pass (``captured``: one is kept already)."""
    def steps_of(removed) -> variant_steps.Steps:
        return variant_steps.steps_of(removed, n_layers)

    if not shared:
        return sum(chunk_seconds([steps_of(r)], n_layers, geo, prices) for r in todo)
    order = trie_order(list(todo), SimpleNamespace(steps_of=steps_of))
    total, first, size = 0.0, 0, FIRST_CHUNK
    while first < len(order):
        chunk = order[first : first + size]
        seconds = chunk_seconds([steps_of(r) for r in chunk], n_layers, geo, prices, captured)
        captured = captured or (keeps_captures and len(chunk) > 1)
        total += seconds
        first += len(chunk)
        size = next_chunk_size([{"eval_seconds": seconds / len(chunk)}], size)
    return total


def calibration(chunks: Sequence[MeasuredChunk], n_layers: int, max_length: int, stride: int, batch_size: int,
                prices: Prices, keeps_captures: Callable[[Geometry], bool] = lambda geo: False) -> float | None:
    """Measured over probe-priced seconds of earlier chunks of the same shape (None without any): the factor
    that turns this probe's perplexity prices into this machine's measured ones. Where ``keeps_captures`` of a
    chunk's geometry holds, the first trie chunk of each text length is priced with its capture forward and the
    later ones without (as if they had run in one process: the store does not say which run was first)."""
    measured = priced = 0.0
    captured: set[int] = set()
    for chunk in chunks:
        geo = geometry(chunk.n_tokens, max_length, stride, batch_size)
        steps = [variant_steps.steps_of(parse_key(key), n_layers) for key in chunk.keys]
        measured += chunk.seconds
        priced += chunk_seconds(steps, n_layers, geo, prices, chunk.n_tokens in captured)
        if keeps_captures(geo) and len(steps) > 1:
            captured.add(chunk.n_tokens)
    return measured / priced if measured > 0 and priced > 0 else None


# ---------------------------------------------------------------------------------------------- latency


def signature_calls(todo: Sequence, done: Sequence, n_layers: int, layer_kinds: Sequence[str] | None,
                    per_variant: bool) -> list[int]:
    """Layer calls of each shape signature the latency phase of ``todo`` times (those of ``done`` variants are
    stored already). A signature is the kinds of the layers called and which branches run, as
    ``adapters.shape_signature`` tells them apart on a model whose layers differ only by ``layer_types``."""
    def signature(removed) -> tuple:
        calls = [m for s in variant_steps.steps_of(removed, n_layers) for m in variant_steps.members(s)]
        return tuple((layer_kinds[m.layer] if layer_kinds else "", m.branches) for m in calls)

    if per_variant:
        return [len(signature(r)) for r in todo]
    known = {signature(r) for r in done}
    wanted = {signature(r) for r in todo} - known
    return [len(s) for s in wanted]


def latency_seconds(calls: Sequence[int], cfg: SweepConfig, prices: Prices, rounds: int | None = None,
                    on_gpu: bool = False) -> tuple[float, float, float]:
    """(least, expected, most) seconds of the latency phase for signatures of ``calls`` layer calls each.

    A round times every signature once (prefill + ``--decode-tokens`` steps), after ``--latency-warmup`` rounds
    decoding 2 tokens. The phase ends once every median has settled (at least ``--latency-repeats`` rounds: the
    least), or when the next round would end past ``--latency-budget`` (the most). Expected: ``rounds`` when an
    earlier phase of this shape says how many it took; else the most on a CPU, where batch-1 timings of a shared
    machine rarely settle within 3 % (both `make bench` shapes ran to the budget), and the least on a GPU.
    With ``--latency per-variant`` each group of ``PER_VARIANT_GROUP`` variants is a phase of its own.
    """
    if cfg.latency == "off" or not calls:
        return 0.0, 0.0, 0.0
    if cfg.latency == "per-variant" and len(calls) > PER_VARIANT_GROUP:
        groups = [calls[i : i + PER_VARIANT_GROUP] for i in range(0, len(calls), PER_VARIANT_GROUP)]
        parts = [latency_seconds(g, cfg, prices, rounds, on_gpu) for g in groups]
        return tuple(sum(p[i] for p in parts) for i in range(3))  # type: ignore[return-value]
    repeats = latency_repeats(cfg)

    def round_seconds(n_decode: int) -> float:  # every signature once: prefill + n_decode steps, k layer calls
        (prefill, per_layer), (step, step_per_layer) = prices.prefill_s, prices.decode_s
        return sum(prefill + k * per_layer + n_decode * (step + k * step_per_layer) for k in calls)

    warm = repeats.warmup * round_seconds(min(cfg.decode_tokens, latency.WARMUP_DECODE_TOKENS))
    timed = round_seconds(cfg.decode_tokens)
    least = warm + repeats.min_repeats * timed
    elapsed, n = warm, 0
    while n < repeats.max_repeats:  # as latency.measure_latency stops: the next round would end past the budget
        elapsed, n = elapsed + timed, n + 1
        if n >= repeats.min_repeats and elapsed + timed > repeats.budget_s:
            break
    most = max(least, elapsed)
    if rounds is not None:
        expected = min(max(warm + rounds * timed, least), most)
    else:
        expected = least if on_gpu else most
    return least, expected, most


# ---------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    """A run's expected wall time and the range it lies in, by phase."""

    startup_s: float
    perplexity_s: float
    latency_s: tuple[float, float, float]
    """(least, expected, most) of the latency phase."""
    calibrated: bool
    """The perplexity price comes from earlier measurements of this shape (else from the probe alone)."""
    calibrated_on: int = 0
    """Variants of the earlier measurements it was calibrated on."""
    imports_counted: bool = True
    probe_s: float = 0.0
    calibration_s: float = 0.0
    """The signal strategies' work on the calibration text (:class:`CalibrationWork`)."""
    search_s: float = 0.0
    """The search's share of :attr:`calibration_s` at its whole budget: the most it can take."""

    @property
    def seconds(self) -> float:
        return self.startup_s + self.perplexity_s + self.calibration_s + self.latency_s[1]

    @property
    def low_s(self) -> float:
        spread = 0.0 if self.calibrated else PROBE_SPREAD
        return (self.startup_s + self.perplexity_s + self.calibration_s - self.search_s) * (1 - spread) \
            + self.latency_s[0]

    @property
    def high_s(self) -> float:
        spread = 0.0 if self.calibrated else PROBE_SPREAD
        return (self.startup_s + self.perplexity_s + self.calibration_s) * (1 + spread) + self.latency_s[2]

    def line(self, n_todo: int) -> str:
        """``estimate: about 1 min 40 s for 247 variants (start-up 8.1 s, perplexity 1 min 12 s, latency 20.0 s)...``"""
        low, high = self.low_s, self.high_s
        around = f"about {format_duration(self.seconds)}"
        if high - low > 0.1 * self.seconds:
            around = f"{format_duration(low)} - {format_duration(high)}, most likely {format_duration(self.seconds)}"
        least, expected, most = self.latency_s
        latency_text = format_duration(expected) if most - least <= 0.1 * max(expected, 1e-9) else \
            f"{format_duration(least)} - {format_duration(most)}, likely {format_duration(expected)}"
        startup = f"start-up {format_duration(self.startup_s)}" + ("" if self.imports_counted else " + imports")
        if self.calibration_s:
            startup += f", calibration {format_duration(self.calibration_s)}" + (
                f" (the search at most {format_duration(self.search_s)})" if self.search_s else "")
        source = (f"perplexity priced on {self.calibrated_on:,} variants of this shape measured earlier here"
                  if self.calibrated else f"priced by a {format_duration(self.probe_s)} probe of one layer and the "
                                          "head; no earlier measurement of this shape on this host")
        return (f"estimate: {around} for {n_todo:,} variants ({startup}, perplexity "
                f"{format_duration(self.perplexity_s)}, latency {latency_text}); {source}")


# ---------------------------------------------------------------------------------------------- the probe


def probe_prices(cfg: SweepConfig, model_config, token_ids: torch.Tensor, geo: Geometry, batch_size: int) -> Prices:
    """Time one decoder layer, the head and the latency calls of a 1-layer random-init model of ``model_config``.

    Calls are timed at the sizes the run makes them (a batch of windows through a layer, up to ``HEAD_ROWS`` rows
    through the head: small calls cost more per row), scaled down to about :data:`PROBE_MACS` multiply-adds each
    (at least one window, :data:`PROBE_HEAD_ROWS` rows) and priced per position and per row; on CPU the work
    grows linearly with rows beyond that.
    """
    device = resolve_device(cfg.device)
    model, class_s, build_s = _probe_model(cfg, model_config, device, resolve_dtype(cfg.dtype, device))
    started = time.perf_counter()
    hidden_size, vocab = model.get_output_embeddings().weight.shape[1], model.get_output_embeddings().weight.shape[0]
    length = min(geo.window, PROBE_POSITIONS, len(token_ids))
    layer_macs = 12 * hidden_size**2 + 2 * length * hidden_size  # per position: projections, MLP, attention
    n_windows = max(1, min(batch_size, len(token_ids) // length, int(PROBE_MACS // (layer_macs * length))))
    ids = token_ids[: n_windows * length].to(device).view(n_windows, length)  # (b, T)
    run_rows = min(batch_size * (geo.window - 1), perplexity.HEAD_ROWS)  # rows of one head call in the run
    rows = max(PROBE_HEAD_ROWS, min(run_rows, int(PROBE_MACS // (hidden_size * vocab))))
    backbone, finish, head_loss = model.base_model, adapters.final_norm_fn(model), _probe_head(cfg, model, device)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    def forward() -> torch.Tensor:
        return backbone(input_ids=ids, use_cache=False).last_hidden_state  # (b, T, H)

    with torch.no_grad():
        with_layer = _typical_seconds(forward, device)
        with adapters.pruned(model, [0]):
            without = _typical_seconds(forward, device)
        states = forward().reshape(-1, hidden_size).repeat(math.ceil(rows / ids.numel()), 1)[:rows]  # (rows, H)
        head = _typical_seconds(lambda: head_loss(finish(states), labels), device)
    prefill_s, decode_s = _latency_prices(cfg, model, device)
    return Prices(layer_s=max(with_layer - without, 0.0) / ids.numel(), head_s=head / rows,
                  forward_s=without / ids.numel(), prefill_s=prefill_s, decode_s=decode_s, build_s=class_s + build_s,
                  probe_s=time.perf_counter() - started)


def _probe_model(cfg: SweepConfig, model_config, device: torch.device, dtype: torch.dtype):
    """(a 1-layer model of ``model_config`` with cheap random weights, seconds of importing its class, seconds the
    whole model will take to build or load). The run imports the class too."""
    from transformers import AutoModelForCausalLM

    n_layers = adapters.n_layers_of(model_config)
    config = adapters.layers_config(model_config, [0])  # per-layer lists (layer_types...) follow the layer count
    started = time.perf_counter()
    with torch.device(device), _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    class_s = time.perf_counter() - started
    generator = torch.Generator(device).manual_seed(cfg.seed)
    with torch.no_grad():
        for param in model.parameters():  # small uniform weights: no inf or NaN, no denormals
            param.uniform_(-0.02, 0.02, generator=generator)
    model.eval()
    n_params = adapters.total_params(model) + (n_layers - 1) * adapters.layer_params(model)[0]
    fill = torch.empty(1 << 20, device=device)
    fill_s = _typical_seconds(lambda: fill.normal_(), device) / fill.numel()
    per_param = BUILD_PER_NORMAL if cfg.random_init else 1.0  # a checkpoint is read, not initialised
    return model, class_s, n_params * fill_s * per_param


def _no_init_weights():
    """transformers' switch that skips weight initialisation (its module moved in 5.x), or nothing."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def _probe_head(cfg: SweepConfig, model, device: torch.device):
    """The head + loss ``--head`` picks (as the worker does; uncompiled: compiling would take longer than the
    probe, so a compiled GPU head is priced eagerly, an upper bound)."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    choice = cfg.head if cfg.head != "auto" else ("chunked" if device.type == "cuda" else "online")
    if choice == "online" and isinstance(head, torch.nn.Linear):
        return perplexity.OnlineHeadLoss(head.weight, head.bias, softcap)

    def logits_fn(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)  # (rows, V)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    return perplexity.HeadLoss(logits_fn, compiled=False)


def _latency_prices(cfg: SweepConfig, model, device: torch.device) -> tuple[tuple[float, float], tuple[float, float]]:
    """((prefill without layers, per layer), (decode step without layers, per layer)) in seconds, timed as the
    latency phase times them (``--latency-threads``, batch 1, ``--latency-seq`` tokens, the KV cache)."""
    if cfg.latency == "off":
        return (0.0, 0.0), (0.0, 0.0)
    timer = latency.timer_for(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, cfg.latency_seq), generator=torch.Generator().manual_seed(cfg.seed))
    n_decode = max(cfg.decode_tokens, 1)
    timings = []
    with latency.cpu_threads(device, cfg.latency_threads), torch.no_grad():
        for removed in ([0], []):
            try:
                samples = [latency.time_variant(model, removed, prompt.to(device), n_decode, timer)
                           for _ in range(4)]
            except Exception:  # e.g. a prompt longer than the context: the phase fails at once and says why
                return (0.0, 0.0), (0.0, 0.0)
            timings.append([statistics.median(s[i] for s in samples[1:]) / 1000 for i in (0, 1)])  # ms -> s
    (prefill0, decode0), (prefill1, decode1) = timings
    decode = (decode0, max(decode1 - decode0, 0.0)) if cfg.decode_tokens else (0.0, 0.0)
    return (prefill0, max(prefill1 - prefill0, 0.0)), decode


PROBE_TIMING_S = 0.6
"""Seconds of timed calls the probe spends on each price (at least three calls, at most nine)."""


def _typical_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` in the machine's steady state: the lower quartile of the timed calls after
    one warm-up call (at least 3, more while within :data:`PROBE_TIMING_S`, at most 9).

    Not the median: on the shared VM a fresh process stalls about a second in, for 4-5 calls at 2-3x their time
    (host memory management), so the median of the few calls a probe makes read 43 to 115 us per position for
    the same SmolLM2 layer; the lower quartile read 44-47 us over six fresh processes (docs/benchmark.md).
    A whole run pays such stalls too, but once: its perplexity phase ran at about 1.25x this quartile's price.
    """
    def once() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    times = [once(), once(), once()]
    while len(times) < 9 and sum(times) < PROBE_TIMING_S:
        times.append(once())
    return sorted(times)[len(times) // 4]


# ---------------------------------------------------------------------------------------------- start-up


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


FRESH_PROCESS_S = 120.0
"""A process younger than this at `sweep plan`'s start is taken for a fresh one: its age is what a new `sweep run`
pays for its imports. An older one (a notebook, a test session) says nothing about a new process's imports."""


def startup_seconds(prices: Prices, geo: Geometry, n_layers: int, imports_s: float | None, loading_s: float,
                    on_gpu: bool) -> float:
    """A new `sweep run` process's seconds before its first variant: imports, config, tokenizer and (cached)
    tokens as `sweep plan` just paid them, building the model, and the runner's first timing (three passes of the
    whole model over one window of at most ``ESTIMATE_POSITIONS`` positions on CPU, one batch on a GPU)."""
    positions = geo.positions / max(geo.batches, 1) if on_gpu else min(geo.window, ESTIMATE_POSITIONS)
    rows = positions * geo.rows / max(geo.positions, 1)
    first_timing = 3 * (positions * (prices.forward_s + n_layers * prices.layer_s) + rows * prices.head_s)
    return (imports_s or 0.0) + loading_s + prices.build_s + first_timing


@dataclass(frozen=True)
class CalibrationWork:
    """What the signal strategies of a plan compute on the calibration text, known without the model."""

    n_tokens: int
    """Calibration tokens used (in windows of the evaluation's ``--max-length``)."""
    signals: bool = False
    """One capture pass of the full model (angular distances, Block Influence)."""
    greedy_rounds: tuple[int, ...] = ()
    """Candidates per greedy round: 30, 29, ... for 30 units."""
    search_passes: tuple[tuple[float, int], ...] = ()
    """Per search size: (its budget in passes over the calibration tokens, layers its candidates remove)."""


def calibration_seconds(work: CalibrationWork, n_layers: int, max_length: int, batch_size: int,
                        prices: Prices, keeps_captures: Callable[[Geometry], bool] = lambda geo: False,
                        ) -> tuple[float, float]:
    """(all the calibration work, the search's part of it) in seconds at the probe's prices.

    A greedy round of c candidates is priced as a trie of c single-layer removals (its candidates share the
    layers before their first removed one, as single removals do; with more units than layers, the layers' trie
    scaled by c / L). A search pass is one candidate on every calibration window without sharing, so its budget
    prices the most it can take: racing and the trie make it cheaper, and a converged search stops before it.
    Where ``keeps_captures`` of the calibration geometry holds, only greedy's first round pays the capture forward
    (the rounds share one worker).
    """
    geo = geometry(work.n_tokens, max_length, max_length, batch_size)

    def steps_of(removed) -> variant_steps.Steps:
        return variant_steps.steps_of(removed, n_layers)

    seconds = chunk_seconds([steps_of(())], n_layers, geo, prices) if work.signals else 0.0
    keeps = keeps_captures(geo)
    for round_index, candidates in enumerate(work.greedy_rounds):
        singles = [(layer,) for layer in range(min(candidates, n_layers))]
        seconds += perplexity_seconds(singles, n_layers, geo, prices, True, keeps,
                                      captured=keeps and round_index > 0) * candidates / len(singles)
    search_s = sum(passes * chunk_seconds([steps_of(tuple(range(min(removed, n_layers - 1))))], n_layers, geo,
                                          prices) for passes, removed in work.search_passes)
    return seconds + search_s, search_s


# ---------------------------------------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class PlanWork:
    """What a run will measure, as `sweep plan` knows it without the model."""

    todo: Sequence
    """Removals to measure."""
    done: Sequence
    """Removals of the setup already in the DB (their latency signatures are stored)."""
    n_layers: int
    n_tokens: int
    """Tokens evaluated (``--max-tokens`` prefix)."""
    max_length: int
    stride: int


def captures_kept(cfg: SweepConfig, model_config, n_layers: int) -> Callable[[Geometry], bool]:
    """Whether a worker of ``cfg`` keeps the captures of a text of a given geometry (:func:`trie.keeps_captures`)."""
    device = resolve_device(cfg.device)
    element_size = torch.empty((), dtype=resolve_dtype(cfg.dtype, device)).element_size()
    hidden_size = model_config.hidden_size

    def keeps(geo: Geometry) -> bool:
        return trie.keeps_captures(device.type, n_layers, geo.positions, hidden_size, element_size)

    return keeps


def estimate_run(cfg: SweepConfig, model_config, token_ids: torch.Tensor, work: PlanWork,
                 measured: Sequence[MeasuredChunk] = (), latency_rounds: int | None = None,
                 imports_s: float | None = None, loading_s: float = 0.0,
                 batch_size: int = 8, calibration_work: CalibrationWork | None = None) -> Estimate:
    """The expected wall time of `sweep run` measuring ``work.todo`` (see the module docstring).

    Args:
        token_ids: (N,) the evaluated tokens (the probe runs its first window).
        measured: earlier chunks of this shape on this host (:func:`sweep.store.throughput.measured_chunks`): when
            given, they calibrate the perplexity price.
        latency_rounds: timed rounds an earlier latency phase of this shape took, if known.
        imports_s: a new process's imports (None: not counted); loading_s: reading config, tokenizer and tokens.
        calibration_work: what the signal strategies compute on the calibration text (None: nothing).
    """
    geo = geometry(work.n_tokens, work.max_length, work.stride, batch_size)
    prices = probe_prices(cfg, model_config, token_ids, geo, batch_size)
    shared = cfg.engine == "trie"
    keeps = captures_kept(cfg, model_config, work.n_layers) if shared else (lambda g: False)
    ppl = perplexity_seconds(work.todo, work.n_layers, geo, prices, shared, keeps(geo))
    factor = calibration(measured, work.n_layers, work.max_length, work.stride, batch_size, prices, keeps)
    on_gpu = resolve_device(cfg.device).type == "cuda"
    layer_kinds = getattr(model_config, "layer_types", None)
    calls = signature_calls(work.todo, work.done, work.n_layers, layer_kinds, cfg.latency == "per-variant")
    calib_s, search_s = (calibration_seconds(calibration_work, work.n_layers, work.max_length, batch_size, prices,
                                             keeps) if calibration_work is not None else (0.0, 0.0))
    return Estimate(startup_s=startup_seconds(prices, geo, work.n_layers, imports_s, loading_s, on_gpu),
                    perplexity_s=ppl * (factor or 1.0),
                    calibration_s=calib_s * (factor or 1.0), search_s=search_s * (factor or 1.0),
                    latency_s=latency_seconds(calls, cfg, prices, latency_rounds, on_gpu),
                    calibrated=factor is not None, calibrated_on=sum(len(c.keys) for c in measured),
                    imports_counted=imports_s is not None, probe_s=prices.probe_s)

"""Calibration signals for choosing layers to remove: angular distance, Block Influence, the greedy path.

One forward pass per batch of calibration windows keeps the residual stream entering every layer
(:func:`sweep.engine.adapters.capture_residual_stream`); from it:

- angular distance (Gromov et al. 2024, arXiv:2403.17887), for every start l and block size n with l + n <= L::

      d(l, n) = arccos(clamp(cos(h_l, h_{l+n}), -1, 1)) / pi

  averaged over tokens, both for each window's last (non-padding) token (as in the paper and PruneMe) and for
  all non-padding tokens. h_l is the residual stream entering layer l; h_L is the last layer's output before
  the final norm.
- Block Influence (ShortGPT, arXiv:2403.03853) of layer l: 1 - cos(h_l, h_{l+1}), averaged over all
  non-padding tokens.

The greedy search (SLEB, arXiv:2402.09025) scores candidates by calibration perplexity with the usual
:class:`sweep.engine.worker.Worker` (prefix-sharing trie) on the calibration windows. Everything is stored in
``results.db`` under a calibration key, so a second run reuses it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sweep import Log, store, strategies
from sweep.config import SweepConfig, batch_size_or_default, plan_spec
from sweep.engine import adapters, identity, models
from sweep.engine.search import Searcher
from sweep.engine.data import EvalSetup, TokenizedText, describe, load_text, resolve_windows, tokenize, used_tokens
from sweep.engine.worker import Worker
from sweep.errors import DataError, SweepError
from sweep.plan import STRATEGIES, Removal, parse_key, parse_range, reported_strategies, signal_strategies, \
    strategy_names, units_of, variant_key


@dataclass
class LayerSignals:
    """Angular distances and Block Influence of one model on one calibration text."""

    n_layers: int
    angular_last: dict[tuple[int, int], float] = field(default_factory=dict)
    """(start l, size n) -> mean d(l, n) over each window's last token."""
    angular_all: dict[tuple[int, int], float] = field(default_factory=dict)
    """(start l, size n) -> mean d(l, n) over all non-padding tokens."""
    block_influence: list[float] = field(default_factory=list)
    """Layer l -> mean 1 - cos(h_l, h_{l+1}) over all non-padding tokens."""
    n_sequences: int = 0
    n_tokens: int = 0


# ---------------------------------------------------------------------------------------------- calibration


def calibration_batches(token_ids: torch.Tensor, max_length: int, batch_size: int,
                        pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows of the calibration tokens, batched; the last, shorter one is right-padded.

    Example: 10 tokens, max_length 4, batch_size 2 -> batch 1: tokens 0-3 and 4-7 (mask all ones);
    batch 2: tokens 8-9 padded to 4 (mask 1 1 0 0).

    Yields:
        (input_ids (B, T), attention_mask (B, T)) on the tokens' device.
    """
    starts = list(range(0, len(token_ids), max_length))
    for first in range(0, len(starts), batch_size):
        chunk = [token_ids[s : s + max_length] for s in starts[first : first + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=token_ids.device)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=token_ids.device)
        for row, window in enumerate(chunk):
            ids[row, : len(window)] = window
            mask[row, : len(window)] = 1
        yield ids, mask


def load_calibration(cfg: SweepConfig, tokenizer) -> TokenizedText:
    """Tokenized calibration text (cached like the evaluation text).

    Raises:
        DataError: missing text, or fewer than 2 tokens.
    """
    name = describe(cfg.calib_data, cfg.calib_data_config, cfg.calib_split)
    try:
        text = load_text(cfg.calib_data, cfg.calib_data_config, cfg.calib_split, cfg.text_column)
    except DataError as exc:
        raise DataError(f"calibration text (--calib-data): {exc}") from None
    tokens = tokenize(text, tokenizer, name, cfg.cache_dir)
    if len(tokens.ids) < 2:
        raise DataError(f"--calib-data {cfg.calib_data}: fewer than 2 tokens")
    return tokens


# ---------------------------------------------------------------------------------------------- signals


class _Sums:
    """Running float64 sums over calibration batches; (L+1, L+1) matrices indexed [l, l+n]."""

    def __init__(self, n_layers: int):
        size = n_layers + 1
        self.n_layers = n_layers
        self.angular_all = torch.zeros(size, size, dtype=torch.float64)
        self.angular_last = torch.zeros(size, size, dtype=torch.float64)
        self.one_minus_cos = torch.zeros(n_layers, dtype=torch.float64)
        self.n_tokens = 0
        self.n_sequences = 0

    def add(self, streams: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
        """Add one batch: ``streams`` are L+1 residual streams (B, T, H), ``mask`` (B, T) is 1 on real tokens."""
        weights = mask.to(torch.float64)  # (B, T)
        rows = torch.arange(mask.shape[0], device=mask.device)
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)  # (B,) last real token
        # Unit vectors in float64: identical streams then give cos = 1 up to ~1e-16, so d ~ 1e-8, not ~1e-4.
        units = [F.normalize(h.to(torch.float64), dim=-1) for h in streams]  # L+1 x (B, T, H)
        for l in range(self.n_layers):
            for m in range(l + 1, self.n_layers + 1):
                cos = (units[l] * units[m]).sum(dim=-1).clamp(-1.0, 1.0)  # (B, T)
                angle = torch.arccos(cos) / math.pi
                self.angular_all[l, m] += float((angle * weights).sum())
                self.angular_last[l, m] += float(angle[rows, last].sum())
                if m == l + 1:
                    self.one_minus_cos[l] += float(((1.0 - cos) * weights).sum())
        self.n_tokens += int(mask.sum())
        self.n_sequences += mask.shape[0]

    def signals(self) -> LayerSignals:
        L = self.n_layers
        pairs = [(l, n) for n in range(1, L + 1) for l in range(L - n + 1)]
        return LayerSignals(
            n_layers=L,
            angular_last={(l, n): float(self.angular_last[l, l + n]) / self.n_sequences for l, n in pairs},
            angular_all={(l, n): float(self.angular_all[l, l + n]) / self.n_tokens for l, n in pairs},
            block_influence=[float(x) / self.n_tokens for x in self.one_minus_cos],
            n_sequences=self.n_sequences, n_tokens=self.n_tokens)


@torch.no_grad()
def layer_signals(model, batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | Iterator,
                  progress: Callable[[], None] = lambda: None) -> LayerSignals:
    """Angular distances and Block Influence from one forward pass per (input_ids, attention_mask) batch."""
    sums = _Sums(adapters.n_layers_of(model.config))
    for input_ids, mask in batches:
        streams = adapters.capture_residual_stream(model, input_ids, mask)
        sums.add(streams, mask)
        progress()
    return sums.signals()


def signal_rows(signals: LayerSignals) -> list[dict]:
    """LayerSignals -> rows of the ``layer_similarity`` table."""
    common = {"n_sequences": signals.n_sequences, "n_tokens": signals.n_tokens}
    rows = [{"metric": "angular-last", "start": l, "size": n, "value": v, **common}
            for (l, n), v in signals.angular_last.items()]
    rows += [{"metric": "angular-all", "start": l, "size": n, "value": v, **common}
             for (l, n), v in signals.angular_all.items()]
    rows += [{"metric": "block-influence", "start": l, "size": 1, "value": v, **common}
             for l, v in enumerate(signals.block_influence)]
    return rows


def signals_from_rows(rows: list[dict], n_layers: int) -> LayerSignals | None:
    """Inverse of :func:`signal_rows` (None when the rows are incomplete)."""
    signals = LayerSignals(n_layers)
    influence: dict[int, float] = {}
    for row in rows:
        value = row["value"] if row["value"] is not None else math.nan
        if row["metric"] == "angular-last":
            signals.angular_last[(row["start"], row["size"])] = value
        elif row["metric"] == "angular-all":
            signals.angular_all[(row["start"], row["size"])] = value
        elif row["metric"] == "block-influence":
            influence[row["start"]] = value
        signals.n_sequences, signals.n_tokens = row["n_sequences"], row["n_tokens"]
    n_pairs = n_layers * (n_layers + 1) // 2
    if len(signals.angular_last) != n_pairs or len(signals.angular_all) != n_pairs or len(influence) != n_layers:
        return None
    signals.block_influence = [influence[l] for l in range(n_layers)]
    return signals


# ---------------------------------------------------------------------------------------------- orchestration


@dataclass
class Calibration:
    """A loaded model with its calibration tokens, and the key its signals are stored under."""

    cfg: SweepConfig
    model: object
    tokens: TokenizedText
    max_length: int
    key: dict
    """store calibration key: model_id, weights, calib_fingerprint."""

    @property
    def n_layers(self) -> int:
        return adapters.n_layers_of(self.model.config)

    @property
    def token_ids(self) -> torch.Tensor:
        """(N,) the calibration tokens used, on the model's device."""
        used = self.tokens.ids[: used_tokens(len(self.tokens.ids), self.cfg.calib_max_tokens)]
        return torch.as_tensor(used).to(next(self.model.parameters()).device)


def open_calibration(cfg: SweepConfig, model, tokenizer, db) -> Calibration:
    """Tokenize the calibration text and register the model row; windows are the evaluation's --max-length.

    Raises:
        DataError, ConfigError.
    """
    max_length = resolve_windows(cfg, model.config).max_length
    tokens = load_calibration(cfg, tokenizer)
    key = identity.calibration_key(db, cfg, model.config, tokens, max_length, next(model.parameters()).device)
    return Calibration(cfg, model, tokens, max_length, key)


def ensure_signals(cal: Calibration, db, log: Log = print, progress: bool = True) -> LayerSignals:
    """The stored signals of this calibration key, or compute them (one pass) and store them."""
    stored = signals_from_rows(store.read_layer_similarity(db, cal.key), cal.n_layers)
    if stored is not None:
        log(f"similarity: reusing the signals stored for {cal.tokens.name} [{cal.key['calib_fingerprint']}]")
        return stored
    token_ids = cal.token_ids
    log(f"similarity: {len(token_ids):,} calibration tokens of {cal.tokens.name} in windows of {cal.max_length}")
    signals = _signals_with_oom_retry(cal, log, progress)
    store.record_layer_similarity(db, cal.key, cal.tokens.name, signal_rows(signals))
    return signals


def _signals_with_oom_retry(cal: Calibration, log: Log, progress: bool) -> LayerSignals:
    """One calibration pass; out of memory halves the windows per batch (padding is masked, so the signals do not
    depend on the batch) down to one window, then stops with an error that says what to lower."""
    token_ids, batch = cal.token_ids, batch_size_or_default(cal.cfg)
    pad_id = int(token_ids[0])  # any real id: padded positions are masked out of attention and of the averages
    while True:
        n_batches = math.ceil(math.ceil(len(token_ids) / cal.max_length) / batch)
        bar = tqdm(total=n_batches, desc="similarity", unit="batch", disable=not progress, dynamic_ncols=True)
        try:
            return layer_signals(cal.model, calibration_batches(token_ids, cal.max_length, batch, pad_id),
                                 progress=lambda: bar.update(1))
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch == 1:
                raise SweepError(f"similarity: out of memory with one {cal.max_length}-token window per batch; "
                                 "lower --max-length or use a device with more memory") from None
            batch //= 2
            log(f"similarity: out of memory; retrying with {batch} window(s) per batch")
        finally:
            bar.close()


def ensure_greedy_path(cal: Calibration, db, n_steps: int, log: Log = print,
                       progress: bool = True) -> list[strategies.GreedyStep]:
    """The greedy (SLEB) path to ``n_steps`` removed layers, resuming from the stored rounds.

    Candidates of a round are scored together by :meth:`Worker.evaluate_many` (one prefix-sharing trie pass)
    on the calibration windows; each round is stored as soon as it is chosen.
    """
    key = unit_key(cal)
    done = _stored_path(cal, db, cal.cfg.unit)
    if len(done) >= n_steps:
        return done[:n_steps]
    worker = Worker(cal.model, cal.tokens, EvalSetup(cal.max_length, cal.max_length, cal.cfg.calib_max_tokens),
                    cal.cfg)
    L = cal.n_layers
    units = units_of(L, plan_spec(cal.cfg))
    worker.check_variants([(u,) for u in units])
    todo = sum(len(units) - k for k in range(len(done), n_steps))
    log(f"greedy: {n_steps - len(done)} round(s), {todo} calibration perplexities on {len(worker.token_ids):,} "
        f"tokens of {cal.tokens.name}" + (f" (resuming after step {len(done)})" if done else ""))
    bar = tqdm(total=todo, desc="greedy", unit="variant", disable=not progress, dynamic_ncols=True)

    def calib_ppl(candidates: list[Removal]) -> list[float]:
        rows = worker.evaluate_many(candidates)
        bar.update(len(candidates))
        return [row.get("ppl", math.nan) if row["status"] == "ok" else math.nan for row in rows]

    def save(step: strategies.GreedyStep) -> None:
        store.record_greedy_step(db, key, step.step, step.layer, variant_key(step.removed), step.calib_ppl)
        bar.set_postfix_str(f"removed {variant_key(step.removed)}: calib ppl {step.calib_ppl:.2f}")

    path = strategies.greedy_path(L, n_steps, calib_ppl, done=done, on_step=save, units=units)
    bar.close()
    return path


def unit_key(cal: Calibration) -> dict:
    """The key a greedy path and its choices are stored under: the calibration key, its fingerprint marked with
    the unit for --unit attn, mlp or mix (so a search over branches never resumes one over blocks)."""
    return _key_for_unit(cal, cal.cfg.unit)


def _key_for_unit(cal: Calibration, unit: str) -> dict:
    if unit == "block":
        return cal.key
    return {**cal.key, "calib_fingerprint": f"{cal.key['calib_fingerprint']}/{unit}"}


def _searcher(cal: Calibration, db, log: Log, progress: bool) -> Searcher:
    """The engine side of ``--strategy search`` (:mod:`sweep.engine.search`): its greedy seed is the path over
    ``--unit``, computed (or resumed) to the size asked; a budget search only reads the paths already stored."""
    return Searcher(cal, db, unit_key(cal), lambda n: ensure_greedy_path(cal, db, n, log, progress),
                    lambda unit: _stored_path(cal, db, unit), log, progress)


def _stored_path(cal: Calibration, db, unit: str) -> list[strategies.GreedyStep]:
    """The greedy path stored for this calibration over ``unit`` (as many steps as were computed; maybe none)."""
    return [strategies.GreedyStep(r["step"], r["layer"], parse_key(r["removed"]),
                                  r["calib_ppl"] if r["calib_ppl"] is not None else math.nan)
            for r in store.read_greedy_steps(db, _key_for_unit(cal, unit))]


def signal_choices(cfg: SweepConfig, cal: Calibration, db, log: Log = print,
                   progress: bool = True) -> list[strategies.Choice]:
    """The variants chosen by the signal strategies in ``cfg.strategy`` for each n in ``--n``, recorded in the DB.

    Each strategy's record (:data:`sweep.plan.STRATEGIES`) says which signals it needs and how it chooses: the
    signals are computed (or read from the DB) once for all of them.

    Raises:
        PlanError: a size does not fit (e.g. angular without --allow-last on n = number of layers).
    """
    records = [STRATEGIES[s] for s in strategy_names(cfg.strategy) if s in signal_strategies()]
    sizes = parse_range(cfg.n, "--n")
    for record in records:  # raises the PlanError before any work
        record.plans(cal.n_layers, plan_spec(cfg))
    needs = {need for record in records for need in record.needs}
    inputs = strategies.Calibrated(
        cal.n_layers, cfg, signals=ensure_signals(cal, db, log, progress) if "signals" in needs else None,
        path=ensure_greedy_path(cal, db, max(sizes), log, progress) if "greedy-path" in needs else None,
        searcher=_searcher(cal, db, log, progress) if "search" in needs else None)
    choices = [c for record in records for c in record.chooses(sizes, inputs)]
    store.record_strategy_choices(db, unit_key(cal), [{"strategy": c.strategy, "signal": c.signal, "n": c.n,
                                                 "removed": variant_key(c.removed), "score": c.score}
                                                for c in choices])
    for c in choices:
        log(f"  {c.strategy:<15} n={c.n}: removes {variant_key(c.removed) or '-'} ({c.signal} {c.score:.4g})")
    return choices


def signal_removals(cfg: SweepConfig, model, db, log: Log = print, progress: bool = True) -> list[Removal]:
    """What the runner unions into the plan: the removals the signal strategies of ``cfg.strategy`` choose."""
    if not set(strategy_names(cfg.strategy)) & set(signal_strategies()):
        return []
    cal = open_calibration(cfg, model, models.tokenizer_for(cfg), db)
    return [c.removed for c in signal_choices(cfg, cal, db, log, progress)]


def run_similarity(cfg: SweepConfig, log: Log = print, progress: bool = True) -> LayerSignals:
    """``sweep similarity``: load the model, compute (or reuse) its signals on the calibration text, store them.

    Raises:
        SweepError subclasses: bad model, data or DB.
    """
    store.check_writable(cfg.db)
    tokenizer = models.tokenizer_for(cfg)
    model = models.model_for(cfg)
    db = store.open_db(cfg.db)
    cal = open_calibration(cfg, model, tokenizer, db)
    signals = ensure_signals(cal, db, log, progress)
    log(summary_text(signals, cfg.allow_last))
    log(f"stored in {cfg.db} (table layer_similarity, calibration {cal.key['calib_fingerprint']}). "
        f"Next: sweep run --strategy {','.join(_compared())} --n {cfg.n}")
    return signals


def _compared() -> tuple[str, ...]:
    """The strategies a `sweep similarity` suggests running: the signal ones, then the others the report compares."""
    signal = signal_strategies()
    return signal + tuple(n for n in reported_strategies() if n not in signal)


def summary_text(signals: LayerSignals, allow_last: bool = False) -> str:
    """Block Influence per layer and the block of minimal angular distance for each size, as plain text.

    Example (6 layers)::

        layer  BI        (block-influence removes in this order: 5, 4, 3, 2, 1, 0)
        0      0.7062
        ...
        n    angular, last token        angular, all tokens
        1    4                d=0.0221  4                d=0.0219
        2    3,4              d=0.0451  3,4              d=0.0448
    """
    L = signals.n_layers
    order = sorted(range(L), key=lambda i: strategies._finite_or_inf(signals.block_influence[i]))
    lines = [f"{signals.n_sequences} calibration windows, {signals.n_tokens:,} tokens",
             f"layer  BI        (block-influence removes in this order: {', '.join(map(str, order))})"]
    lines += [f"{l:<6} {bi:.4f}" for l, bi in enumerate(signals.block_influence)]
    lines.append("n    angular, last token        angular, all tokens")
    for n in range(1, L + (1 if allow_last else 0)):
        cells = []
        for distances in (signals.angular_last, signals.angular_all):
            removed, d = strategies.angular_choice(distances, n, L, allow_last)
            cells.append(f"{variant_key(removed):<16} d={d:.4f}")
        lines.append(f"{n:<4} " + "  ".join(cells))
    return "\n".join(lines)

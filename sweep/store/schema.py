"""The results.db schema: the one place that defines every table, column and view, and how older files upgrade.

Everything else is generated from :data:`TABLES` and :data:`VIEWS`: the ``CREATE`` statements, the column checks of
the writers, the reference page ``docs/schema.md`` (:func:`schema_markdown`) and the descriptions a browser shows.
A column carries its unit and, for measurements, which way is better, so no reader has to guess.

Versions (``meta.schema_version``; every upgrade is recorded in ``schema_migrations``):

- 1: the first release. Tables beyond ``models``, ``setups``, ``results`` and ``runs`` were created on first use.
- 2: every table and view is created when the file is opened; ``PRAGMA application_id`` marks the file as a sweep
  database (another application's SQLite file is refused untouched); upgrades are recorded in
  ``schema_migrations``. A version-1 file upgrades in place, keeping every row.
- 3: ``runs.process_start``: the start of a run's process as the kernel records it, so a run whose pid is alive
  on this host is alive whatever its heartbeat says, and a reused pid is not taken for it. Latency timings say how
  far to trust them: ``results`` gains the width of each median's bootstrap interval (``prefill_interval_pct``,
  ``decode_interval_pct``) and ``latency_noisy``; the view ``results_vs_baseline`` shows ``speed_interval_pct`` and
  ``latency_noisy``. Older rows keep NULL there (not known).
- 4: per-window losses: ``window_losses`` holds each result's per-window NLL and token counts (one row per
  variant, arrays as BLOBs), ``ppl_intervals`` the paired bootstrap interval of each variant's perplexity change
  against the baseline, and the view shows it (``ppl_change_low_pct``, ``ppl_change_high_pct``) with
  ``n_windows``. Racing adds the statuses ``racing`` (measured on a first part of the windows, still in the race)
  and ``eliminated`` (dropped by the race: its numbers cover only ``n_windows`` windows). Older rows have no
  per-window losses, hence no interval.
- 5: ``search_candidates``: every candidate ``--strategy search`` scored on the calibration text, with its per-window
  values, so a killed search resumes where it stopped; its choices go to ``strategy_choices`` (strategies
  ``search``, ``search-attn``, ``search-mlp``, ``search-mix``; a parameter budget is named in the signal,
  ``calib-ppl@params>=0.158``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 5

APPLICATION_ID = 0x53574550
"""``PRAGMA application_id`` of a sweep database: "SWEP" in ASCII (https://www.sqlite.org/fileformat.html#appid)."""

SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", bytes: "BLOB"}


@dataclass(frozen=True)
class Column:
    """One column: its Python type, what it holds, its unit, and for measurements which way is better."""

    name: str
    type: type
    doc: str
    unit: str | None = None
    """``ms``, ``%``, ``nats``, ``s``... None for counts, names and keys."""
    better: str | None = None
    """``lower`` or ``higher`` for measurements; None otherwise."""

    @property
    def description(self) -> str:
        """What the column holds, with its unit and which way is better, e.g. ``median prefill time at batch 1
        (unit: ms; lower is better)``: the text of docs/schema.md and of the column descriptions `sweep browse`
        shows."""
        extra = [f"unit: {self.unit}"] if self.unit else []
        if self.better:
            extra.append(f"{self.better} is better")
        return self.doc + (f" ({'; '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class Table:
    """One table: columns in order, primary key, foreign keys ``(column, table, column)`` and indexes."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    foreign_keys: tuple[tuple[str, str, str], ...] = ()
    indexes: tuple[tuple[str, tuple[str, ...], bool], ...] = ()
    """(index name, columns, unique)."""
    integer_id: bool = False
    """``id INTEGER PRIMARY KEY`` (SQLite's row id) rather than the composite ``primary_key``."""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def types(self) -> dict[str, type]:
        return {c.name: c.type for c in self.columns}


@dataclass(frozen=True)
class View:
    """A view: its SQL and the documentation of its columns (the same :class:`Column` records)."""

    name: str
    doc: str
    select: str
    columns: tuple[Column, ...] = field(default_factory=tuple)


def _c(name: str, kind: type, doc: str, unit: str | None = None, better: str | None = None) -> Column:
    return Column(name, kind, doc, unit, better)


STATUS_DOC = "ok: measured; failed: an error (e.g. out of memory) stopped the measurement; diverged: NaN/inf result"
RESULT_STATUS_DOC = (STATUS_DOC + "; racing: measured on the first n_windows windows, still in a race (--race); "
                     "eliminated: dropped by a race, its numbers cover only its first n_windows windows")
KEY_DOC = 'variant key: the removed layers, sorted and comma-separated ("1,3"); "" for the unpruned baseline'

META = Table("meta", "Key-value facts about the file: schema_version.", (
    _c("key", str, "name of the fact"),
    _c("value", str, "its value"),
), primary_key=("key",))

SCHEMA_MIGRATIONS = Table("schema_migrations", "How this file reached its schema version: its creation, then every "
                          "upgrade, in order.", (
    _c("version", int, "schema version reached"),
    _c("description", str, "what the upgrade changed (or that the file was created at this version)"),
    _c("applied_at", str, "when (UTC, ISO 8601)"),
), primary_key=("version",))

MODELS = Table("models", "One row per model name, revision and dtype.", (
    _c("id", int, "row id"),
    _c("name", str, "hub id or local path, as given with --model"),
    _c("revision", str, 'hub revision ("" for none)'),
    _c("dtype", str, "weights dtype the model was evaluated in (float32, bfloat16, float16)"),
    _c("n_layers", int, "decoder layers of the full model"),
    _c("model_class", str, "transformers class, e.g. GPT2LMHeadModel"),
), integer_id=True, indexes=(("idx_models_name_revision_dtype", ("name", "revision", "dtype"), True),))

SETUPS = Table("setups", "An evaluation setup: everything that changes the numbers. Its id hashes all of it.", (
    _c("id", str, "setup id: hash of the model row and every field below but created_at"),
    _c("model_id", int, "models.id"),
    _c("data", str, "evaluation text, e.g. Salesforce/wikitext:wikitext-2-raw-v1:test or a file path"),
    _c("data_fingerprint", str, "hash of the text and the tokenizer"),
    _c("data_tokens", int, "tokens of the whole text (before --max-tokens)"),
    _c("max_length", int, "tokens per evaluation window"),
    _c("stride", int, "tokens a window advances by"),
    _c("max_tokens", int, "evaluated prefix of the text in tokens (NULL = all)"),
    _c("latency_seq", int, "prompt length of the prefill timing", "tokens"),
    _c("latency_settings", str, "latency mode and settings (or off)"),
    _c("weights", str, "weights fingerprint: hub commit, hash of local files, or random-init"),
    _c("device", str, "device name, e.g. cpu or NVIDIA H100 80GB HBM3"),
    _c("engine_version", str, "bumped when a change to sweep alters measured numbers"),
    _c("created_at", str, "when the setup was first used (UTC)"),
), primary_key=("id",), foreign_keys=(("model_id", "models", "id"),))

RESULTS = Table("results", "One row per measured variant of a setup, committed the moment it is measured.", (
    _c("setup_id", str, "setups.id"),
    _c("removed", str, KEY_DOC),
    _c("n_removed", int, "number of layers removed"),
    _c("n_layers", int, "number of layers kept"),
    _c("kept_layers", str, "the kept layers, comma-separated"),
    _c("params", int, "parameters of the variant, embeddings included", better="lower"),
    _c("params_non_embedding", int, "parameters without token/position embeddings (and an untied head)",
       better="lower"),
    _c("nll_sum", float, "summed negative log-likelihood of the scored tokens", "nats", "lower"),
    _c("n_tokens", int, "scored tokens"),
    _c("n_bytes", int, "UTF-8 bytes of the evaluated text", "bytes"),
    _c("ppl", float, "perplexity exp(nll_sum / n_tokens) (NULL when NaN; inf kept)", better="lower"),
    _c("bpb", float, "bits per UTF-8 byte", "bits/byte", "lower"),
    _c("prefill_ms", float, "median prefill time at batch 1", "ms", "lower"),
    _c("prefill_iqr_ms", float, "inter-quartile range of the prefill timings", "ms"),
    _c("prefill_repeats", int, "timed repeats (prefill and decode), at least --latency-repeats"),
    _c("decode_ms_per_token", float, "median greedy decoding time per token with the KV cache", "ms/token", "lower"),
    _c("decode_iqr_ms", float, "inter-quartile range of the decode timings", "ms/token"),
    _c("latency_signature", str, "shape signature: variants with equal signatures share one latency measurement"),
    _c("latency_from", str, "key of the variant whose latency measurement this row shares"),
    _c("status", str, RESULT_STATUS_DOC),
    _c("error", str, "why a measurement failed or diverged (or why its latency is missing)"),
    _c("eval_seconds", float, "seconds spent on this variant's perplexity", "s"),
    _c("latency_seconds", float, "seconds spent on its latency", "s"),
    _c("device", str, "device that measured it"),
    _c("host", str, "host that measured it"),
    _c("measured_at", str, "when it was committed (UTC)"),
    _c("prefill_interval_pct", float, "half-width of the 95 % bootstrap interval of the prefill median, in % of it",
       "%"),
    _c("decode_interval_pct", float, "half-width of the 95 % bootstrap interval of the decode median, in % of it",
       "%"),
    _c("latency_noisy", int, "1: a median's interval stayed wider than --latency-precision (timings not to be "
       "trusted as exact); 0: stable; NULL: not measured or measured before schema version 3"),
), primary_key=("setup_id", "removed"), foreign_keys=(("setup_id", "setups", "id"),))

RUNS = Table("runs", "One row per `sweep run` that had something to measure; alive while its process is (on its "
             "host: pid and process start) or, seen from another host, while its heartbeat is fresh.", (
    _c("id", int, "run id"),
    _c("setup_id", str, "setups.id"),
    _c("status", str, "running, done, interrupted, failed or abandoned (its process died)"),
    _c("pid", int, "process id of the run"),
    _c("host", str, "host name of the run"),
    _c("command", str, "command line"),
    _c("planned", int, "variants in the plan"),
    _c("to_measure", int, "variants not yet in the DB when it started"),
    _c("measured", int, "variants measured so far"),
    _c("started_at", str, "start (UTC)"),
    _c("heartbeat_at", str, "last sign of life (UTC)"),
    _c("ended_at", str, "end (UTC)"),
    _c("process_start", str, "start of the run's process (Linux: boot id and start time in clock ticks), so a "
                             "reused pid is not taken for it; NULL where unknown"),
), integer_id=True)

MEASUREMENTS = Table("measurements", "Audit log: one row per committed measurement (a re-measurement shows twice).", (
    _c("id", int, "row id"),
    _c("setup_id", str, "setups.id"),
    _c("removed", str, KEY_DOC),
    _c("status", str, RESULT_STATUS_DOC),
    _c("run_id", int, "runs.id of the run that committed it (NULL outside a run)"),
    _c("pid", int, "process id"),
    _c("host", str, "host name"),
    _c("measured_at", str, "commit time (UTC)"),
), integer_id=True, indexes=(("measurements_variant", ("setup_id", "removed"), False),))

WINDOW_NLL, WINDOW_TOKENS = "window_nll", "window_tokens"
"""Keys of a result row (as the engine makes it) holding its per-window losses, lists in window order:
:func:`sweep.store.record_results` writes them to ``window_losses``, not to ``results``."""

WINDOW_LOSSES = Table("window_losses", "Per-window losses of each result, one row per variant (arrays as BLOBs), "
                      "committed with its result row: what paired intervals and racing are computed from.", (
    _c("setup_id", str, "setups.id"),
    _c("removed", str, KEY_DOC),
    _c("n_windows", int, "scored windows measured (all of the text's, except for racing and eliminated variants)"),
    _c("nll", bytes, "float64 little-endian array: each window's loss x num_loss_tokens in window order (the guide's "
                     "weighting); math.fsum of it is results.nll_sum", "nats"),
    _c("tokens", bytes, "int32 little-endian array: each window's num_loss_tokens; their sum is results.n_tokens"),
), primary_key=("setup_id", "removed"), foreign_keys=(("setup_id", "setups", "id"),))

PPL_INTERVALS = Table("ppl_intervals", "Paired bootstrap interval over windows of each variant's perplexity change "
                      "against its setup's baseline (sweep.intervals), valid while both rows stay as measured.", (
    _c("setup_id", str, "setups.id"),
    _c("removed", str, KEY_DOC),
    _c("change_pct", float, "perplexity change against the baseline on the whole text", "%", "lower"),
    _c("low_pct", float, "lower end of its interval", "%"),
    _c("high_pct", float, "upper end of its interval", "%"),
    _c("level", float, "coverage of the interval (0.95)"),
    _c("resamples", int, "bootstrap resamples of the windows"),
    _c("seed", int, "seed of the resampled windows"),
    _c("measured_at", str, "results.measured_at of the variant it was computed from"),
    _c("baseline_at", str, "results.measured_at of the baseline it was computed against"),
), primary_key=("setup_id", "removed"), foreign_keys=(("setup_id", "setups", "id"),))

CALIBRATION_KEY = (
    _c("model_id", int, "models.id"),
    _c("weights", str, "weights fingerprint, as in setups"),
    _c("calib_fingerprint", str, "hash of the calibration tokens, window length and tokens used"),
)

LAYER_SIMILARITY = Table("layer_similarity", "Calibration signals of `sweep similarity`: angular distance d(l, n) "
                         "and Block Influence.", (
    *CALIBRATION_KEY,
    _c("calib", str, "calibration text"),
    _c("metric", str, "angular-last, angular-all or block-influence"),
    _c("start", int, "first layer l of the block"),
    _c("size", int, "block size n (1 for block-influence)"),
    _c("value", float, "the signal: lower = the block changes the residual stream less"),
    _c("n_sequences", int, "calibration windows"),
    _c("n_tokens", int, "calibration tokens"),
    _c("computed_at", str, "when (UTC)"),
), primary_key=("model_id", "weights", "calib_fingerprint", "metric", "start", "size"),
    foreign_keys=(("model_id", "models", "id"),))

GREEDY_STEPS = Table("greedy_steps", "The greedy (SLEB) path: one row per round, stored as soon as it is chosen.", (
    *CALIBRATION_KEY,
    _c("step", int, "round, from 1"),
    _c("layer", int, "layer removed in this round"),
    _c("removed", str, "every layer removed after this round"),
    _c("calib_ppl", float, "calibration perplexity after this round", better="lower"),
    _c("computed_at", str, "when (UTC)"),
), primary_key=("model_id", "weights", "calib_fingerprint", "step"), foreign_keys=(("model_id", "models", "id"),))

STRATEGY_CHOICES = Table("strategy_choices", "Which variant each signal strategy chose for each n.", (
    *CALIBRATION_KEY,
    _c("strategy", str, "the signal strategy that chose it (`--strategy`; over attention or MLP units the unit is "
                        "appended: greedy-mix, search-attn, ...)"),
    _c("signal", str, "angular-last, angular-all, block-influence, calib-ppl or calib-kl; a search at a parameter "
                      "budget appends it: calib-ppl@params>=0.158"),
    _c("n", int, "block size / number of layers removed"),
    _c("removed", str, KEY_DOC),
    _c("score", float, "the signal of the chosen variant", better="lower"),
    _c("chosen_at", str, "when (UTC)"),
), primary_key=("model_id", "weights", "calib_fingerprint", "strategy", "signal", "n"),
    foreign_keys=(("model_id", "models", "id"),))

SEARCH_CANDIDATES = Table("search_candidates", "Every candidate `--strategy search` scored, stored as it is measured "
                          "(a killed search replays these and goes on).", (
    *CALIBRATION_KEY,
    _c("search", str, "which search: unit, fitness, size (n=8 or params>=0.158), seed and level"),
    _c("removed", str, KEY_DOC),
    _c("n_units", int, "units removed (a whole block counts as one with --unit block, as two with mix)"),
    _c("generation", int, "generation that drew it (0: a seed)"),
    _c("status", str, "racing (measured on a first part of the windows), dropped (worse than the leader at "
                      "--search-level), scored (every window), leader (led the search at some point)"),
    _c("n_windows", int, "calibration windows it was measured on"),
    _c("fitness", float, "mean calibration NLL (or KL with --fitness kl) per token on those windows", "nats",
       "lower"),
    _c("spent", int, "calibration tokens the search had spent when it was last measured", "tokens"),
    _c("window_values", bytes, "per-window sums (float64 array) on windows 0..n_windows-1"),
    _c("scored_at", str, "when (UTC)"),
), primary_key=("model_id", "weights", "calib_fingerprint", "search", "removed"),
    foreign_keys=(("model_id", "models", "id"),))

TASK_SETUPS = Table("task_setups", "One row per lm-eval task and settings (`sweep tasks`).", (
    _c("id", str, "task setup id: hash of the model row and every field below but created_at"),
    _c("model_id", int, "models.id"),
    _c("task", str, "lm-eval task name"),
    _c("task_version", str, "the task's version and a hash of its YAML"),
    _c("num_fewshot", int, "few-shot examples"),
    _c("task_limit", int, "examples evaluated (NULL = all)"),
    _c("lm_eval_version", str, "lm-evaluation-harness version"),
    _c("weights", str, "weights fingerprint"),
    _c("dtype", str, "weights dtype"),
    _c("device", str, "device name"),
    _c("engine_version", str, "sweep's engine version"),
    _c("created_at", str, "when (UTC)"),
), primary_key=("id",), foreign_keys=(("model_id", "models", "id"),))

TASK_RESULTS = Table("task_results", "Accuracy of one variant (and optionally its heal) on one task setup.", (
    _c("setup_id", str, "task_setups.id"),
    _c("removed", str, KEY_DOC),
    _c("heal_id", str, 'heals.id, or "" for the variant as pruned'),
    _c("n_removed", int, "number of layers removed"),
    _c("n_layers", int, "number of layers kept"),
    _c("metric", str, "headline metric (acc, exact_match, acc_norm, ...)"),
    _c("value", float, "its value (a fraction for accuracies)", better="higher"),
    _c("stderr", float, "its standard error"),
    _c("metrics", str, "JSON of every metric lm-eval reported"),
    _c("n_samples", int, "examples evaluated"),
    _c("status", str, STATUS_DOC),
    _c("error", str, "why it failed"),
    _c("eval_seconds", float, "seconds per task", "s"),
    _c("device", str, "device name"),
    _c("host", str, "host name"),
    _c("measured_at", str, "when (UTC)"),
), primary_key=("setup_id", "removed", "heal_id"), foreign_keys=(("setup_id", "task_setups", "id"),))

HEALS = Table("heals", "LoRA-healed variants (`sweep heal`); (setup_id, removed) is the unhealed row in results.", (
    _c("id", str, "heal id: hash of the unhealed variant and every training setting"),
    _c("model_id", int, "models.id"),
    _c("setup_id", str, "perplexity setup of the unhealed variant"),
    _c("removed", str, KEY_DOC),
    _c("n_removed", int, "number of layers removed"),
    _c("n_layers", int, "number of layers kept"),
    _c("method", str, "lora or qlora"),
    _c("lora_r", int, "LoRA rank"),
    _c("lora_alpha", int, "LoRA alpha"),
    _c("lora_dropout", float, "LoRA dropout"),
    _c("lora_targets", str, "adapted modules"),
    _c("steps", int, "optimizer steps"),
    _c("lr", float, "peak learning rate"),
    _c("batch_size", int, "sequences per step"),
    _c("seq", int, "tokens per sequence"),
    _c("data", str, "healing text"),
    _c("data_fingerprint", str, "hash of the healing tokens"),
    _c("eval_data", str, "held-out text of the eval losses"),
    _c("seed", int, "seed"),
    _c("trainable_params", int, "LoRA parameters trained"),
    _c("heal_loss_before", float, "mean loss on a fixed sample of the healing text, before", "nats", "lower"),
    _c("heal_loss_after", float, "the same, after", "nats", "lower"),
    _c("eval_loss_before", float, "mean loss on held-out text, before", "nats", "lower"),
    _c("eval_loss_after", float, "the same, after", "nats", "lower"),
    _c("ppl_unhealed", float, "perplexity before healing (results.ppl)", better="lower"),
    _c("nll_sum", float, "summed NLL after healing", "nats", "lower"),
    _c("n_tokens", int, "scored tokens"),
    _c("ppl", float, "perplexity after healing, same protocol as results.ppl", better="lower"),
    _c("bpb", float, "bits per byte after healing", "bits/byte", "lower"),
    _c("status", str, STATUS_DOC),
    _c("error", str, "why it failed"),
    _c("train_seconds", float, "training time", "s"),
    _c("export_dir", str, "where the merged model was saved, if it was"),
    _c("settings", str, "JSON of every training setting (what the id hashes)"),
    _c("device", str, "device name"),
    _c("host", str, "host name"),
    _c("measured_at", str, "when (UTC)"),
), primary_key=("id",), foreign_keys=(("model_id", "models", "id"),))

TABLES: tuple[Table, ...] = (META, SCHEMA_MIGRATIONS, MODELS, SETUPS, RESULTS, RUNS, MEASUREMENTS, LAYER_SIMILARITY,
                             GREEDY_STEPS, STRATEGY_CHOICES, SEARCH_CANDIDATES, TASK_SETUPS, TASK_RESULTS, HEALS, WINDOW_LOSSES,
                             PPL_INTERVALS)
"""Every table, in creation order (a table's foreign keys point to tables before it)."""

RESULTS_VS_BASELINE = View("results_vs_baseline", "Each variant against the baseline of its setup: the view to "
                           "query (`sweep.load_results` returns it as a DataFrame).", """
SELECT
    m.name AS model,
    r.setup_id AS setup,
    r.removed,
    r.n_removed,
    r.n_layers,
    r.ppl,
    r.prefill_ms AS speed_ms,
    r.params,
    CASE WHEN r.status IN ('racing', 'eliminated') THEN NULL ELSE 100.0 * (r.ppl / b.ppl - 1.0) END AS ppl_change_pct,
    100.0 * (r.prefill_ms / b.prefill_ms - 1.0) AS speed_change_pct,
    r.status,
    r.error,
    r.bpb,
    r.decode_ms_per_token,
    100.0 * (r.decode_ms_per_token / b.decode_ms_per_token - 1.0) AS decode_change_pct,
    r.params_non_embedding,
    100.0 * (1.0 * r.params / b.params - 1.0) AS params_change_pct,
    r.nll_sum,
    r.n_tokens,
    r.prefill_iqr_ms AS speed_iqr_ms,
    r.prefill_repeats,
    r.latency_from,
    m.revision,
    m.dtype,
    m.n_layers AS model_layers,
    s.data,
    s.max_length,
    s.stride,
    s.max_tokens,
    r.device,
    r.measured_at,
    r.prefill_interval_pct AS speed_interval_pct,
    r.latency_noisy,
    i.low_pct AS ppl_change_low_pct,
    i.high_pct AS ppl_change_high_pct,
    w.n_windows
FROM results r
JOIN setups s ON s.id = r.setup_id
JOIN models m ON m.id = s.model_id
LEFT JOIN results b ON b.setup_id = r.setup_id AND b.removed = '' AND b.status = 'ok'
LEFT JOIN window_losses w ON w.setup_id = r.setup_id AND w.removed = r.removed
LEFT JOIN ppl_intervals i ON i.setup_id = r.setup_id AND i.removed = r.removed AND i.measured_at = r.measured_at
    AND i.baseline_at = b.measured_at
""", (
    _c("model", str, "model name"),
    _c("setup", str, "setup id"),
    _c("removed", str, KEY_DOC),
    _c("n_removed", int, "layers removed"),
    _c("n_layers", int, "layers kept"),
    _c("ppl", float, "perplexity", better="lower"),
    _c("speed_ms", float, "median prefill time at batch 1", "ms", "lower"),
    _c("params", int, "parameters", better="lower"),
    _c("ppl_change_pct", float, "perplexity change against the baseline: 100 (ppl / baseline - 1); NULL for racing "
                                "and eliminated rows, whose perplexity covers only their first n_windows windows",
       "%", "lower"),
    _c("speed_change_pct", float, "prefill time change against the baseline (negative = faster)", "%", "lower"),
    _c("status", str, RESULT_STATUS_DOC),
    _c("error", str, "error text"),
    _c("bpb", float, "bits per byte", "bits/byte", "lower"),
    _c("decode_ms_per_token", float, "median decode time per token", "ms/token", "lower"),
    _c("decode_change_pct", float, "decode time change against the baseline", "%", "lower"),
    _c("params_non_embedding", int, "parameters without embeddings", better="lower"),
    _c("params_change_pct", float, "parameter change against the baseline", "%", "lower"),
    _c("nll_sum", float, "summed NLL", "nats", "lower"),
    _c("n_tokens", int, "scored tokens"),
    _c("speed_iqr_ms", float, "IQR of the prefill timings", "ms"),
    _c("prefill_repeats", int, "timed prefill repeats"),
    _c("latency_from", str, "variant whose latency measurement is shared"),
    _c("revision", str, "hub revision"),
    _c("dtype", str, "weights dtype"),
    _c("model_layers", int, "layers of the full model"),
    _c("data", str, "evaluation text"),
    _c("max_length", int, "window length", "tokens"),
    _c("stride", int, "window stride", "tokens"),
    _c("max_tokens", int, "evaluated prefix (NULL = all)", "tokens"),
    _c("device", str, "device name"),
    _c("measured_at", str, "when (UTC)"),
    _c("speed_interval_pct", float, "half-width of the 95 % interval of the prefill median, in % of it", "%"),
    _c("latency_noisy", int, "1: timings too spread to be trusted as exact (see results.latency_noisy)"),
    _c("ppl_change_low_pct", float, "lower end of the 95 % paired bootstrap interval of ppl_change_pct (over "
                                    "windows; table ppl_intervals)", "%"),
    _c("ppl_change_high_pct", float, "upper end of that interval: both ends on one side of 0 = a real change", "%"),
    _c("n_windows", int, "scored windows its numbers cover (table window_losses; NULL: not stored)"),
))

VIEWS: tuple[View, ...] = (RESULTS_VS_BASELINE,)

TABLE_BY_NAME = {t.name: t for t in TABLES}
RESULT_COLUMNS: dict[str, type] = RESULTS.types
TASK_RESULT_COLUMNS: dict[str, type] = TASK_RESULTS.types
HEAL_COLUMNS: dict[str, type] = HEALS.types

MIGRATIONS: dict[int, str] = {
    2: "every table and view created at open; application_id marks the file; upgrades recorded here",
    3: "runs.process_start: a run whose process is alive on this host is alive, a reused pid is not; results: "
       "prefill_interval_pct, decode_interval_pct and latency_noisy (how far to trust a timing); "
       "results_vs_baseline: speed_interval_pct and latency_noisy",
    4: "window_losses (per-window NLL and tokens of each result, arrays as BLOBs) and ppl_intervals (paired "
       "bootstrap interval of each perplexity change); results_vs_baseline: ppl_change_low_pct, ppl_change_high_pct "
       "and n_windows; statuses racing and eliminated (--race)",
    5: "search_candidates: every candidate --strategy search scored (its per-window values, so a killed search "
       "resumes); strategy_choices gains the strategies search, search-attn, search-mlp, search-mix",
}
"""Schema version -> what upgrading to it changes (recorded in ``schema_migrations`` when applied)."""


# ---------------------------------------------------------------------------------------------- DDL


def create_table_sql(table: Table) -> str:
    """``CREATE TABLE IF NOT EXISTS`` of ``table``.

    Example: META -> ``CREATE TABLE IF NOT EXISTS "meta" ("key" TEXT, "value" TEXT, PRIMARY KEY ("key"))``.
    """
    parts = []
    for column in table.columns:
        if table.integer_id and column.name == "id":
            parts.append('"id" INTEGER PRIMARY KEY')
        else:
            parts.append(f'"{column.name}" {SQL_TYPES[column.type]}')
    if table.primary_key and not table.integer_id:
        parts.append("PRIMARY KEY (" + ", ".join(f'"{c}"' for c in table.primary_key) + ")")
    for column, other, other_column in table.foreign_keys:
        parts.append(f'FOREIGN KEY ("{column}") REFERENCES "{other}"("{other_column}")')
    return f'CREATE TABLE IF NOT EXISTS "{table.name}" (' + ", ".join(parts) + ")"


def create_index_sql(table: Table) -> list[str]:
    return [f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS "{name}" ON "{table.name}" ('
            + ", ".join(f'"{c}"' for c in columns) + ")" for name, columns, unique in table.indexes]


def create_view_sql(view: View) -> str:
    return f'CREATE VIEW IF NOT EXISTS "{view.name}" AS {view.select.strip()}'


def ddl() -> list[str]:
    """Every statement that creates the current schema in an empty file (idempotent: IF NOT EXISTS)."""
    statements = []
    for table in TABLES:
        statements.append(create_table_sql(table))
        statements += create_index_sql(table)
    return statements + [create_view_sql(v) for v in VIEWS]


# ---------------------------------------------------------------------------------------------- docs


def _doc_cell(column: Column) -> str:
    return column.description.replace("|", "\\|")


def _columns_table(columns: tuple[Column, ...]) -> list[str]:
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{c.name}` | {SQL_TYPES[c.type]} | {_doc_cell(c)} |" for c in columns]
    return lines


def schema_markdown() -> str:
    """The reference page docs/schema.md, generated from :data:`TABLES` and :data:`VIEWS`."""
    lines = ["# results.db schema", "",
             f"Generated from `sweep/store/schema.py` (schema version {SCHEMA_VERSION}) by `make docs`; do not edit.",
             "", "Every measurement is a row the moment it is measured; failures are rows too (`status`, `error`).",
             "Query the view `results_vs_baseline` first: it joins each variant with its model, setup and baseline.",
             ""]
    for view in VIEWS:
        lines += [f"## View `{view.name}`", "", view.doc, "", *_columns_table(view.columns), "",
                  "```sql", f"CREATE VIEW {view.name} AS", view.select.strip(), "```", ""]
    for table in TABLES:
        key = ("primary key `id`" if table.integer_id else
               "primary key (" + ", ".join(f"`{c}`" for c in table.primary_key) + ")")
        refs = "".join(f"; `{c}` references `{t}.{tc}`" for c, t, tc in table.foreign_keys)
        lines += [f"## Table `{table.name}`", "", f"{table.doc} ({key}{refs})", "", *_columns_table(table.columns), ""]
    lines += ["## Versions", "", "| version | change |", "| --- | --- |", "| 1 | the first release |"]
    lines += [f"| {v} | {text} |" for v, text in sorted(MIGRATIONS.items())]
    return "\n".join(lines) + "\n"

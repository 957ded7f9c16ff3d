"""The one configuration object of a sweep, and how presets and flags build it.

Precedence: dataclass defaults < YAML preset (``--config``) < command-line flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sweep.errors import ConfigError, UnknownNameError
from sweep.steps import UNITS

DTYPES = ("auto", "float32", "bfloat16", "float16")
LATENCY_MODES = ("shared", "per-variant", "off")
ENGINES = ("trie", "per-variant")
BACKENDS = ("loky", "dask")
COMPILE_MODES = ("auto", "on", "off")
HEADS = ("auto", "online", "chunked", "fused")
FITNESSES = ("ppl", "kl")
CPU_BATCH_SIZE = 8
"""Windows per forward pass on CPU when --batch-size is 0 (auto)."""
DEFAULT_CACHE_DIR = ".cache/sweep"
"""The default --cache-dir, relative to the working directory (the user's cache directory if that is read-only)."""


def batch_size_or_default(cfg: "SweepConfig") -> int:
    """``--batch-size`` where it is fixed; :data:`CPU_BATCH_SIZE` for auto where no memory probe is made."""
    return cfg.batch_size or CPU_BATCH_SIZE


MEASURING = ("run", "plan", "similarity")
"""The commands that offer every field of a measured setup as a flag."""
GROUPS: dict[str, tuple[str, ...]] = {
    "model": MEASURING + ("export", "tasks", "heal"),  # the model and how it loads
    "setup": MEASURING + ("heal",),  # text, windows, engine, racing, latency, calibration, workers: so heals link
    "common": MEASURING + ("tasks", "heal"),  # batches, the DB, the seed
    "strategy": MEASURING + ("tasks",),  # which variants the strategies plan (`sweep tasks` measures them)
    "remove": MEASURING + ("tasks", "heal"),  # explicit variants (`sweep heal`: the one it heals)
    "edits": MEASURING,  # what the removal strategies remove (and how much: --budget-params); where order edits go
    "search": MEASURING,  # how --strategy search scores and selects
    "angular": MEASURING + ("heal",),  # --allow-last: read by the plan, offered by heal like the setup
    "tasks": ("tasks", "heal"),  # lm-evaluation-harness settings
    "choose": ("tasks",),  # which measured variants `sweep tasks` evaluates
    "heal": ("heal",),  # LoRA healing
}
"""Field group -> the commands whose flags offer its fields. Each field names its group (:func:`setting`)."""
PLAN_GROUPS = ("strategy", "remove", "edits", "angular")
"""The groups of :class:`PlanSpec`: the settings :mod:`sweep.plan` reads."""


def setting(default: Any, group: str) -> Any:
    """A field of :class:`SweepConfig`: its default and its group (a key of :data:`GROUPS`)."""
    if group not in GROUPS:
        raise ValueError(f"unknown field group {group!r}; groups: {', '.join(GROUPS)}")
    return dataclasses.field(default=default, metadata={"group": group})


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep. Every field has a default and a group (:func:`setting`), and is settable from
    YAML or a flag."""

    model: str = setting("gpt2", "model")
    """Hugging Face hub id or local directory of a causal LM."""
    revision: str | None = setting(None, "model")
    """Hub revision (branch, tag or commit); ignored for local directories."""
    dtype: str = setting("auto", "model")
    """Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    device: str = setting("auto", "model")
    """auto (first CUDA GPU if any, else CPU), cpu, cuda or cuda:N."""
    tokenizer: str | None = setting(None, "model")
    """Tokenizer hub id or directory when it is not saved with the model."""
    random_init: bool = setting(False, "model")
    """Build the model from its config with random weights (timing and shape studies; no weights needed)."""
    trust_remote_code: bool = setting(False, "model")
    """Allow model code from the hub (needed by a few architectures)."""

    data: str = setting("Salesforce/wikitext", "setup")
    """Evaluation text: hub dataset id, or a local .parquet/.txt/.jsonl file or saved dataset directory."""
    data_config: str | None = setting("wikitext-2-raw-v1", "setup")
    """Hub dataset configuration name (only for hub datasets)."""
    split: str = setting("test", "setup")
    """Dataset split to evaluate on."""
    text_column: str = setting("text", "setup")
    """Column holding the text; rows are joined with blank lines ("\\n\\n") as in the transformers guide."""
    max_length: int | None = setting(None, "setup")
    """Tokens per evaluation window; default min(model context, 1024)."""
    stride: int | None = setting(None, "setup")
    """Tokens the window advances by; default = max_length (non-overlapping windows)."""
    max_tokens: int | None = setting(None, "setup")
    """Evaluate only the first N tokens of the text (recorded with the result); None = all."""
    batch_size: int = setting(0, "common")
    """Evaluation windows per forward pass; 0 = auto (from free GPU memory, trie cache included; 8 on CPU)."""
    head: str = setting("auto", "setup")
    """LM head + loss: online (log-sum-exp over vocabulary blocks, no logits tensor), chunked (4,096-row logits, compiled per --compile), fused (liger-kernel; CUDA), auto (online on CPU, chunked on CUDA)."""
    compile: str = setting("auto", "setup")
    """torch.compile the chunked LM head + loss (fused, no float32 copy of the logits): auto (on CUDA), on, off."""
    compile_layers: bool = setting(False, "setup")
    """torch.compile every decoder layer (a GPU lever: fewer kernel launches; compiled once per window shape)."""
    engine: str = setting("trie", "setup")
    """trie (variants share the computation of common leading layers) or per-variant (the plain reference)."""

    strategy: str = setting("single", "strategy")
    """Comma-separated strategy names, their variants combined (the help lists them: :data:`sweep.plan.STRATEGIES`)."""
    k: str = setting("2", "strategy")
    """Subset sizes for `combinations`, e.g. 2 or 1-3."""
    n: str = setting("1-4", "strategy")
    """Sizes for last-n, blocks, angular (block sizes), block-influence and greedy (layers removed), e.g. 1-4."""
    remove: str | None = setting(None, "remove")
    """Explicit variants for `explicit`, separated by ';': layer lists or variant keys, e.g. "1,3;a2,m5;r3"."""
    force: bool = setting(False, "strategy")
    """Allow exhaustive plans on more than 16 layers."""
    budget_params: str | None = setting(None, "edits")
    """Sizes of `search` as fractions of all parameters, e.g. 0.1579,0.2105: a candidate removes at least that much (instead of the --n counts), so mixed units compare with blocks at an equal size."""
    fitness: str = setting("ppl", "search")
    """What `search` minimises on the calibration text (never the test text): ppl (calibration perplexity) or kl (KL divergence to the full model's next-token distribution)."""
    search_budget: int | None = setting(None, "search")
    """Calibration tokens `search` may spend per size (a token scored for one candidate counts once); default 2 x units removed x units full calibration passes."""
    search_level: float = setting(0.95, "search")
    """Coverage of the paired interval over calibration windows that drops a `search` offspring worse than the leader."""
    race: bool = setting(False, "setup")
    """Race the variants of `exhaustive` / `combinations`: all are measured on a first slice of the windows, and only those that can still be among the --race-k best per number of removed layers go on, until they have seen the whole text (docs/racing.md)."""
    race_k: int = setting(3, "setup")
    """Racing keeps every variant that can still be among this many best per number of removed layers."""
    race_slices: str = setting("1/16,1/8,1/4,1/2", "setup")
    """Fractions of the windows after which the race eliminates (each at least 16 windows, a multiple of the batch); survivors then see the whole text."""
    resamples: int = setting(2000, "setup")
    """Bootstrap resamples of the paired intervals over windows (the view's ppl_change_low/high_pct, the report, --race); 2,000 puts 50 resamples in each 2.5-percent tail (sweep/intervals.py says why)."""
    race_level: float = setting(0.99, "setup")
    """Coverage of the paired bootstrap interval that eliminates: a variant goes when it is worse than each of the --race-k leaders of its size at this level."""
    unit: str = setting("block", "edits")
    """What the removal strategies remove: block (whole layers), attn (attention branches), mlp (MLP branches) or mix (both kinds)."""
    span: str | None = setting(None, "edits")
    """Block lengths of the order strategies, e.g. 1-2; default: repeat 1, reverse 3, parallel 2 (swap: always 2)."""
    positions: str | None = setting(None, "edits")
    """First layers of the blocks the order strategies edit, e.g. 3,5-7; default: every middle layer (1 to L-2)."""

    latency: str = setting("shared", "setup")
    """shared (measure once per shape signature and reuse), per-variant, or off."""
    latency_seq: int = setting(128, "setup")
    """Prompt length (tokens, batch 1) of the prefill latency measurement."""
    latency_repeats: int = setting(5, "setup")
    """Least timed repeats per latency measurement; more are taken until the median is stable (median, IQR, interval stored)."""
    latency_max_repeats: int = setting(50, "setup")
    """Most timed repeats per latency measurement: a median still unstable then is stored and flagged noisy."""
    latency_precision: float = setting(0.03, "setup")
    """A median is stable once its 95-percent bootstrap interval lies within this fraction of it (0.03: 3 percent); wider ones are flagged noisy."""
    latency_budget: float = setting(20.0, "setup")
    """Seconds the latency phase may run: beyond the least count, a round starts only if it would end within them (unstable medians are flagged noisy)."""
    latency_warmup: int = setting(1, "setup")
    """Untimed warm-up repeats before timing."""
    latency_threads: int = setting(1, "setup")
    """CPU threads while timing latency (1: reproducible medians; 0: torch's default, every core); ignored on GPU."""
    decode_tokens: int = setting(16, "setup")
    """Tokens generated greedily with the KV cache for decode latency (0 disables)."""

    db: str = setting("results.db", "common")
    """SQLite file that receives every result as soon as it is measured."""
    cache_dir: str = setting(DEFAULT_CACHE_DIR, "setup")
    """Where tokenized text is cached between runs (default: ~/.cache/sweep instead when the working directory is read-only)."""
    seed: int = setting(0, "common")
    """Seed for anything random (latency prompts)."""

    # Similarity-guided and greedy planners: calibration text distinct from the evaluation split.
    calib_data: str = setting("Salesforce/wikitext", "setup")
    """Calibration text for `sweep similarity` and the angular, block-influence and greedy strategies (like --data)."""
    calib_data_config: str | None = setting("wikitext-2-raw-v1", "setup")
    """Hub dataset configuration of the calibration text (only for hub datasets)."""
    calib_split: str = setting("validation", "setup")
    """Split of the calibration text; keep it distinct from the evaluation --split."""
    calib_max_tokens: int | None = setting(32768, "setup")
    """Calibration tokens used (cut into --max-length windows); `null` in a preset = all."""
    angular_tokens: str = setting("last", "setup")
    """Which tokens the `angular` strategy averages d(l, n) over: last (Gromov et al., PruneMe) or all."""
    allow_last: bool = setting(False, "angular")
    """Let the `angular` strategy remove a block that includes the final layer."""
    # ---- downstream tasks (`sweep tasks`) and LoRA healing (`sweep heal`); not flags of run/plan
    tasks: str = setting("boolq,lambada_openai,lambada_standard,arc_easy", "tasks")
    """Comma-separated lm-evaluation-harness task names for `sweep tasks` (any lm-eval task, e.g. mmlu)."""
    task_include: str | None = setting(None, "tasks")
    """Directory of extra lm-eval task YAML files (custom or local tasks), added to lm-eval's own."""
    num_fewshot: int = setting(0, "tasks")
    """Few-shot examples in each task prompt."""
    limit: int | None = setting(None, "tasks")
    """Evaluate only the first N examples of each task (quick runs; part of the task setup id)."""
    best: int | None = setting(None, "choose")
    """`sweep tasks`: the K lowest-perplexity variants per number of removed layers, read from --db."""
    pareto: bool = setting(False, "choose")
    """`sweep tasks`: the variants on the parameters/perplexity Pareto front, read from --db."""
    lora_r: int = setting(16, "heal")
    """LoRA rank of `sweep heal`."""
    lora_alpha: int = setting(32, "heal")
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = setting(0.05, "heal")
    """Dropout on the LoRA input during healing."""
    lora_targets: str | None = setting(None, "heal")
    """Comma-separated module names LoRA adapts; default every attention and MLP projection of the family."""
    heal_steps: int = setting(200, "heal")
    """Optimizer steps of the LoRA heal."""
    heal_lr: float = setting(2e-4, "heal")
    """Peak learning rate of the LoRA heal (AdamW; linear warm-up over the first tenth of the steps, then constant)."""
    heal_batch_size: int = setting(4, "heal")
    """Sequences per healing step."""
    heal_seq: int = setting(256, "heal")
    """Tokens per healing sequence."""
    heal_data: str = setting("Salesforce/wikitext", "heal")
    """Healing text: hub dataset id or local .parquet/.txt/.jsonl file (as --data)."""
    heal_data_config: str | None = setting("wikitext-2-raw-v1", "heal")
    """Hub configuration of --heal-data."""
    heal_split: str = setting("train", "heal")
    """Split of --heal-data trained on."""
    heal_eval_split: str = setting("validation", "heal")
    """Split of --heal-data whose loss is logged before, during and after healing (held out)."""
    heal_eval_batches: int = setting(8, "heal")
    """Held-out batches (of --heal-batch-size sequences) in each evaluation loss."""
    heal_eval_every: int = setting(50, "heal")
    """Steps between held-out evaluation losses during healing."""
    heal_tasks: bool = setting(False, "heal")
    """`sweep heal`: also evaluate --tasks on the base, pruned and healed model."""
    qlora: bool = setting(False, "heal")
    """Heal with QLoRA (4-bit base weights; needs CUDA and bitsandbytes)."""
    workers: int | None = setting(None, "setup")
    """Worker processes, each pinned to one device; default: number of visible GPUs, 1 on CPU (in-process)."""
    backend: str = setting("loky", "setup")
    """Where workers run: loky (local processes) or dask (an existing Dask cluster, see --scheduler)."""
    scheduler: str | None = setting(None, "setup")
    """Dask scheduler address for --backend dask, e.g. tcp://10.0.0.5:8786."""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: SweepConfig) -> None:
    """Check values that make no sense on their own; errors name the flag.

    Raises:
        ConfigError: naming the offending ``--flag``.
    """
    if cfg.dtype not in DTYPES:
        raise UnknownNameError("--dtype", cfg.dtype, DTYPES)
    if cfg.engine not in ENGINES:
        raise UnknownNameError("--engine", cfg.engine, ENGINES)
    if cfg.latency not in LATENCY_MODES:
        raise UnknownNameError("--latency mode", cfg.latency, LATENCY_MODES)
    for name in ("max_length", "stride", "max_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"`--{flag(name)}` must be a positive integer, got {value}")
    if cfg.max_length == 1:  # its only token has no context: every window would score nothing
        raise ConfigError("`--max-length` must be at least 2: a window of one token scores no token")
    if cfg.batch_size < 0:
        raise ConfigError(f"`--batch-size` must be 0 (auto) or a positive integer, got {cfg.batch_size}")
    if cfg.compile not in COMPILE_MODES:
        raise UnknownNameError("--compile", cfg.compile, COMPILE_MODES)
    if cfg.head not in HEADS:
        raise UnknownNameError("--head", cfg.head, HEADS)
    _validate_latency(cfg)
    if cfg.max_length and cfg.stride and cfg.stride > cfg.max_length:
        raise ConfigError(
            f"`--stride` ({cfg.stride}) is larger than `--max-length` ({cfg.max_length}): tokens would be skipped"
        )
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise UnknownNameError("--device", cfg.device, ("auto", "cpu", "cuda", "cuda:N"))
    if cfg.unit not in UNITS:
        raise UnknownNameError("--unit", cfg.unit, UNITS)
    _validate_similarity(cfg)
    validate_tasks_and_heal(cfg)
    _validate_parallel(cfg)
    _validate_race(cfg)


MIN_LATENCY_REPEATS = 5
"""Fewer timed repeats give no usable interval of the median (a bootstrap of 4 samples has 4 possible medians)."""


def _validate_latency(cfg: SweepConfig) -> None:
    """Checks of the latency fields; errors name the flag."""
    for name in ("latency_seq", "latency_repeats", "latency_max_repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"`--{flag(name)}` must be a positive integer, got {getattr(cfg, name)}")
    for name in ("decode_tokens", "latency_warmup", "latency_threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"`--{flag(name)}` must be 0 or more, got {getattr(cfg, name)}")
    if cfg.latency == "off":
        return
    if cfg.latency_repeats < MIN_LATENCY_REPEATS:
        raise ConfigError(f"`--latency-repeats` must be at least {MIN_LATENCY_REPEATS}, got {cfg.latency_repeats}")
    if cfg.latency_max_repeats < cfg.latency_repeats:
        raise ConfigError(f"`--latency-max-repeats` ({cfg.latency_max_repeats}) is below `--latency-repeats` "
                          f"({cfg.latency_repeats})")
    if not 0.0 < cfg.latency_precision < 1.0:
        raise ConfigError(f"`--latency-precision` must be in (0, 1), got {cfg.latency_precision}")
    if not cfg.latency_budget >= 0.0:
        raise ConfigError(f"`--latency-budget` must be 0 or more seconds, got {cfg.latency_budget}")


ANGULAR_TOKENS = ("last", "all")


def _validate_similarity(cfg: SweepConfig) -> None:
    """Checks of the calibration / similarity fields."""
    if cfg.angular_tokens not in ANGULAR_TOKENS:
        raise UnknownNameError("--angular-tokens", cfg.angular_tokens, ANGULAR_TOKENS)
    if cfg.calib_max_tokens is not None and cfg.calib_max_tokens < 2:
        raise ConfigError(f"`--calib-max-tokens` must be at least 2, got {cfg.calib_max_tokens}")


def validate_tasks_and_heal(cfg: "SweepConfig") -> None:
    """Checks of the `sweep tasks` / `sweep heal` fields; errors name the flag.

    Raises:
        ConfigError: naming the offending ``--flag``.
    """
    for name in ("lora_r", "lora_alpha", "heal_steps", "heal_batch_size", "heal_seq", "heal_eval_batches",
                 "heal_eval_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"`--{flag(name)}` must be a positive integer, got {getattr(cfg, name)}")
    for name in ("limit", "best"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"`--{flag(name)}` must be a positive integer, got {getattr(cfg, name)}")
    if cfg.num_fewshot < 0:
        raise ConfigError(f"`--num-fewshot` must be 0 or more, got {cfg.num_fewshot}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"`--lora-dropout` must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.heal_lr > 0.0:
        raise ConfigError(f"`--heal-lr` must be positive, got {cfg.heal_lr}")
    if not [t for t in cfg.tasks.split(",") if t.strip()]:
        raise ConfigError("`--tasks` names no task; give e.g. --tasks boolq,arc_easy")


def _validate_parallel(cfg: SweepConfig) -> None:
    """--workers, --backend, --scheduler."""
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"`--workers` must be a positive integer, got {cfg.workers}")
    if cfg.backend not in BACKENDS:
        raise UnknownNameError("--backend", cfg.backend, BACKENDS)
    if cfg.backend == "dask" and not cfg.scheduler:
        raise ConfigError("`--backend dask` needs `--scheduler tcp://HOST:PORT` (the address `dask scheduler` prints)")
    if cfg.scheduler and cfg.backend != "dask":
        raise ConfigError("`--scheduler` is only used with `--backend dask`")


RACE_STRATEGIES = ("exhaustive", "combinations")
"""The strategies ``--race`` races: :func:`sweep.plan.race_strategies` (the registry's ``races``), restated here
because the config sits below the plan; tests/test_strategy_registry.py checks that they agree."""
MIN_RESAMPLES = 200
"""Fewer bootstrap resamples leave a 99-percent interval's tails on one or two resamples each."""


def race_fractions(text: str) -> list[float]:
    """``--race-slices`` as ascending fractions in (0, 1): ``"1/16,1/8,0.25"`` -> [0.0625, 0.125, 0.25].

    Raises:
        ConfigError: a part that is not a fraction in (0, 1), or no fraction at all.
    """
    fractions = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            top, _, bottom = part.partition("/")
            value = float(top) / float(bottom) if bottom else float(top)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"`--race-slices` takes fractions like 1/16,1/8,0.25; got {part!r}") from None
        if not 0.0 < value < 1.0:
            raise ConfigError(f"`--race-slices` fractions must be in (0, 1), got {part!r}")
        fractions.append(value)
    if not fractions:
        raise ConfigError("`--race-slices` names no fraction; give e.g. 1/16,1/8,1/4,1/2")
    return sorted(set(fractions))


def _validate_race(cfg: SweepConfig) -> None:
    """--race and its settings; racing needs a plan of many variants per size, measured in this process."""
    race_fractions(cfg.race_slices)
    if cfg.resamples < MIN_RESAMPLES:
        raise ConfigError(f"`--resamples` must be at least {MIN_RESAMPLES}, got {cfg.resamples}")
    if cfg.race_k < 1:
        raise ConfigError(f"`--race-k` must be a positive integer, got {cfg.race_k}")
    if cfg.fitness not in FITNESSES:
        raise UnknownNameError("--fitness", cfg.fitness, list(FITNESSES))
    if not 0.5 <= cfg.search_level < 1.0:
        raise ConfigError(f"`--search-level` must be in [0.5, 1), got {cfg.search_level}")
    if cfg.search_budget is not None and cfg.search_budget < 1:
        raise ConfigError(f"`--search-budget` must be at least 1 token, got {cfg.search_budget}")
    if not 0.5 <= cfg.race_level < 1.0:
        raise ConfigError(f"`--race-level` must be in [0.5, 1), got {cfg.race_level}")
    if not cfg.race:
        return
    strategies = {s.strip() for s in cfg.strategy.split(",") if s.strip()}
    if not strategies <= set(RACE_STRATEGIES):
        raise ConfigError(f"`--race` races `--strategy exhaustive` or `combinations`, not {cfg.strategy}")
    if (cfg.workers or 1) > 1 or cfg.backend == "dask":
        raise ConfigError("`--race` measures in one process: leave out `--workers` / `--backend dask`")
    if cfg.latency == "per-variant":
        raise ConfigError("`--race` times latency per shape signature: use `--latency shared` or `off`")


def group_fields(*groups: str) -> tuple[str, ...]:
    """The fields of ``groups``, in the order of :class:`SweepConfig`."""
    return tuple(f.name for f in fields(SweepConfig) if f.metadata["group"] in groups)


def command_fields(command: str) -> tuple[str, ...]:
    """The fields the flags of ``sweep COMMAND`` offer (:data:`GROUPS`): ``command_fields("export")`` is the model's."""
    return group_fields(*(group for group, commands in GROUPS.items() if command in commands))


def default(name: str) -> Any:
    """The default of field ``name``, for settings that other modules hold under their own names."""
    return SweepConfig.__dataclass_fields__[name].default


PLAN_SPEC_DOC = """The plan settings: the fields of :data:`PLAN_GROUPS` with the config's defaults, a view of
SweepConfig so that :mod:`sweep.plan` reads these, never the whole config."""
PlanSpec = dataclasses.make_dataclass(
    "PlanSpec", [(f.name, f.type, dataclasses.field(default=f.default)) for f in fields(SweepConfig)
                 if f.metadata["group"] in PLAN_GROUPS],
    frozen=True, namespace={"__module__": __name__, "__doc__": PLAN_SPEC_DOC})


def plan_spec(cfg: SweepConfig) -> PlanSpec:
    """The plan settings of ``cfg``."""
    return PlanSpec(**{name: getattr(cfg, name) for name in group_fields(*PLAN_GROUPS)})


def flag(name: str) -> str:
    """Field name -> flag spelling: ``max_length`` -> ``max-length``."""
    return name.replace("_", "-")


def field_names() -> list[str]:
    return [f.name for f in fields(SweepConfig)]


def field_docs() -> dict[str, str]:
    """One-line help of each field, parsed from the docstrings under the fields in this file."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(SweepConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset into a dict of field overrides (keys may use dashes or underscores).

    Raises:
        ConfigError: the file is missing or malformed, or a key is not a config field.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        presets = sorted(p.stem for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        raise ConfigError(f"preset {str(path)!r} not found" + (f"; presets in configs/: {', '.join(presets)}" if presets else ""))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of config keys to values, got {type(raw).__name__}")
    overrides = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in field_names():
            raise UnknownNameError(f"key in {path}:", str(key), [flag(n) for n in field_names()])
        overrides[name] = value
    return overrides


def build_config(preset: str | Path | None = None, **flags: Any) -> SweepConfig:
    """Defaults < preset < flags (flags whose value is None are treated as not given).

    Raises:
        ConfigError: bad preset or bad value (a value of the wrong type, or null for a field that needs one,
            names the key and the preset).
    """
    values: dict[str, Any] = {}
    if preset:
        values = {name: _coerce(name, value, f"`{name}` in {preset}") for name, value in load_preset(preset).items()}
    values.update({k: _coerce(k, v, f"`--{flag(k)}`") for k, v in flags.items() if v is not None})
    return SweepConfig(**values)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _coerce(name: str, value: Any, where: str) -> Any:
    """A preset or flag value checked against the field's type, converting only what loses nothing.

    YAML gives ints for string fields (``k: 2`` -> "2") and strings for numbers (``max_length: "64"`` -> 64);
    booleans may be written yes/no/true/false/on/off/1/0. Anything else of the wrong type is refused rather than
    guessed: ``max_length: 64.9`` is not 64, ``force: maybe`` is not False, and ``device: null`` is not a device.

    Raises:
        ConfigError: naming ``where`` (the flag, or the key and its preset) and the expected type.
    """
    field = next(f for f in fields(SweepConfig) if f.name == name)
    kind = field.type.split(" ")[0]  # "int", "str", "bool" or "float" ("int | None" -> "int")
    if value is None:
        if "None" in field.type:
            return None
        raise ConfigError(f"{where} cannot be null: `--{flag(name)}` needs a {kind} value "
                          f"(leave the key out for the default, {field.default!r})")
    converted = _converted(kind, value)
    if converted is None:
        raise ConfigError(f"{where} expects {kind}{_KIND_HINTS.get(kind, '')}, got {value!r}")
    return converted


_KIND_HINTS = {"int": " (a whole number)", "bool": " (true or false)", "float": " (a number)", "str": " (text)"}


def _converted(kind: str, value: Any) -> Any:
    """``value`` as ``kind`` when that is lossless and unambiguous, else None."""
    if isinstance(value, (list, dict)):
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    if isinstance(value, bool):  # True is not 1 here, nor "True" a strategy name
        return None
    if kind == "int":
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return str(value) if isinstance(value, (str, int, float)) else None


def replace(cfg: SweepConfig, **changes: Any) -> SweepConfig:
    return dataclasses.replace(cfg, **changes)


__all__ = ["SweepConfig", "PlanSpec", "build_config", "command_fields", "default", "load_preset", "field_names",
           "field_docs", "flag", "plan_spec", "replace"]

"""The one configuration object of a sweep, and how presets and flags build it.

Precedence: dataclass defaults < YAML preset (``--config``) < command-line flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sweep.errors import ConfigError, UnknownNameError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LATENCY_MODES = ("shared", "per-variant", "off")
ENGINES = ("trie", "per-variant")
BACKENDS = ("loky", "dask")


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep. Every field has a default and is settable from YAML or a flag."""

    model: str = "gpt2"
    """Hugging Face hub id or local directory of a causal LM."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (first CUDA GPU if any, else CPU), cpu, cuda or cuda:N."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory when it is not saved with the model."""
    random_init: bool = False
    """Build the model from its config with random weights (timing and shape studies; no weights needed)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (needed by a few architectures)."""

    data: str = "Salesforce/wikitext"
    """Evaluation text: hub dataset id, or a local .parquet/.txt/.jsonl file or saved dataset directory."""
    data_config: str | None = "wikitext-2-raw-v1"
    """Hub dataset configuration name (only for hub datasets)."""
    split: str = "test"
    """Dataset split to evaluate on."""
    text_column: str = "text"
    """Column holding the text; rows are joined with blank lines ("\\n\\n") as in the transformers guide."""
    max_length: int | None = None
    """Tokens per evaluation window; default min(model context, 1024)."""
    stride: int | None = None
    """Tokens the window advances by; default = max_length (non-overlapping windows)."""
    max_tokens: int | None = None
    """Evaluate only the first N tokens of the text (recorded with the result); None = all."""
    batch_size: int = 8
    """Evaluation windows per forward pass."""
    engine: str = "trie"
    """trie (variants share the computation of common leading layers) or per-variant (the plain reference)."""

    strategy: str = "single"
    """Comma-separated removal strategies: single, combinations, exhaustive, last-n, blocks, explicit."""
    k: str = "2"
    """Subset sizes for `combinations`, e.g. 2 or 1-3."""
    n: str = "1-4"
    """Block sizes for `last-n` and `blocks`, e.g. 1-4."""
    remove: str | None = None
    """Explicit removals for `explicit`: layer lists separated by ';', e.g. "1,3;2,3,4"."""
    force: bool = False
    """Allow exhaustive plans on more than 16 layers."""

    latency: str = "shared"
    """shared (measure once per shape signature and reuse), per-variant, or off."""
    latency_seq: int = 128
    """Prompt length (tokens, batch 1) of the prefill latency measurement."""
    latency_repeats: int = 20
    """Timed repeats per latency measurement (median and IQR are stored)."""
    latency_warmup: int = 3
    """Untimed warm-up repeats before timing."""
    decode_tokens: int = 32
    """Tokens generated greedily with the KV cache for decode latency (0 disables)."""

    db: str = "results.db"
    """SQLite file that receives every result as soon as it is measured."""
    cache_dir: str = ".cache/sweep"
    """Where tokenized text is cached between runs."""
    seed: int = 0
    """Seed for anything random (latency prompts)."""

    workers: int | None = None
    """Worker processes, each pinned to one device; default: number of visible GPUs, 1 on CPU (in-process)."""
    backend: str = "loky"
    """Where workers run: loky (local processes) or dask (an existing Dask cluster, see --scheduler)."""
    scheduler: str | None = None
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
    for name in ("batch_size", "latency_seq", "latency_repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"`--{flag(name)}` must be a positive integer, got {getattr(cfg, name)}")
    for name in ("decode_tokens", "latency_warmup"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"`--{flag(name)}` must be 0 or more, got {getattr(cfg, name)}")
    if cfg.latency_repeats < 20 and cfg.latency != "off":
        # Median and IQR of fewer repeats are too noisy to compare variants.
        raise ConfigError(f"`--latency-repeats` must be at least 20, got {cfg.latency_repeats}")
    if cfg.max_length and cfg.stride and cfg.stride > cfg.max_length:
        raise ConfigError(
            f"`--stride` ({cfg.stride}) is larger than `--max-length` ({cfg.max_length}): tokens would be skipped"
        )
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise UnknownNameError("--device", cfg.device, ("auto", "cpu", "cuda", "cuda:N"))
    _validate_parallel(cfg)


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
        ConfigError: bad preset or bad value.
    """
    values: dict[str, Any] = load_preset(preset) if preset else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    types = {f.name: f.type for f in fields(SweepConfig)}
    for name, value in values.items():
        values[name] = _coerce(name, value, types[name])
    return SweepConfig(**values)


def _coerce(name: str, value: Any, type_text: str) -> Any:
    """YAML may give ints for string fields (``k: 2``) and strings for numbers; normalise to the field type."""
    if value is None:
        return None
    try:
        if type_text.startswith("int"):
            return int(value)
        if type_text.startswith("bool"):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if type_text.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`--{flag(name)}` expects {type_text.split(' ')[0]}, got {value!r}") from None
    return value


def replace(cfg: SweepConfig, **changes: Any) -> SweepConfig:
    return dataclasses.replace(cfg, **changes)


__all__ = ["SweepConfig", "build_config", "load_preset", "field_names", "field_docs", "flag", "replace"]

"""Evaluation text: load (hub dataset or local file), join rows, tokenize once, cache the token ids; and the
evaluation windows resolved against the model."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sweep.config import DEFAULT_CACHE_DIR, SweepConfig
from sweep.errors import ConfigError, DataError

LOCAL_SUFFIXES = (".parquet", ".txt", ".jsonl", ".json")


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of the evaluation text and what identifies them."""

    ids: np.ndarray
    """(N,) int64 token ids of the whole text (before any --max-tokens cap)."""
    n_bytes: int
    """UTF-8 bytes of the text, for bits per byte."""
    fingerprint: str
    """Hash of the text and the tokenizer: equal fingerprints mean identical token ids."""
    name: str
    """Human-readable data description, e.g. ``Salesforce/wikitext:wikitext-2-raw-v1:test``."""


def describe(data: str, data_config: str | None, split: str) -> str:
    if _is_local(data):
        return str(data)
    return ":".join(x for x in (data, data_config, split) if x)


def _is_local(data: str) -> bool:
    return Path(data).expanduser().exists() or data.startswith((".", "/", "~")) or data.endswith(LOCAL_SUFFIXES)


def load_text(data: str, data_config: str | None = None, split: str = "test", text_column: str = "text") -> str:
    """Rows of the dataset joined with blank lines, as in the transformers perplexity guide.

    Raises:
        DataError: missing file, unknown format, missing column, no network for a hub dataset, or empty text.
    """
    rows = _load_local_rows(data, split, text_column) if _is_local(data) else _load_hub_rows(
        data, data_config, split, text_column)
    text = "\n\n".join(rows)
    if not text.strip():
        raise DataError(f"--data {data}: the text is empty")
    return text


def _load_local_rows(data: str, split: str, text_column: str) -> list[str]:
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data {data}: no such file or directory")
    if path.suffix == ".txt":
        # A plain text file is one document: no row joining.
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".parquet":
        return _parquet_rows(path, text_column, data)
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"--data {data}: no split {split!r}; splits: {', '.join(ds)}")
                ds = ds[split]
        elif path.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            raise DataError(f"--data {data}: unsupported file type; use {', '.join(LOCAL_SUFFIXES)} or a saved dataset")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"--data {data}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return _column(ds, text_column, data)


def _load_hub_rows(data: str, data_config: str | None, split: str, text_column: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(data, data_config, split=split)
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot load dataset {describe(data, data_config, split)} from the Hugging Face hub ({text}); "
            f"without network, pass a local copy: --data path/to/{split}.parquet (or .txt, .jsonl)"
        ) from None
    return _column(ds, text_column, data)


def _parquet_rows(path: Path, text_column: str, data: str) -> list[str]:
    """The rows of a local parquet file, read with pyarrow: the rows `datasets` would give (tested), without
    importing it and building its cache (seconds of every `sweep run`)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"--data {data}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if text_column not in table.column_names:
        raise DataError(f"--data {data}: no column {text_column!r}; columns: {', '.join(table.column_names)} "
                        f"(choose one with --text-column)")
    return [row if isinstance(row, str) else "" for row in table.column(text_column).to_pylist()]


def _column(ds, text_column: str, data: str) -> list[str]:
    if text_column not in ds.column_names:
        raise DataError(f"--data {data}: no column {text_column!r}; columns: {', '.join(ds.column_names)} "
                        f"(choose one with --text-column)")
    return [row if isinstance(row, str) else "" for row in ds[text_column]]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary and the tokenizer's class and special-token settings."""
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer's JSON holds normalizer, pre-tokenizer, merges and post-processor (e.g. an added BOS).
    pipeline = backend.to_str() if backend is not None else None
    blob = json.dumps([type(tokenizer).__name__, sorted(vocab.items()), tokenizer.bos_token, tokenizer.eos_token,
                       getattr(tokenizer, "add_bos_token", None), pipeline], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenize(text: str, tokenizer, name: str, cache_dir: str | Path | None = None) -> TokenizedText:
    """Tokenize the whole text once (as the guide does: ``tokenizer(text)``), caching ids on disk.

    The cache key is the text hash and the tokenizer fingerprint, so a changed text or tokenizer never reuses
    stale ids.

    Raises:
        ConfigError: an explicit ``--cache-dir`` that cannot be written (checked before tokenizing).
    """
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    fingerprint = hashlib.sha256(f"{text_hash}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]
    n_bytes = len(text.encode("utf-8"))
    file_name = f"tokens-{fingerprint}.npy"
    if cache_dir and (Path(cache_dir) / file_name).exists():  # also from a read-only cache someone prepared
        return TokenizedText(np.load(Path(cache_dir) / file_name), n_bytes, fingerprint, name)
    directory = writable_cache_dir(cache_dir)
    if directory is not None and (directory / file_name).exists():
        return TokenizedText(np.load(directory / file_name), n_bytes, fingerprint, name)
    ids = _encode(tokenizer, text)
    if directory is not None:
        _save_ids(directory / file_name, ids)
    return TokenizedText(ids, n_bytes, fingerprint, name)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sweep``, by default ``~/.cache/sweep``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sweep"


def writable_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """Where token ids are cached: ``cache_dir`` when it can be written (created if needed).

    The default (``.cache/sweep`` in the working directory) falls back to :func:`user_cache_dir` when the
    working directory is read-only, then to no cache at all: a cache must never stop a run. An explicit
    ``--cache-dir`` that cannot be written is an error, so a mistyped path is not silently ignored.

    Raises:
        ConfigError: naming the explicit ``--cache-dir``.
    """
    if cache_dir is None:
        return None
    if _can_create(Path(cache_dir)):
        return Path(cache_dir)
    if str(cache_dir) != DEFAULT_CACHE_DIR:
        raise ConfigError(f"`--cache-dir` {cache_dir} cannot be written (tokenized text is cached there); give a "
                          "writable directory")
    return user_cache_dir() if _can_create(user_cache_dir()) else None


def _can_create(directory: Path) -> bool:
    """``directory`` exists and is writable, or its nearest existing parent is (read-only filesystems count)."""
    existing = directory.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _save_ids(path: Path, ids: np.ndarray) -> None:
    """Write the cache file atomically (a concurrent run never reads half a file); a failed write (disk full)
    only means the next run tokenizes again."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, ids)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _encode(tokenizer, text: str) -> np.ndarray:
    # The whole text is one sequence on purpose; silence the "longer than model_max_length" warning.
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        tokenizer.model_max_length = saved
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class EvalSetup:
    """The resolved evaluation windows (defaults filled in from the model)."""

    max_length: int
    stride: int
    max_tokens: int | None


def used_tokens(n_tokens: int, max_tokens: int | None) -> int:
    """How many of a text's ``n_tokens`` are used: the first ``max_tokens`` (``--max-tokens``,
    ``--calib-max-tokens``), or all of them when it is None: ``used_tokens(5000, 4096) == 4096``."""
    return min(n_tokens, max_tokens or n_tokens)


def model_context(config) -> int | None:
    """The model's context length in tokens, from whichever config field its family uses; None if unknown."""
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
    n_eval = used_tokens(len(tokens.ids), setup.max_tokens)
    if n_eval < setup.max_length:
        limit = " (capped by --max-tokens)" if setup.max_tokens and setup.max_tokens < len(tokens.ids) else ""
        raise DataError(f"--data {cfg.data}: {n_eval:,} tokens{limit}, fewer than one window of "
                        f"--max-length {setup.max_length}; lower --max-length or give more text")
    return tokens

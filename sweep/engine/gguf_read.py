"""Reading GGUF files (llama.cpp's format) as ordinary Hugging Face models, with what a start costs cached.

transformers reads a GGUF through ``from_pretrained(folder, gguf_file=name)``: it parses the metadata into a
config and a tokenizer and dequantizes every tensor to float32. On SmolLM2-135M (Q4_1, 2-core CPU) that is about
9 s for the config, 4 s for the tokenizer and 19 s for the weights, at every start. So the first use converts the
file once into an ordinary checkpoint folder under the cache directory::

    <cache_dir>/gguf/<sha256 of the file, 16 hex>/
        config.json, generation_config.json   the config transformers derives, without quantization_config
        model.safetensors                     the dequantized weights (float32), exactly what transformers loads
        tokenizer.json, tokenizer_config.json the tokenizer built from the file's metadata

and later starts load that folder (about a second). The folder is named after the file's content, so a changed
file gets a new one, and a copied or moved file reuses it. The weights are cached only up to
:data:`CACHE_MAX_BYTES` (a float32 copy of a 7B model would take 28 GB); bigger files are dequantized at every
start. A model loaded straight from a GGUF carries a ``quantization_config`` that ``save_pretrained`` refuses, so
its tensors are moved into a fresh model built from the config without it (no copy: the tensors are assigned).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sweep.errors import ArchitectureError, MissingExtraError, ModelLoadError
from sweep.locking import exclusive

CACHE_MAX_BYTES = 8 << 30
"""Largest dequantized (float32) model whose weights are cached; above it a GGUF is dequantized at every start."""

MAGIC = b"GGUF"


def is_gguf(name: str | os.PathLike) -> bool:
    """``--model`` names a GGUF file: its name ends in ``.gguf``, or it is a file that starts with the magic."""
    path = Path(name).expanduser()
    if str(name).lower().endswith(".gguf"):
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


def require_gguf_extra() -> None:
    """Raises: MissingExtraError naming the extra, when ``gguf`` or ``accelerate`` is not installed."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"reading GGUF files needs {' and '.join(missing)}: pip install 'sweep[gguf]'")


def check_file(path: Path) -> Path:
    """The GGUF file, resolved; raises ModelLoadError when it is missing or does not start with the magic."""
    path = path.expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    return path.resolve()


# ---------------------------------------------------------------------------------------------- identity


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """The sha256 of the file's content (the weights fingerprint of a GGUF model).

    Hashing reads the whole file (0.2 s for 100 MB, seconds for a 7B model), so with ``memo_dir`` the digest is
    remembered under a key of the path, size and modification time, and read back while those are unchanged.
    """
    stat = path.stat()
    memo = None
    if memo_dir is not None:
        key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        memo = memo_dir / "sha256" / key
        if memo.is_file():
            return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    if memo is not None:
        _write_atomic(memo, digest.hexdigest())
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """A memo is a convenience: a cache that cannot be written only means the work is redone."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass


def _cache_root(cache_dir: str | os.PathLike | None) -> Path | None:
    """``<cache_dir>/gguf``, created; None when there is no cache directory or it cannot be written."""
    if cache_dir is None:
        return None
    root = Path(cache_dir).expanduser() / "gguf"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root if os.access(root, os.W_OK) else None


def cache_folder(path: Path, cache_dir: str | os.PathLike | None) -> Path | None:
    """Where the converted checkpoint of ``path`` lives (None: no writable cache directory)."""
    root = _cache_root(cache_dir)
    return None if root is None else root / file_sha256(path, root)[:16]


def fingerprint(path: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """``gguf:<sha256, 16 hex>``: the weights fingerprint of a GGUF model (part of the setup id)."""
    return "gguf:" + file_sha256(check_file(path), _cache_root(cache_dir))[:16]


# ---------------------------------------------------------------------------------------------- transformers


def _split(path: Path) -> tuple[str, str]:
    return str(path.parent), path.name


def _classified(path: Path, exc: Exception) -> Exception:
    """transformers' and gguf's errors, as one line that names the cause."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, NotImplementedError) or "dequantiz" in text.lower():
        return ModelLoadError(f"{path.name}: a tensor's quantization type cannot be dequantized by the installed "
                              f"gguf package ({text}); upgrade it (pip install -U gguf) or convert the file to a "
                              "supported type (Q4_0, Q4_1, Q8_0, K-quants, F16, F32...)")
    if "not supported" in text.lower() and "architecture" in text.lower():
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        return ArchitectureError(f"{path.name}: {text} transformers reads GGUF files of: {', '.join(supported)}")
    return ModelLoadError(f"{path} cannot be read as a GGUF file; is it truncated or corrupt? ({text})")


_READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, EOFError, NotImplementedError, AssertionError)


def _plain_config(config):
    """The config without the quantization_config a GGUF load adds (the weights are plain float tensors)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def read_config(path: Path, cache_dir=None):
    """The model config the GGUF's metadata describes (cached as the folder's config.json).

    Raises:
        MissingExtraError, ModelLoadError (missing, truncated or corrupt file), ArchitectureError.
    """
    from transformers import AutoConfig

    return _read_part(path, cache_dir, "config.json", AutoConfig, _plain_config)


def read_tokenizer(path: Path, cache_dir=None):
    """The tokenizer stored in the GGUF's metadata (cached in the folder)."""
    from transformers import AutoTokenizer

    return _read_part(path, cache_dir, "tokenizer_config.json", AutoTokenizer)


def _read_part(path: Path, cache_dir, marker: str, auto, prepare=lambda part: part):
    """The config or the tokenizer of a GGUF: from its converted folder when ``marker`` is there, else read by
    transformers (``auto.from_pretrained(folder, gguf_file=name)``), passed through ``prepare`` and saved there."""
    path = check_file(path)
    folder = cache_folder(path, cache_dir)
    with _converting(folder):
        if folder is not None and (folder / marker).is_file():
            return auto.from_pretrained(folder)
        require_gguf_extra()
        parent, name = _split(path)
        try:
            part = prepare(auto.from_pretrained(parent, gguf_file=name))
        except _READ_ERRORS as exc:
            raise _classified(path, exc) from None
        if folder is not None:
            _save_into(folder, part.save_pretrained)
        return part


@contextlib.contextmanager
def _converting(folder: Path | None) -> Iterator[None]:
    """One process at a time converts a file (parallel test workers, two runs started together): the others wait,
    then find its parts in the folder."""
    if folder is None:
        yield
        return
    with exclusive(folder.parent / f".{folder.name}.lock"):
        yield


def read_model(path: Path, dtype, cache_dir=None):
    """The GGUF's model, dequantized by transformers (float32), cast to ``dtype``, on the CPU (the caller moves it).

    Raises:
        MissingExtraError, ModelLoadError (missing, truncated or corrupt file, a type gguf cannot dequantize),
        ArchitectureError (an architecture transformers' GGUF loader lacks).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = check_file(path)
    folder = cache_folder(path, cache_dir)
    with _converting(folder):
        if folder is not None and (folder / "model.safetensors").is_file():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        require_gguf_extra()
        parent, name = _split(path)
        try:  # a bad file fails while transformers reads the config, before any tensor is dequantized
            loaded = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
        except _READ_ERRORS as exc:
            raise _classified(path, exc) from None
        # The config comes with the model (reading it apart would parse the file's metadata once more: ~5 s here).
        model = plain_model(loaded, _plain_config(copy.deepcopy(loaded.config)))
        if folder is not None and sum(p.numel() for p in model.parameters()) * 4 <= CACHE_MAX_BYTES:
            _save_into(folder, model.save_pretrained)  # config.json included
    return model.to(dtype)


def plain_model(loaded, config):
    """``loaded``'s tensors in a fresh model of the same class built from ``config`` (no quantization_config), so
    that ``save_pretrained`` and everything else treat it as an ordinary checkpoint. Tensors are assigned, not
    copied; tied weights are tied again."""
    import torch

    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buffer in loaded.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, buffer, persistent=leaf not in
                                                   loaded.get_submodule(owner)._non_persistent_buffers_set)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval()


def _save_into(folder: Path, save) -> None:
    """Save into a temporary folder beside ``folder``, then move each file in: a concurrent start never sees half
    a file, and a failed save (disk full) leaves the cache as it was."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
            save(tmp)
            for item in Path(tmp).iterdir():
                os.replace(item, folder / item.name)
    except OSError:
        pass

"""Loading causal LMs and tokenizers (hub id or local directory), identifying their weights, and exporting a
physically pruned copy that reloads with ``from_pretrained``. Which attributes hold the layers is
:mod:`sweep.engine.adapters`' business.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sweep.config import DEFAULT_CACHE_DIR, SweepConfig
from sweep import steps as variant_steps
from sweep.engine import gguf_read, gguf_write
from sweep.engine.adapters import adapter_for, applied, decoder_layers, materialized, pruned
from sweep.errors import ConfigError, ExportError, ModelLoadError

# ---------------------------------------------------------------------------------------------- loading


def resolve_device(device: str) -> torch.device:
    """``auto`` -> first CUDA GPU if present, else CPU.

    Raises:
        ConfigError: CUDA asked for but unavailable.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``: a dtype as results.db and the flags spell it."""
    return str(dtype).removeprefix("torch.")


def model_dtype(model: nn.Module) -> str:
    """The dtype name of a loaded model's weights."""
    return dtype_name(next(model.parameters()).dtype)


def model_class_name(config) -> str:
    """The class ``AutoModelForCausalLM`` builds for ``config`` (e.g. ``GPT2LMHeadModel``), without building it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", ""))
    return name or next(iter(getattr(config, "architectures", None) or []), "unknown")


def _looks_local(name: str) -> bool:
    """Paths start with ./ / ~ or exist; anything else is taken for a hub id (``org/name``)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _load_error(name: str, what: str, exc: Exception) -> ModelLoadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _looks_local(name) and not Path(name).expanduser().exists():
        return ModelLoadError(f"{what} {name!r}: no such directory")
    if Path(name).expanduser().is_file():
        return ModelLoadError(f"cannot load {what} from {name}: a local file must be a GGUF (.gguf); a Hugging "
                              f"Face checkpoint is a directory ({text})")
    if Path(name).expanduser().is_dir():
        return ModelLoadError(f"cannot load {what} from {name}: {text}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text.lower() or "connect" in text.lower() \
        or "resolve" in text.lower() or "network" in text.lower() or "couldn't" in text.lower()
    hint = (" — no network to reach the hub? Download it elsewhere and pass the local directory, e.g. "
            f"--model /path/to/{name.split('/')[-1]}") if offline else ""
    return ModelLoadError(f"cannot load {what} {name!r} from the Hugging Face hub{hint} ({text})")


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False,
                cache_dir: str | None = DEFAULT_CACHE_DIR):
    """The model's config alone (cheap: no weights), to check a plan before loading anything big.

    Raises:
        ModelLoadError: unknown id or path, no network for a hub id, an unreadable GGUF file;
        MissingExtraError, ArchitectureError: a GGUF file without the gguf extra, or of an unsupported architecture.
    """
    from transformers import AutoConfig

    if gguf_read.is_gguf(name):
        return gguf_read.read_config(Path(name), cache_dir)
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, "model", exc) from None


def weights_fingerprint(name: str, config, random_init: bool = False) -> str:
    """What identifies the weights, without reading them: part of every setup id.

    Random init -> ``"random-init"``; a GGUF file -> the sha256 of its content; a local directory -> hash of its
    weight files' names, sizes and modification times (retrained weights make a new setup); a hub id -> the
    resolved commit hash.
    """
    if random_init:
        return "random-init"
    path = Path(name).expanduser()
    if gguf_read.is_gguf(name):
        return gguf_read.fingerprint(path, DEFAULT_CACHE_DIR)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        blob = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        return "local:" + hashlib.sha256(blob.encode()).hexdigest()[:12]
    return "hub:" + str(getattr(config, "_commit_hash", None) or "unknown")


def checkpoint_dtype(config) -> str:
    """The dtype the checkpoint was saved in, as a --dtype name (float32 when unknown)."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = dtype.replace("torch.", "")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def load_model(name: str, revision: str | None = None, dtype: str = "auto", device: str = "auto",
               random_init: bool = False, trust_remote_code: bool = False,
               cache_dir: str | None = DEFAULT_CACHE_DIR) -> nn.Module:
    """Load a causal LM by hub id, local directory or GGUF file, in eval mode on the chosen device.

    Args:
        random_init: build from the config with random weights (timing and shape studies; needs no weights).
        cache_dir: where a GGUF file's converted checkpoint is kept (:mod:`sweep.engine.gguf_read`).

    Raises:
        ModelLoadError: unknown id/path, no network, no weights, an unreadable GGUF file; ArchitectureError: no
            decoder layers found, or a GGUF architecture transformers cannot read; MissingExtraError: no gguf.
    """
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if gguf_read.is_gguf(name) and not random_init:  # the config comes with the model (one parse of the file)
        model = gguf_read.read_model(Path(name), torch_dtype, cache_dir).to(torch_device).eval()
        adapter_for(model)
        return model
    config = load_config(name, revision, trust_remote_code, cache_dir)
    try:
        if random_init:
            torch.manual_seed(0)  # seeds every device's generator
            # Initialised where it will run: on a GPU this takes a fraction of a second, on the CPU's generator
            # about 30 s for a 1B model (so the weights differ between CPU and GPU; the device is in the setup).
            with torch.device(torch_device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, "model", exc) from None
    model.to(torch_device).eval()
    adapter_for(model)  # fail now, with the class name, if the layers cannot be found
    return model


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False,
                   cache_dir: str | None = DEFAULT_CACHE_DIR):
    """Load the tokenizer saved with a model or in a GGUF file (or given with --tokenizer).

    Raises:
        ModelLoadError: no tokenizer files at that id or path.
    """
    from transformers import AutoTokenizer

    if gguf_read.is_gguf(name):
        return gguf_read.read_tokenizer(Path(name), cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        err = _load_error(name, "tokenizer", exc)
        raise ModelLoadError(f"{err} — pass --tokenizer DIR to use another tokenizer") from None
    # transformers 5 builds an empty tokenizer (no vocabulary) from a directory without tokenizer files.
    if len(tokenizer) <= 1 or not tokenizer("a")["input_ids"]:
        raise ModelLoadError(f"no tokenizer files at {name} — pass --tokenizer DIR to use another tokenizer")
    return tokenizer


def tokenizer_for(cfg: SweepConfig):
    """The tokenizer of a sweep: ``--tokenizer`` if given, else the one saved with the model."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, None, cfg.trust_remote_code, cfg.cache_dir)
    return load_tokenizer(cfg.model, cfg.revision, cfg.trust_remote_code, cfg.cache_dir)


def model_for(cfg: SweepConfig) -> nn.Module:
    """The model of a sweep, as ``--model``, ``--revision``, ``--dtype``, ``--device`` and ``--random-init`` say."""
    return load_model(cfg.model, cfg.revision, cfg.dtype, cfg.device, cfg.random_init, cfg.trust_remote_code,
                      cfg.cache_dir)


def config_for(cfg: SweepConfig):
    """The config of ``--model`` (cheap: no weights)."""
    return load_config(cfg.model, cfg.revision, cfg.trust_remote_code, cfg.cache_dir)


# ---------------------------------------------------------------------------------------------- export


def export_pruned(model: nn.Module, tokenizer, removed: Sequence[int], out_dir: str | Path) -> Path:
    """Save a physically pruned copy of ``model`` that reloads with ``from_pretrained``.

    The saved config's layer count and per-layer lists and every ``layer_idx`` agree with the kept layers,
    so the reloaded model gives the in-memory variant's logits and ``generate()`` works with the KV cache.

    Raises:
        ExportError: the architecture makes a layer's function depend on its index (would not reload faithfully).
    """
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and removed:
        raise ExportError("this GPT-2 config scales attention by 1/(layer_idx+1); a pruned export would change it")
    if not variant_steps.is_block_variant(removed):
        return _export_reordered(model, tokenizer, tuple(removed), Path(out_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = _probe(model)
    with pruned(model, removed), torch.no_grad():
        want = model(input_ids=probe, use_cache=False).logits.float().cpu()
        model.save_pretrained(out_dir)  # saves only the kept layers, renumbered; no copy of the weights
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    _verify_export(out_dir, probe.cpu(), want, model.config._attn_implementation, next(model.parameters()).dtype)
    return out_dir


def _probe(model: nn.Module) -> torch.Tensor:
    return torch.arange(min(16, model.config.vocab_size), device=next(model.parameters()).device)[None] % 7 + 1


def exportable(model_type: str, variant: Sequence) -> str | None:
    """Why a variant cannot be exported as a standard checkpoint (None: it can).

    Removed blocks, repeats, swaps and reversals are a list of whole layers: the config's layer count and per-layer
    lists say it. A removed attention or MLP branch is not: no standard config has a per-layer switch to drop one
    branch (a checkpoint with that branch's output weights zeroed would compute the same but keep its size and
    speed, so sweep does not write one). Parallel layers are not a standard block at all.
    """
    ops = {variant_steps.parse_edit(e)[0] for e in variant}
    if ops & set(variant_steps.UNIT_OPS):
        return (f"attention-only or MLP-only removal cannot be exported: the {model_type} config has no per-layer "
                "switch that drops one residual branch, and a checkpoint with zeroed weights would be no smaller "
                "or faster")
    if "p" in ops:
        return (f"parallel layers cannot be exported: no standard {model_type} config runs two layers on one input")
    return None


def _export_reordered(model: nn.Module, tokenizer, variant: tuple, out_dir: Path) -> Path:
    """Export repeated, swapped or reversed layers (and removed ones): one copy of a layer per occurrence."""
    why = exportable(getattr(model.config, "model_type", ""), variant)
    if why:
        raise ExportError(why)
    order = variant_steps.steps_of(variant, len(decoder_layers(model)))
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = _probe(model)
    with torch.no_grad():
        with applied(model, variant):  # the in-memory variant the sweep measured
            want = model(input_ids=probe, use_cache=False).logits.float().cpu()
        with materialized(model, order):
            model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    _verify_export(out_dir, probe.cpu(), want, model.config._attn_implementation, next(model.parameters()).dtype)
    return out_dir


def export_gguf(source: str, variant: Sequence, out: str | Path, cache_dir: str | None = DEFAULT_CACHE_DIR) -> Path:
    """Write ``variant`` of the GGUF file ``source`` as a GGUF file: every kept tensor copied byte for byte in its
    own quantization type, blocks renumbered, the block count and per-layer metadata cut
    (:mod:`sweep.engine.gguf_write`). Then reload it and check it is the variant sweep measured: the same logits
    and perplexity on a probe as the in-memory variant of the source, and the same greedy tokens with the KV cache.

    Raises:
        ExportError: a source that is not a GGUF file (with how to convert one), a variant no GGUF can hold
            (attention- or MLP-only removal, parallel layers), a file that cannot be written faithfully, or a
            reload that differs.
    """
    if not gguf_read.is_gguf(source):
        raise ExportError(
            f"--out {Path(out).name}: a GGUF export copies the tensors of a GGUF source, and {source} is not one. "
            "Convert the checkpoint first (llama.cpp's convert_hf_to_gguf.py, then llama-quantize for a quantized "
            "file) and export from that with --model FILE.gguf, or give --out a directory for a Hugging Face "
            "checkpoint")
    model = load_model(source, dtype="float32", device="cpu", cache_dir=cache_dir)
    why = exportable(getattr(model.config, "model_type", ""), variant)
    if why:
        raise ExportError(why)
    order = [s.layer for s in variant_steps.steps_of(tuple(variant), len(decoder_layers(model)))]
    written = gguf_write.write_gguf_variant(source, order, out)
    probe = _probe(model)
    with torch.no_grad(), applied(model, variant) as running:
        want = model(input_ids=probe, use_cache=False).logits.float()
        want_tokens = model.generate(probe, past_key_values=running.new_cache(), max_new_tokens=4, do_sample=False)
    reloaded = gguf_read.read_model(written.path, torch.float32, cache_dir=None)  # never cached: a check
    with torch.no_grad():
        got = reloaded(input_ids=probe, use_cache=False).logits.float()
        got_tokens = reloaded.generate(probe, max_new_tokens=4, do_sample=False)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
        raise ExportError(f"{written.path} does not reproduce the variant's logits once reloaded")
    if abs(_probe_perplexity(got, probe) / _probe_perplexity(want, probe) - 1) > 1e-5:
        raise ExportError(f"{written.path} does not reproduce the variant's perplexity once reloaded")
    if not torch.equal(got_tokens, want_tokens):
        raise ExportError(f"{written.path} generates other tokens with the KV cache than the variant")
    return written.path


def _probe_perplexity(logits: torch.Tensor, probe: torch.Tensor) -> float:
    """Perplexity of the probe's next tokens under ``logits`` (1, T, V), in float64."""
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].double(), probe[0, 1:])
    return float(nll.exp())


def _verify_export(out_dir: Path, probe: torch.Tensor, want: torch.Tensor, attn: str | None,
                   dtype: torch.dtype = torch.float32) -> None:
    """Reload the export in the variant's dtype and check it computes the in-memory variant's logits (``want``,
    float32 on CPU). The same weights in the same dtype differ only by kernels: 1e-4 in float32, 2e-2 in half
    precision (against a float32 reload a bfloat16 variant drifts far more, so like is compared with like).

    Raises:
        ExportError: a config field that refers to layers by index (e.g. MoE layer lists) was not remapped.
    """
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, attn_implementation=attn).eval()
    with torch.no_grad():
        got = reloaded(input_ids=probe, use_cache=False).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    atol = tol * max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want.to(got.dtype), rtol=tol, atol=atol):
        raise ExportError(
            f"the model saved in {out_dir} does not reproduce the pruned variant's logits; its config probably "
            "has a field that refers to layers by index (MoE layer lists...) that sweep does not remap yet"
        )



def load_model_4bit(name: str, revision: str | None = None, device: str = "cuda",
                    trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM with 4-bit NF4 base weights (QLoRA, Dettmers et al. 2023) on a CUDA device.

    Raises:
        ModelLoadError: not on CUDA, bitsandbytes missing, or the model cannot be loaded.
    """
    torch_device = resolve_device(device)
    if torch_device.type != "cuda":
        raise ModelLoadError("--qlora needs a CUDA GPU (4-bit weights via bitsandbytes); heal without --qlora on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("--qlora needs bitsandbytes: pip install bitsandbytes (or heal without --qlora)") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, quantization_config=quant,
                                                     device_map={"": torch_device.index or 0},
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, "model", exc) from None
    adapter_for(model)
    return model.eval()

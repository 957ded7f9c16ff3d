"""One record per model family: everything sweep knows about an architecture, in one place.

A :class:`Family` says where the decoder layers and the final norm are (dotted attribute paths), which children
of a layer make up its attention and MLP residual branches (for ``--unit attn|mlp|mix``), whether the block adds
both branches in one residual add (then no branch can be removed alone), and which projections LoRA heals.
Adding an architecture is one line in :data:`FAMILIES`; a ``model_type`` that is not there still works for whole
layers when it has one ``ModuleList`` of ``num_hidden_layers`` layers (:func:`adapter_for`'s fallback).

Example: ``family_of("qwen2")`` is ``Family("qwen2", layers="model.layers", final_norm="model.norm",
branches=Branches(attn=("self_attn",), mlp=("mlp",), ...), lora_targets=("q_proj", ...))``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from torch import nn

from sweep.errors import ArchitectureError


@dataclass(frozen=True)
class Branches:
    """Which children of a decoder layer make up each residual branch.

    ``attn`` / ``mlp``: modules whose output is the branch's update (replaced by zero stand-ins when the branch is
    removed; post-normed families list the norm applied to the branch output too, since norm(0) is not 0 for every
    norm). The first ``attn`` entry is the attention itself (its stand-in also leaves the KV cache alone).
    ``attn_norm`` / ``mlp_norm``: the pre-norm feeding only that branch (replaced by a pass-through: its output is
    no longer used, so it neither runs nor counts). ``inline_mlp``: the MLP is two sibling linears
    (``mlp = (in, out)``, OPT's fc1 -> activation -> fc2) rather than one module; the first becomes zero-width so
    the activation and the second do no work.
    """

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    attn_norm: tuple[str, ...] = ()
    mlp_norm: tuple[str, ...] = ()
    inline_mlp: bool = False


@dataclass(frozen=True)
class Family:
    """Everything sweep knows about one architecture (one ``config.model_type``)."""

    model_type: str
    layers: str | None
    """Dotted path of the decoder-layer ModuleList (None: found by its length, see :func:`adapter_for`)."""
    final_norm: str | None
    """Dotted path of the norm after the last layer (None: looked up beside the layers)."""
    branches: Branches | None = None
    """The residual branches of its layers (None: not separable, or not known)."""
    parallel: str | None = None
    """The family's display name when a block adds attention and MLP outputs in one residual add (GPT-J)."""
    lora_targets: tuple[str, ...] = ()
    """Every attention and MLP projection (LoRA targets, as in QLoRA); empty: every linear map in a layer."""


_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_GPT2_BRANCHES = Branches(("attn",), ("mlp",), ("ln_1",), ("ln_2",))
_PRE_NORMED = Branches(("self_attn",), ("mlp",), ("input_layernorm",), ("post_attention_layernorm",))
# Gemma 2/3: post_attention_layernorm is the attention's OUTPUT norm here (the MLP has its own pre-norm).
_SANDWICH = Branches(("self_attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm"),
                     ("input_layernorm",), ("pre_feedforward_layernorm",))
_GPT2_STYLE = Family("", "transformer.h", "transformer.ln_f")
_LLAMA_STYLE = Family("", "model.layers", "model.norm", _PRE_NORMED, lora_targets=_LLAMA_PROJECTIONS)
_FOUND = Family("", None, None)  # layers found by their length: parallel-block families sweep removes whole


def _like(template: Family, model_type: str, **changes) -> Family:
    return replace(template, model_type=model_type, **changes)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _like(_GPT2_STYLE, "gpt2", branches=_GPT2_BRANCHES,
          lora_targets=("c_attn", "c_proj", "c_fc")),  # Conv1D; c_proj is both the attention and the MLP output
    _like(_GPT2_STYLE, "gpt_neo", branches=_GPT2_BRANCHES,
          lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")),
    _like(_GPT2_STYLE, "gptj", parallel="GPT-J",
          lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")),
    # OPT's MLP is inline (fc1 -> activation -> fc2); its norms are pre-norms only with do_layer_norm_before.
    Family("opt", "model.decoder.layers", "model.decoder.final_layer_norm",
           Branches(("self_attn",), ("fc1", "fc2"), ("self_attn_layer_norm",), ("final_layer_norm",), inline_mlp=True),
           lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    *(_like(_LLAMA_STYLE, t) for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                       "gemma", "olmo", "granite", "smollm3")),
    _like(_LLAMA_STYLE, "phi3", lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    _like(_LLAMA_STYLE, "starcoder2", lora_targets=()),  # its MLP is c_fc / c_proj: every linear map
    _like(_LLAMA_STYLE, "gemma2", branches=_SANDWICH),
    _like(_LLAMA_STYLE, "gemma3_text", branches=_SANDWICH),
    _like(_LLAMA_STYLE, "olmo2", branches=Branches(("self_attn", "post_attention_layernorm"),
                                                   ("mlp", "post_feedforward_layernorm"))),
    _like(_LLAMA_STYLE, "cohere", branches=None, parallel="Cohere"),
    _like(_FOUND, "cohere2", parallel="Cohere 2"),
    _like(_FOUND, "phi", parallel="Phi"),
    _like(_FOUND, "gpt_neox", parallel="GPT-NeoX"),
    _like(_FOUND, "falcon", parallel="Falcon"),
    _like(_FOUND, "stablelm", parallel="StableLM"),  # use_parallel_residual may be set
)}
"""model_type -> its record. Types not listed fall back to finding the layer list by its length."""


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


# ---------------------------------------------------------------------------------------------- where the layers are


@dataclass(frozen=True)
class Adapter:
    """Where a loaded model keeps its decoder layers and final norm (dotted attribute paths)."""

    name: str
    layers: str
    final_norm: str | None


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _find_layers(model: nn.Module, n_layers: int) -> str | None:
    """Generic fallback: the dotted path of the ModuleList whose length is the config's layer count."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return name
    return None


def adapter_for(model: nn.Module) -> Adapter:
    """Where ``model``'s layers are: its family's record when that path holds a ModuleList, else the one
    ModuleList of ``num_hidden_layers`` modules.

    Raises:
        ArchitectureError: naming the model class when no decoder-layer list can be found.
    """
    model_type = getattr(model.config, "model_type", "")
    known = family_of(model_type)
    if known is not None and known.layers is not None:
        with contextlib.suppress(AttributeError):
            if isinstance(_get(model, known.layers), nn.ModuleList):
                return Adapter(model_type, known.layers, known.final_norm)
    path = _find_layers(model, n_layers_of(model.config))
    if path is None:
        raise ArchitectureError(
            f"cannot find the decoder layers of {type(model).__name__} (model_type {model_type!r}); "
            f"supported: {', '.join(sorted(FAMILIES))} and models with one ModuleList of num_hidden_layers layers"
        )
    return Adapter(f"generic:{model_type}", path, _find_final_norm(model, path))


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def _find_final_norm(model: nn.Module, layers_path: str) -> str | None:
    """The final norm beside the layer list, under one of the names architectures use for it."""
    parent = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    for name in FINAL_NORM_NAMES:
        path = f"{parent}.{name}" if parent else name
        with contextlib.suppress(AttributeError):
            if isinstance(_get(model, path), nn.Module):
                return path
    return None


def n_layers_of(config) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, adapter_for(model).layers)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (None: the family has none)."""
    path = adapter_for(model).final_norm
    return _get(model, path) if path else None


def replace_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    """Put ``layers`` where the model keeps its decoder layers (the caller keeps the old list to restore it)."""
    parent_path, _, list_name = adapter_for(model).layers.rpartition(".")
    setattr(_get(model, parent_path) if parent_path else model, list_name, layers)


# ---------------------------------------------------------------------------------------------- residual branches


def branches_of(model: nn.Module) -> Branches:
    """The residual branches of ``model``'s layers.

    Raises:
        ArchitectureError: naming the family, when its blocks have no separable branches (parallel attention and
            MLP summed in one residual add, e.g. GPT-J) or sweep does not know its branch modules.
    """
    model_type = getattr(model.config, "model_type", "")
    family = family_of(model_type)
    if family is not None and family.parallel:
        raise ArchitectureError(
            f"{family.parallel} ({model_type}) blocks run attention and MLP in parallel on one input and "
            "add both in one residual add, so one branch cannot be removed on its own; use --unit block")
    if family is None or family.branches is None:
        known = sorted(t for t, f in FAMILIES.items() if f.branches is not None)
        raise ArchitectureError(f"sweep does not know the residual branches of {model_type!r} layers; --unit attn, "
                                f"mlp and mix support: {', '.join(known)}")
    branches = family.branches
    if model_type == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        branches = replace(branches, attn_norm=(), mlp_norm=())  # post-norm OPT: the norms act on the stream
    return branches


# ---------------------------------------------------------------------------------------------- LoRA healing


def _projection_names(layer: nn.Module) -> list[str]:
    """Leaf names of the linear maps (nn.Linear or transformers' Conv1D) inside one decoder layer."""
    names = []
    for path, module in layer.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            leaf = path.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the attention and MLP projections of ``model``'s decoder layers (LoRA's target modules).

    Known families use their record's ``lora_targets`` (keeping only names present in the model); other families
    fall back to every linear map inside a decoder layer, e.g. ``['c_attn', 'c_proj', 'c_fc']`` for GPT-2.

    Raises:
        ArchitectureError: no linear map found inside the decoder layers.
    """
    layers = decoder_layers(model)
    present = _projection_names(layers[0]) if len(layers) else []
    family = family_of(getattr(model.config, "model_type", ""))
    known = [n for n in (family.lora_targets if family else ()) if n in present]
    targets = known or present
    if not targets:
        raise ArchitectureError(f"no linear projections found inside the decoder layers of {type(model).__name__}; "
                                "pass --lora-targets")
    return targets

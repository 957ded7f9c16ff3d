"""Where each architecture keeps its decoder layers, and everything that depends on it: removing layers in place,
counting their parameters, shape signatures, replaying one layer at a time, and capturing the residual stream.
The only module that knows attribute names such as ``transformer.h`` or ``model.layers``.

Layer removal is reversible and cheap: :func:`remove_layers` swaps the decoder ``ModuleList`` for one holding
only the kept layers (no weight is copied), makes the config agree (layer count and every per-layer list such
as ``layer_types``) and renumbers each kept module's ``layer_idx`` so the KV cache is indexed correctly. It
returns an ``undo`` callable; :func:`pruned` wraps both in a context manager. Export applies the same removal
without undo and saves, so the in-memory variant and the exported model are the same code path.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sweep.errors import ArchitectureError, ConfigError, PlanError
from sweep.steps import Par, Step, Steps, is_block_variant, members, steps_of

@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its decoder layers and final norm (dotted attribute paths)."""

    name: str
    layers: str
    final_norm: str | None


_GPT2_STYLE = Adapter("gpt2-style", "transformer.h", "transformer.ln_f")
_LLAMA_STYLE = Adapter("llama-style", "model.layers", "model.norm")
ADAPTERS: dict[str, Adapter] = {
    "gpt2": _GPT2_STYLE,
    "gpt_neo": _GPT2_STYLE,
    "gptj": _GPT2_STYLE,
    "opt": Adapter("opt", "model.decoder.layers", "model.decoder.final_layer_norm"),
    **{t: _LLAMA_STYLE for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "phi3", "olmo", "olmo2", "granite", "starcoder2", "smollm3", "cohere",
    )},
}
"""model_type -> adapter. Types not listed fall back to :func:`_find_layers`."""


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
    """The adapter of a loaded model.

    Raises:
        ArchitectureError: naming the model class when no decoder-layer list can be found.
    """
    model_type = getattr(model.config, "model_type", "")
    known = ADAPTERS.get(model_type)
    if known is not None:
        with contextlib.suppress(AttributeError):
            if isinstance(_get(model, known.layers), nn.ModuleList):
                return known
    path = _find_layers(model, n_layers_of(model.config))
    if path is None:
        raise ArchitectureError(
            f"cannot find the decoder layers of {type(model).__name__} (model_type {model_type!r}); "
            f"supported: {', '.join(sorted(ADAPTERS))} and models with one ModuleList of num_hidden_layers layers"
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


# ---------------------------------------------------------------------------------------------- removal


def _per_layer_config_lists(config, n_layers: int) -> list[str]:
    """Config attributes holding one entry per layer (``layer_types``, GPT-Neo's ``attention_layers``...)."""
    names = []
    for name, value in vars(config).items():
        if (isinstance(value, (list, tuple)) and len(value) == n_layers and not name.startswith("_")
                and not name.endswith("token_id")):  # e.g. a list of eos ids that happens to have that length
            names.append(name)
    return names


def _config_changes(config, kept: Sequence[int]) -> dict[str, object]:
    """New values of every config attribute that depends on the layer count."""
    n_layers = n_layers_of(config)
    changes: dict[str, object] = {"num_hidden_layers": len(kept)}
    for name in _per_layer_config_lists(config, n_layers):
        values = getattr(config, name)
        changes[name] = type(values)(values[i] for i in kept)
    if getattr(config, "model_type", "") == "gpt_neo":
        # GPT-Neo derives attention_layers from the run-length list attention_types when it is (re)loaded.
        changes["attention_types"] = [[[t], 1] for t in changes.get("attention_layers", [])]
    return changes


def remove_layers(model: nn.Module, removed: Sequence[int]) -> Callable[[], None]:
    """Remove decoder layers in place; return a callable that restores the model exactly.

    Example: on a 4-layer model, ``remove_layers(model, [1, 2])`` leaves layers ``[0, 3]``; the old layer 3 is
    now at index 1 and its attention's ``layer_idx`` is 1, so ``generate()`` indexes a 2-layer KV cache.

    Raises:
        ConfigError: a removed index is out of range or repeated.
    """
    adapter = adapter_for(model)
    layers: nn.ModuleList = _get(model, adapter.layers)
    n_layers = len(layers)
    removed = list(removed)
    if any(not 0 <= i < n_layers for i in removed) or len(set(removed)) != len(removed):
        raise ConfigError(f"cannot remove layers {removed} from a model with layers 0-{n_layers - 1}")
    kept = [i for i in range(n_layers) if i not in set(removed)]
    parent_path, list_name = adapter.layers.rsplit(".", 1)
    parent = _get(model, parent_path)
    config = model.config
    changes = _config_changes(config, kept)
    old_config = {name: getattr(config, name) for name in changes}
    old_idx = _renumber(layers, kept)
    setattr(parent, list_name, nn.ModuleList([layers[i] for i in kept]))
    for name, value in changes.items():
        setattr(config, name, value)

    def undo() -> None:
        setattr(parent, list_name, layers)
        for name, value in old_config.items():
            setattr(config, name, value)
        for module, attr, idx in old_idx:
            setattr(module, attr, idx)

    return undo


LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")
"""Attributes through which a module finds its KV-cache slot (GPT-Neo's attention uses ``layer_id``)."""


def _renumber(layers: nn.ModuleList, kept: Sequence[int]) -> list[tuple[nn.Module, str, int]]:
    """Set the layer index of every module inside kept layer ``kept[j]`` to ``j``; return the old values."""
    old = []
    for new_idx, old_layer in enumerate(kept):
        for module in layers[old_layer].modules():
            for attr in LAYER_INDEX_ATTRS:
                idx = getattr(module, attr, None)
                if isinstance(idx, int) and not isinstance(idx, bool):
                    old.append((module, attr, idx))
                    setattr(module, attr, new_idx)
    return old


@contextlib.contextmanager
def pruned(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Context in which ``model`` runs without the ``removed`` layers; restored on exit, even on error."""
    undo = remove_layers(model, removed)
    try:
        yield model
    finally:
        undo()


# ---------------------------------------------------------------------------------------------- parameters


def embedding_params(model: nn.Module) -> int:
    """Parameters of token and position embeddings, plus the output head when it is not tied to them."""
    layers = decoder_layers(model)
    inside = {id(p) for p in layers.parameters()}
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for p in module.parameters(recurse=False):
                if id(p) not in inside and id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) not in seen:
        total += head.weight.numel()
    return total


def layer_params(model: nn.Module) -> list[int]:
    """Parameter count of each decoder layer."""
    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]


def total_params(model: nn.Module) -> int:
    """All unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- signatures


def layer_signature(layer: nn.Module) -> str:
    """What decides a layer's cost: its parameter shapes and dtypes and its attention type (sliding or full)."""
    parts = [f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in layer.named_parameters()]
    for module in layer.modules():
        for attr in ("attention_type", "layer_type", "sliding_window", "is_sliding"):
            value = getattr(module, attr, None)
            if isinstance(value, (str, int, bool)):
                parts.append(f"{attr}={value}")
    return "|".join(parts)


def shape_signature(model: nn.Module, kept: Sequence[int] | Steps) -> str:
    """Cost signature of a variant: how many kept layers there are of each kind, in no particular order.

    A forward's cost is the sum of its layers' costs, so order does not matter. Example: GPT-2 keeping
    [0, 5, 7] -> ``"3xa1b2c3d4"``, the same as keeping [1, 2, 3]; Gemma 2 keeping [0, 1] (sliding, full) and
    [2, 3] (sliding, full) share one measurement too. ``kept`` may be a step sequence: a step without its
    attention lists no attention parameters, so ``a3`` and ``a5`` share a signature and differ from ``3``; a
    parallel group costs its members (they run one after the other).
    """
    layers = decoder_layers(model)
    calls = [Step(item) if isinstance(item, int) else m for item in kept
             for m in ((item,) if isinstance(item, int) else members(item))]
    modules = [layers[c.layer] if c.branches == "am" else layer_occurrence(model, c.layer, c.branches) for c in calls]
    codes = Counter(hashlib.sha1(layer_signature(m).encode()).hexdigest()[:8] for m in modules)
    return "+".join(f"{n}x{code}" for code, n in sorted(codes.items())) or "0"



# ---------------------------------------------------------------------------------------------- replay


@dataclass
class LayerCalls:
    """How the model called each decoder layer in one unpruned forward, for replaying layers one by one.

    ``hidden`` is the residual stream entering layer 0, (B, T, H); ``calls[i]`` holds the other positional and
    keyword arguments layer i received (attention mask for its own layer type, rotary position embeddings, ...).
    Calling layer i as ``layer(h, *args, **kwargs)`` with any residual stream h is exactly what the model would
    do with the layers before it removed, because a layer's inputs other than h do not depend on earlier layers.
    ``outputs[i]`` (when kept) is layer i's output in that forward, for i < L - 1: the residual stream after
    layers 0..i, which the trie reuses instead of computing the unpruned prefix a second time.
    """

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the last layer's hook: the rest of the forward is not needed."""


def capture_layer_calls(model: nn.Module, input_ids: torch.Tensor, keep_outputs: bool = False) -> LayerCalls:
    """Run the model's backbone just far enough to record every decoder layer's call arguments (and, with
    ``keep_outputs``, the outputs of every layer but the last, which is never run)."""
    layers = decoder_layers(model)
    calls: list[tuple[tuple, dict]] = [((), {})] * len(layers)
    first: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []

    def make_hook(i: int):
        def hook(module, args, kwargs):
            if i == 0:
                first["hidden"] = args[0] if args else kwargs["hidden_states"]
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[i] = (tuple(args[1:]), rest_kwargs)
            if i == len(layers) - 1:
                raise _StopForward  # the last layer's arguments are known: skip its work and the head
        return hook

    def keep_output(module, args, kwargs, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if keep_outputs:
        handles += [layer.register_forward_hook(keep_output, with_kwargs=True) for layer in layers[:-1]]
    try:
        with torch.no_grad():
            model.base_model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return LayerCalls(first["hidden"], calls, outputs)


def call_layer(model: nn.Module, index: int, hidden: torch.Tensor, calls: LayerCalls) -> torch.Tensor:
    """Replay decoder layer ``index`` on the residual stream ``hidden`` (B, T, H) with its captured arguments."""
    args, kwargs = calls.calls[index]
    out = decoder_layers(model)[index](hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def final_norm_fn(model: nn.Module):
    """The residual stream after the last kept layer -> the backbone's output (final norm, OPT's project_out)."""
    adapter = adapter_for(model)
    norm = _get(model, adapter.final_norm) if adapter.final_norm else None
    project_out = getattr(getattr(model.base_model, "decoder", None), "project_out", None)

    def finish(hidden: torch.Tensor) -> torch.Tensor:
        if norm is not None:
            hidden = norm(hidden)
        if project_out is not None:
            hidden = project_out(hidden)
        return hidden

    return finish


# ---------------------------------------------------------------------------------------------- residual stream


def capture_residual_stream(model: nn.Module, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The residual stream entering every decoder layer, plus the last layer's output, from one forward.

    Returns L + 1 tensors of shape (B, T, H): entry l is the input of layer l, entry L the output of the last
    layer BEFORE the final norm. (``output_hidden_states`` cannot be used: for GPT-2 and others its last entry
    is taken after the final norm.) The final norm and LM head are skipped.
    """
    layers = decoder_layers(model)
    streams: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def make_pre_hook(i: int):
        def hook(module, args, kwargs):
            streams[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def last_hook(module, args, kwargs, output):
        streams[-1] = output[0] if isinstance(output, tuple) else output
        raise _StopForward  # the final norm and the head are not needed

    handles = [layer.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return streams


# ---------------------------------------------------------------------------------------------- residual branches


@dataclass(frozen=True)
class Branches:
    """Which children of a decoder layer make up each residual branch.

    ``attn`` / ``mlp``: modules whose output is the branch's update (replaced by zero stand-ins when the branch is
    removed; post-normed families list the norm applied to the branch output too, since norm(0) is not 0 for every
    norm). ``attn_norm`` / ``mlp_norm``: the pre-norm feeding only that branch (replaced by a pass-through: its
    output is no longer used, so it neither runs nor counts).
    """

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    attn_norm: tuple[str, ...] = ()
    mlp_norm: tuple[str, ...] = ()


_GPT2_BRANCHES = Branches(("attn",), ("mlp",), ("ln_1",), ("ln_2",))
_PRE_NORMED = Branches(("self_attn",), ("mlp",), ("input_layernorm",), ("post_attention_layernorm",))
# Gemma 2/3: post_attention_layernorm is the attention's OUTPUT norm here (the MLP has its own pre-norm).
_SANDWICH = Branches(("self_attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm"),
                     ("input_layernorm",), ("pre_feedforward_layernorm",))
BRANCHES: dict[str, Branches] = {
    "gpt2": _GPT2_BRANCHES,
    "gpt_neo": _GPT2_BRANCHES,
    # OPT's MLP is inline (fc1 -> activation -> fc2); its norms are pre-norms only with do_layer_norm_before.
    "opt": Branches(("self_attn",), ("fc1", "fc2"), ("self_attn_layer_norm",), ("final_layer_norm",)),
    **{t: _PRE_NORMED for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                                "phi3", "olmo", "granite", "starcoder2", "smollm3")},
    **{t: _SANDWICH for t in ("gemma2", "gemma3_text")},
    "olmo2": Branches(("self_attn", "post_attention_layernorm"), ("mlp", "post_feedforward_layernorm")),
}
"""model_type -> residual branches of its decoder layers (families with one residual add per branch)."""

PARALLEL_BLOCKS = {
    "gptj": "GPT-J", "cohere": "Cohere", "phi": "Phi", "gpt_neox": "GPT-NeoX", "falcon": "Falcon",
    "stablelm": "StableLM", "cohere2": "Cohere 2",
}
"""Families whose block adds attention and MLP outputs in one residual add (or may): branches not separable."""


def branches_of(model: nn.Module) -> Branches:
    """The residual branches of ``model``'s layers.

    Raises:
        ArchitectureError: naming the family, when its blocks have no separable branches (parallel attention and
            MLP summed in one residual add, e.g. GPT-J) or sweep does not know its branch modules.
    """
    model_type = getattr(model.config, "model_type", "")
    if model_type in PARALLEL_BLOCKS:
        raise ArchitectureError(
            f"{PARALLEL_BLOCKS[model_type]} ({model_type}) blocks run attention and MLP in parallel on one input and "
            "add both in one residual add, so one branch cannot be removed on its own; use --unit block")
    if model_type not in BRANCHES:
        raise ArchitectureError(f"sweep does not know the residual branches of {model_type!r} layers; --unit attn, "
                                f"mlp and mix support: {', '.join(sorted(BRANCHES))}")
    branches = BRANCHES[model_type]
    if model_type == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        branches = Branches(branches.attn, branches.mlp)  # post-norm OPT: the norms act on the residual stream
    return branches


class ZeroAttention(nn.Module):
    """Stand-in for a removed attention: the branch adds 0 and never touches the KV cache."""

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs):
        return torch.zeros_like(hidden_states), None  # (B, T, H), no attention weights


class ZeroLike(nn.Module):
    """Stand-in for a removed MLP (or its output norm): zeros shaped like the input."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(x)


class PassThrough(nn.Module):
    """Stand-in for the pre-norm of a removed branch: its output is unused, so it does no work."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


class ZeroWidth(nn.Module):
    """OPT's fc1 stand-in: (N, H) -> (N, 0), so the activation and fc2 do no work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


class ZeroOut(nn.Module):
    """OPT's fc2 stand-in: (N, 0) -> zeros (N, H)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)


def _stand_in(layer: nn.Module, name: str) -> nn.Module:
    if name in ("self_attn", "attn"):
        return ZeroAttention()
    if name == "fc1":
        return ZeroWidth()
    if name == "fc2":
        return ZeroOut(getattr(layer, name).out_features)
    return ZeroLike()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters and buffers, with its own children and hook dicts
    (hooks already there are kept; hooks added to the copy do not reach the original)."""
    new = object.__new__(type(module))
    new.__dict__.update(module.__dict__)
    new._modules = dict(module._modules)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            new.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    return new


def _index_attrs(module: nn.Module) -> list[str]:
    return [a for a in LAYER_INDEX_ATTRS
            if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)]


def _rebind(module: nn.Module, idx: int) -> nn.Module:
    """Shallow copies of every module on the paths to a ``layer_idx`` / ``layer_id``, set to ``idx`` (the KV-cache
    slot); modules without one below them are shared as they are."""
    if not any(_index_attrs(m) for m in module.modules()):
        return module
    new = _shallow(module)
    for attr in _index_attrs(module):
        new.__dict__[attr] = idx
    for name, child in module._modules.items():
        if child is not None:
            new._modules[name] = _rebind(child, idx)
    return new


def layer_occurrence(model: nn.Module, layer: int, branches: str = "am", cache_slot: int | None = None) -> nn.Module:
    """One occurrence of decoder layer ``layer``: a module sharing its parameters, with the branches not in
    ``branches`` ("am" whole, "a" attention only, "m" MLP only) replaced by stand-ins and, when ``cache_slot`` is
    given, its KV-cache index set to it. The model's own layer is never changed.

    Raises:
        ArchitectureError: a branch removal on a family without separable branches (:func:`branches_of`).
    """
    original = decoder_layers(model)[layer]
    new = _shallow(_rebind(original, cache_slot) if cache_slot is not None else original)
    if branches == "am":
        return new
    table = branches_of(model)
    for kind, code in (("attn", "a"), ("mlp", "m")):
        if code not in branches:
            for name in getattr(table, kind):
                new._modules[name] = _stand_in(original, name)
            for name in getattr(table, f"{kind}_norm"):
                new._modules[name] = PassThrough()
    return new


class ParallelLayers(nn.Module):
    """Layers run on the same input, residual updates summed: ``h + sum_k (L_k(h) - h)`` (Sun et al. 2024,
    "Transformer Layers as Painters", average the updates; summing keeps a one-member group equal to the layer)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.group = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        update = None
        for layer in self.group:
            out = layer(hidden_states, *args, **kwargs)
            delta = (out[0] if isinstance(out, tuple) else out) - hidden_states  # (B, T, H)
            update = delta if update is None else update + delta
        return hidden_states + update


def step_params(model: nn.Module, step: Step) -> int:
    """Parameters one step runs: the layer's, less those of its removed branches (and their pre-norms)."""
    return sum(p.numel() for p in layer_occurrence(model, step.layer, step.branches).parameters())


def check_steps(model: nn.Module, steps: Steps) -> None:
    """Refuse what cannot be evaluated faithfully, before anything is measured.

    Raises:
        ArchitectureError: a branch removal on a family without separable branches.
        PlanError: a parallel group whose layers differ in a per-layer config entry (sliding vs full attention):
            one call gets one attention mask, so no plain model computes it.
    """
    n_layers = len(decoder_layers(model))
    lists = _per_layer_config_lists(model.config, n_layers)
    for step in steps:
        if any(m.branches != "am" for m in members(step)):
            branches_of(model)
        if isinstance(step, Par):
            for name in lists:
                values = {str(getattr(model.config, name)[m.layer]) for m in step.steps}
                if len(values) > 1:
                    raise PlanError(f"parallel group {step}: its layers differ in {name} ({', '.join(sorted(values))}); "
                                    "parallel layers must share one attention mask")


class StepRunner:
    """Calls steps on a residual stream with arguments captured from one unpruned forward (the trie's steps).

    Unit steps run an occurrence built once per (layer, branches) (:func:`layer_occurrence`); a parallel group
    adds the members' updates, each member called with its own captured arguments. The model is never mutated.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self._occurrences: dict[Step, nn.Module] = {}

    def module(self, step: Step) -> nn.Module:
        if step.branches == "am":
            return self.layers[step.layer]
        if step not in self._occurrences:
            self._occurrences[step] = layer_occurrence(self.model, step.layer, step.branches)
        return self._occurrences[step]

    def __call__(self, step: Step | Par, hidden: torch.Tensor, calls: LayerCalls) -> torch.Tensor:
        if isinstance(step, Par):
            update = None
            for member in step.steps:
                delta = self(member, hidden, calls) - hidden  # (B, T, H)
                update = delta if update is None else update + delta
            return hidden + update
        args, kwargs = calls.calls[step.layer]
        out = self.module(step)(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class AppliedVariant:
    """The model while :func:`applied` holds a variant: ``new_cache()`` gives the KV cache to pass to its forward
    (None: the model's own default is right)."""

    model: nn.Module
    slot_layers: list[int | None]
    """KV-cache slot -> the original layer whose attention fills it (None: no attention runs there)."""
    slot_types: list[str] | None = None

    def new_cache(self):
        if all(layer is not None for layer in self.slot_layers) and len(self.slot_layers) == n_layers_of(
                self.model.config):
            return None
        return _cache_for(self.model.config, self.slot_layers, self.slot_types)


def _cache_for(config, slot_layers: list[int | None], slot_types: list[str] | None):
    """A DynamicCache with one slot per entry of ``slot_layers``, and transformers' ``DummyLayer`` where no
    attention runs, so that the sequence length (hence positions and masks) is read from a slot that is filled."""
    import copy  # noqa: PLC0415 - only here
    from transformers import DynamicCache  # noqa: PLC0415
    from transformers.cache_utils import DummyLayer  # noqa: PLC0415

    slots_config = copy.copy(config)
    slots_config.num_hidden_layers = len(slot_layers)
    if slot_types is not None:
        slots_config.layer_types = [slot_types[j] for j in range(len(slot_layers))]
    cache = DynamicCache(config=slots_config)
    for j, layer in enumerate(slot_layers):
        if layer is None:
            cache.layers[j] = DummyLayer()
    return cache


@contextlib.contextmanager
def applied(model: nn.Module, variant) -> Iterator[AppliedVariant]:
    """Context in which ``model`` runs ``variant`` (any key of :mod:`sweep.steps`); restored on exit.

    Block removals use :func:`pruned` (as before). Otherwise the decoder list becomes one module per step
    occurrence (:func:`layer_occurrence`: parameters shared, each with its own KV-cache slot, so a repeated layer
    sees the cache it would see as a distinct layer), parallel groups a :class:`ParallelLayers` whose extra members
    get slots after the positions, and the config's layer count and per-layer lists follow the steps (a step takes
    its first member's entries). Pass ``new_cache()`` as the forward's cache: removed attentions get no slot.
    """
    n_layers = len(decoder_layers(model))
    if is_block_variant(variant):
        with pruned(model, list(variant)):
            kept = len(decoder_layers(model))
            yield AppliedVariant(model, list(range(kept)))
        return
    steps = steps_of(variant, n_layers)
    check_steps(model, steps)
    adapter = adapter_for(model)
    parent_path, list_name = adapter.layers.rsplit(".", 1)
    parent, layers, config = _get(model, parent_path), decoder_layers(model), model.config
    source = [members(s)[0].layer for s in steps]
    changes = _config_changes(config, source)
    old_config = {name: getattr(config, name) for name in changes}
    occurrences, slot_layers, slot_sources = _occurrences(model, steps)
    setattr(parent, list_name, nn.ModuleList(occurrences))
    for name, value in changes.items():
        setattr(config, name, value)
    types = getattr(config, "layer_types", None)
    try:
        original_types = old_config.get("layer_types")
        slot_types = [original_types[i] for i in slot_sources] if types is not None and original_types else None
        yield AppliedVariant(model, slot_layers, slot_types)
    finally:
        setattr(parent, list_name, layers)
        for name, value in old_config.items():
            setattr(config, name, value)


def _occurrences(model: nn.Module, steps: Steps) -> tuple[list[nn.Module], list[int | None], list[int]]:
    """Modules of a step sequence, the layer each KV-cache slot serves (None: no attention) and its source layer."""
    modules, slot_layers, slot_sources = [], [None] * len(steps), [0] * len(steps)
    for j, step in enumerate(steps):
        built = []
        for k, member in enumerate(members(step)):
            slot = j
            if k:
                slot = len(slot_layers)
                slot_layers.append(None)
                slot_sources.append(member.layer)
            built.append(layer_occurrence(model, member.layer, member.branches, cache_slot=slot))
            slot_layers[slot] = member.layer if "a" in member.branches else None
            slot_sources[slot] = member.layer
        modules.append(built[0] if len(built) == 1 else ParallelLayers(built))
    return modules, slot_layers, slot_sources


@contextlib.contextmanager
def materialized(model: nn.Module, steps: Steps) -> Iterator[nn.Module]:
    """Context in which ``model`` holds a deep copy of a layer per step (whole-block steps only: repeats, swaps,
    reversals), numbered by position, with the config's layer count and per-layer lists following the steps:
    what ``save_pretrained`` writes for export (it refuses the shared tensors of :func:`applied`). Restored on exit.

    Raises:
        ConfigError: a step that is not a whole block (no standard config expresses it).
    """
    import copy  # noqa: PLC0415 - only export copies layers

    if any(isinstance(s, Par) or s.branches != "am" for s in steps):
        raise ConfigError("only whole-layer steps can be materialized")
    adapter = adapter_for(model)
    parent_path, list_name = adapter.layers.rsplit(".", 1)
    parent, layers, config = _get(model, parent_path), decoder_layers(model), model.config
    copies = nn.ModuleList(copy.deepcopy(layers[s.layer]) for s in steps)
    for position, layer in enumerate(copies):
        for module in layer.modules():
            for attr in _index_attrs(module):
                setattr(module, attr, position)
    changes = _config_changes(config, [s.layer for s in steps])
    old_config = {name: getattr(config, name) for name in changes}
    setattr(parent, list_name, copies)
    for name, value in changes.items():
        setattr(config, name, value)
    try:
        yield model
    finally:
        setattr(parent, list_name, layers)
        for name, value in old_config.items():
            setattr(config, name, value)


# ---------------------------------------------------------------------------------------------- LoRA healing

_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # Conv1D; c_proj is both the attention output and the MLP output
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    **{t: _LLAMA_PROJECTIONS for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere",
    )},
}
"""model_type -> module names of every attention and MLP projection (LoRA targets, as in the QLoRA paper)."""


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

    Known families use :data:`LORA_TARGETS` (keeping only names present in the model); other families fall back
    to every linear map inside a decoder layer, e.g. ``['c_attn', 'c_proj', 'c_fc']`` for GPT-2.

    Raises:
        ArchitectureError: no linear map found inside the decoder layers.
    """
    layers = decoder_layers(model)
    present = _projection_names(layers[0]) if len(layers) else []
    known = [n for n in LORA_TARGETS.get(getattr(model.config, "model_type", ""), ()) if n in present]
    targets = known or present
    if not targets:
        raise ArchitectureError(f"no linear projections found inside the decoder layers of {type(model).__name__}; "
                                "pass --lora-targets")
    return targets

"""Layer surgery on a loaded model: removing layers in place (reversibly), unit stand-ins for a removed attention
or MLP branch, per-occurrence layers for repeats, swaps and parallel groups, parameter counts and shape signatures.

Layer removal is reversible and cheap: :func:`remove_layers` swaps the decoder ``ModuleList`` for one holding
only the kept layers (no weight is copied), makes the config agree (layer count and every per-layer list such
as ``layer_types``) and renumbers each kept module's ``layer_idx`` so the KV cache is indexed correctly. It
returns an ``undo`` callable; :func:`pruned` wraps both in a context manager. Export applies the same removal
without undo and saves, so the in-memory variant and the exported model are the same code path. Where the layers
are is the family record's business (:mod:`.families`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sweep.engine.adapters.families import Branches, branches_of, decoder_layers, n_layers_of, replace_layers
from sweep.errors import ConfigError, PlanError
from sweep.steps import Par, Step, Steps, is_block_variant, members, steps_of


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


def layers_config(config, kept: Sequence[int]):
    """A copy of ``config`` for a model of only the ``kept`` layers (layer count and per-layer lists follow)."""
    import copy  # noqa: PLC0415 - only here

    new = copy.deepcopy(config)
    for name, value in _config_changes(config, kept).items():
        setattr(new, name, value)
    return new


def remove_layers(model: nn.Module, removed: Sequence[int]) -> Callable[[], None]:
    """Remove decoder layers in place; return a callable that restores the model exactly.

    Example: on a 4-layer model, ``remove_layers(model, [1, 2])`` leaves layers ``[0, 3]``; the old layer 3 is
    now at index 1 and its attention's ``layer_idx`` is 1, so ``generate()`` indexes a 2-layer KV cache.

    Raises:
        ConfigError: a removed index is out of range or repeated.
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    removed = list(removed)
    if any(not 0 <= i < n_layers for i in removed) or len(set(removed)) != len(removed):
        raise ConfigError(f"cannot remove layers {removed} from a model with layers 0-{n_layers - 1}")
    kept = [i for i in range(n_layers) if i not in set(removed)]
    config = model.config
    changes = _config_changes(config, kept)
    old_config = {name: getattr(config, name) for name in changes}
    old_idx = _renumber(layers, kept)
    replace_layers(model, nn.ModuleList([layers[i] for i in kept]))
    for name, value in changes.items():
        setattr(config, name, value)

    def undo() -> None:
        replace_layers(model, layers)
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


# ---------------------------------------------------------------------------------------------- units and occurrences


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
    """An inline MLP's first linear's stand-in (OPT's fc1): (N, H) -> (N, 0), so the activation and fc2 do no work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


class ZeroOut(nn.Module):
    """An inline MLP's second linear's stand-in (OPT's fc2): (N, 0) -> zeros (N, H)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)


def _stand_ins(layer: nn.Module, table: Branches, kind: str) -> dict[str, nn.Module]:
    """Child name -> stand-in for removing the ``kind`` ("attn" or "mlp") branch of one layer.

    The attention (first ``attn`` entry) gets :class:`ZeroAttention`, which leaves the KV cache alone; an inline
    MLP ``(fc1, fc2)`` gets a zero-width input and zeros out, so its activation does no work; every other output
    module (a whole MLP, a post-branch norm) gets zeros like its input.
    """
    names = getattr(table, kind)
    if kind == "attn":
        return {name: ZeroAttention() if i == 0 else ZeroLike() for i, name in enumerate(names)}
    if table.inline_mlp:
        first, last = names
        return {first: ZeroWidth(), last: ZeroOut(getattr(layer, last).out_features)}
    return {name: ZeroLike() for name in names}


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
            new._modules.update(_stand_ins(original, table, kind))
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



# ---------------------------------------------------------------------------------------------- variants in place


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
    from transformers.cache_utils import DummyLayer  # noqa: PLC0415

    slots_config = copy.copy(config)
    slots_config.num_hidden_layers = len(slot_layers)
    if slot_types is not None:
        slots_config.layer_types = [slot_types[j] for j in range(len(slot_layers))]
    cache = _slot_cache_class()(config=slots_config)
    for j, layer in enumerate(slot_layers):
        if layer is None:
            cache.layers[j] = DummyLayer()
    return cache


@functools.cache
def _slot_cache_class():
    """A ``DynamicCache`` whose removed-attention slots (``DummyLayer``) report the sequence length of the first
    filled slot: transformers 5.24 redirected ``get_seq_length()`` so itself, 5.25 reads slot 0 whatever it holds
    (and a variant without layer 0's attention has a dummy there)."""
    from transformers import DynamicCache  # noqa: PLC0415
    from transformers.cache_utils import DummyLayer  # noqa: PLC0415

    class SlotCache(DynamicCache):
        def get_seq_length(self, layer_idx: int = 0) -> int:
            if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], DummyLayer):
                layer_idx = next((i for i, slot in enumerate(self.layers) if not isinstance(slot, DummyLayer)),
                                 len(self.layers))
            return super().get_seq_length(layer_idx)

    return SlotCache


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
    layers, config = decoder_layers(model), model.config
    source = [members(s)[0].layer for s in steps]
    changes = _config_changes(config, source)
    old_config = {name: getattr(config, name) for name in changes}
    occurrences, slot_layers, slot_sources = _occurrences(model, steps)
    replace_layers(model, nn.ModuleList(occurrences))
    for name, value in changes.items():
        setattr(config, name, value)
    types = getattr(config, "layer_types", None)
    try:
        original_types = old_config.get("layer_types")
        slot_types = [original_types[i] for i in slot_sources] if types is not None and original_types else None
        yield AppliedVariant(model, slot_layers, slot_types)
    finally:
        replace_layers(model, layers)
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
    layers, config = decoder_layers(model), model.config
    copies = nn.ModuleList(copy.deepcopy(layers[s.layer]) for s in steps)
    for position, layer in enumerate(copies):
        for module in layer.modules():
            for attr in _index_attrs(module):
                setattr(module, attr, position)
    changes = _config_changes(config, [s.layer for s in steps])
    old_config = {name: getattr(config, name) for name in changes}
    replace_layers(model, copies)
    for name, value in changes.items():
        setattr(config, name, value)
    try:
        yield model
    finally:
        replace_layers(model, layers)
        for name, value in old_config.items():
            setattr(config, name, value)

"""Replaying decoder layers one at a time: capture how one unpruned forward called every layer, then call any
layer (or a step: a layer without a branch, a parallel group) on any residual stream with those arguments. The
trie engine and the similarity signals are built on this; the model is never mutated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sweep.engine.adapters.families import decoder_layers, final_norm
from sweep.engine.adapters.surgery import layer_occurrence
from sweep.steps import Par, Step


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
    norm = final_norm(model)
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

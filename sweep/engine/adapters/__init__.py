"""Model adapters: the only package that knows attribute names such as ``transformer.h`` or ``model.layers``.

- :mod:`.families`: one record per model family (where its layers and final norm are, its residual branches,
  whether its blocks are parallel, its LoRA targets), and finding the layers of a loaded model;
- :mod:`.surgery`: removing layers in place and undoing it, unit stand-ins, per-occurrence layers for order edits,
  applying any variant, materializing it for export, parameter counts and shape signatures;
- :mod:`.replay`: capturing how one forward called each layer and calling layers one at a time (the trie's steps).
"""
from sweep.engine.adapters.families import (FAMILIES, Adapter, Branches, Family, adapter_for, branches_of,
                                            decoder_layers, family_of, final_norm, lora_target_modules, n_layers_of)
from sweep.engine.adapters.replay import (LayerCalls, StepRunner, call_layer, capture_layer_calls,
                                          capture_residual_stream, final_norm_fn)
from sweep.engine.adapters.surgery import (LAYER_INDEX_ATTRS, AppliedVariant, ParallelLayers, applied, check_steps,
                                           embedding_params, layer_occurrence, layer_params, layer_signature,
                                           layers_config, materialized, pruned, remove_layers, shape_signature,
                                           step_params, total_params)

__all__ = [
    "FAMILIES", "LAYER_INDEX_ATTRS", "Adapter", "AppliedVariant", "Branches", "Family", "LayerCalls",
    "ParallelLayers", "StepRunner", "adapter_for", "applied", "branches_of", "call_layer", "capture_layer_calls",
    "capture_residual_stream", "check_steps", "decoder_layers", "embedding_params", "family_of", "final_norm",
    "final_norm_fn", "layer_occurrence", "layer_params", "layer_signature", "layers_config", "lora_target_modules",
    "materialized", "n_layers_of", "pruned", "remove_layers", "shape_signature", "step_params", "total_params",
]

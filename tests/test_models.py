"""Layer removal against an independent reference: a model physically built without those layers."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from sweep.engine import adapters, models
from sweep.errors import ArchitectureError
from tiny import FAMILIES, tiny_model

LAYER_PREFIX = {"gpt2": "transformer.h.", "gpt_neo": "transformer.h.", "opt": "model.decoder.layers."}
"""Where each family keeps its layers, spelled out here independently of sweep.engine.adapters."""


def physically_pruned(model, family: str, removed):
    """Reference: a fresh model with fewer layers, loaded with the kept layers' renamed weights."""
    import copy

    n_layers = model.config.num_hidden_layers
    kept = [i for i in range(n_layers) if i not in removed]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[i] for i in kept]
    if family == "gpt_neo":
        config.attention_types = [[[model.config.attention_layers[i]], 1] for i in kept]
        config.attention_layers = [model.config.attention_layers[i] for i in kept]
    prefix = LAYER_PREFIX.get(family, "model.layers.")
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix):].split(".", 1)
            if int(old) in kept:
                renamed[f"{prefix}{kept.index(int(old))}.{rest}"] = value
        else:
            renamed[key] = value
    attn = model.config._attn_implementation
    reference = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    missing, unexpected = reference.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in k or "bias" in k or "masked_bias" in k for k in missing), missing
    return reference


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_every_subset_equals_physically_pruned_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    for k in range(0, 5):
        for removed in itertools.combinations(range(4), k):
            with adapters.pruned(model, removed):
                got = logits(model, ids)
            want = logits(physically_pruned(model, family, removed), ids)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{family} without {removed}")


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma2"])
def test_removing_no_layer_and_restoring_leave_model_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    config_before = model.config.to_dict()
    idx_before = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    with adapters.pruned(model, []):
        torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    with adapters.pruned(model, [0, 2]):
        assert adapters.n_layers_of(model.config) == 2
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    assert model.config.to_dict() == config_before
    assert [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)] == idx_before


def test_pruned_restores_model_after_an_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError):
        with adapters.pruned(model, [1]):
            raise RuntimeError("boom")
    assert len(adapters.decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "llama", "qwen2", "gemma2", "opt", "phi3"])
def test_export_reloads_with_same_logits_and_generates(family, tmp_path):
    model = tiny_model(family)
    removed = [1, 2]
    ids = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with adapters.pruned(model, removed):
        want = logits(model, ids)
    models.export_pruned(model, None, removed, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation)
    reloaded.eval()
    assert reloaded.config.num_hidden_layers == 2
    for layer_types in ("layer_types", "attention_layers"):
        if getattr(reloaded.config, layer_types, None) is not None:
            assert len(getattr(reloaded.config, layer_types)) == 2
    idx = sorted({m.layer_idx for m in reloaded.modules() if isinstance(getattr(m, "layer_idx", None), int)})
    assert idx in ([], [0, 1])
    torch.testing.assert_close(logits(reloaded, ids), want, rtol=0, atol=1e-5)
    out = reloaded.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True,
                            pad_token_id=0)
    assert out.shape == (1, 18)
    # The original model is untouched by the export.
    assert adapters.n_layers_of(model.config) == 4 and len(adapters.decoder_layers(model)) == 4


def test_parameters_drop_by_exactly_the_removed_blocks():
    model = tiny_model("llama")
    per_layer = adapters.layer_params(model)
    for removed in ([0], [1, 3], [0, 1, 2, 3]):
        with adapters.pruned(model, removed):
            pruned_total = adapters.total_params(model)
        assert pruned_total == adapters.total_params(model) - sum(per_layer[i] for i in removed)
        reference = physically_pruned(model, "llama", removed)
        assert pruned_total == sum(p.numel() for p in reference.parameters())


def test_embedding_params_count_tied_head_once():
    model = tiny_model("gpt2")  # GPT-2 ties lm_head to wte
    n_embd, vocab, positions = 32, 96, 128
    assert adapters.embedding_params(model) == vocab * n_embd + positions * n_embd


def test_gpt2_latency_signature_depends_only_on_layer_count():
    model = tiny_model("gpt2")
    assert adapters.shape_signature(model, [0, 1]) == adapters.shape_signature(model, [2, 3])
    assert adapters.shape_signature(model, [0, 1]) != adapters.shape_signature(model, [0, 1, 2])


def test_sliding_and_full_layers_have_different_signatures():
    model = tiny_model("gemma2")  # layer types alternate sliding/full
    assert adapters.shape_signature(model, [0]) != adapters.shape_signature(model, [1])
    assert adapters.shape_signature(model, [0]) == adapters.shape_signature(model, [2])
    # Order does not change cost: (sliding, full) and (full, sliding) share a measurement.
    assert adapters.shape_signature(model, [0, 1]) == adapters.shape_signature(model, [1, 2])
    assert adapters.shape_signature(model, [0, 2]) != adapters.shape_signature(model, [0, 1])


def test_unknown_architecture_names_the_model_class():
    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "mystery", "num_hidden_layers": 3})()
            self.body = torch.nn.Linear(2, 2)

    with pytest.raises(ArchitectureError, match="NoLayers"):
        adapters.adapter_for(NoLayers())


def test_generic_fallback_finds_layer_list_of_unlisted_type():
    model = tiny_model("llama")
    model.config.model_type = "llama-fork"
    assert adapters.adapter_for(model).layers == "model.layers"


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_after_removal_matches_full_forward(family):
    """Each kept layer must find its own KV-cache slot (layer_idx / GPT-Neo's layer_id renumbered)."""
    model = tiny_model(family)
    ids = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    with adapters.pruned(model, [1]), torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits[:, -1]
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("removed", [[1], ["r1"]])
def test_a_bfloat16_variant_exports_and_passes_its_reload_check(removed, tmp_path):
    """The reload check compares like with like: a bfloat16 variant against a bfloat16 reload."""
    model = tiny_model("llama", n_layers=3).to(torch.bfloat16)
    models.export_pruned(model, None, removed, tmp_path)  # raises ExportError when the check fails
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.config.num_hidden_layers == (2 if removed == [1] else 4)

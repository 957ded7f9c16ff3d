"""The family records (sweep/engine/adapters/families.py) against real transformers models of each family: every
path, branch module and LoRA target a record names exists in a tiny model built from config."""
from __future__ import annotations

import pytest
from torch import nn

from sweep.engine import adapters
from sweep.errors import ArchitectureError
from tiny import FAMILIES as TINY_FAMILIES, tiny_model


def test_every_record_is_consistent():
    for model_type, family in adapters.FAMILIES.items():
        assert family.model_type == model_type
        assert not (family.parallel and family.branches), f"{model_type}: parallel blocks have no separable branches"
        if family.layers is None:
            assert family.parallel, f"{model_type}: only parallel-block families rely on finding the layers"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_record_names_what_the_model_has(family):
    model = tiny_model(family)
    record = adapters.family_of(family)
    assert record is not None, f"{family} has no record"
    adapter = adapters.adapter_for(model)
    assert adapter.layers == record.layers and adapter.final_norm == record.final_norm  # the record, not the fallback
    assert isinstance(adapters.final_norm(model), nn.Module)
    layer = adapters.decoder_layers(model)[0]
    children = dict(layer.named_children())
    branches = adapters.branches_of(model)
    for name in (*branches.attn, *branches.mlp, *branches.attn_norm, *branches.mlp_norm):
        assert name in children, f"{family}: {name} is not a child of its decoder layer ({sorted(children)})"
    linears = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    targets = adapters.lora_target_modules(model)
    assert targets and set(targets) <= linears
    if record.lora_targets:
        assert set(targets) == set(record.lora_targets) & linears


def test_parallel_families_refuse_branch_removal_by_name():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gptj", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=8)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ArchitectureError, match="GPT-J"):
        adapters.branches_of(model)
    assert len(adapters.decoder_layers(model)) == 2

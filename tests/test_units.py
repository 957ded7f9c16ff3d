"""Attention-only / MLP-only removal and layer-order edits: the trie's steps equal physically built references.

References are independent of the engine: deep copies of the model whose decoder list holds deep copies of the
layers in step order (duplicated, permuted), hand-written layers without one residual branch, and a plain module
that sums parallel layers' updates; each runs the model's plain forward.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sweep import steps
from sweep.engine import adapters
from sweep.errors import ArchitectureError, PlanError
from tiny import tiny_model



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

FAMILIES = ("gpt2", "llama", "qwen3")
KEYS = ("a1", "m2", "a0,m3", "1,a2", "r1", "r1-2", "s1", "s0,s2", "v1-3", "p1-2", "p0-3", "a1,r2", "m0,s2",
        "a0,m3,p1-2")


def _attention(layer: nn.Module, family: str) -> nn.Module:
    return layer.attn if family == "gpt2" else layer.self_attn


class HandWrittenLayer(nn.Module):
    """One block of GPT-2 / Llama / Qwen3 written out by hand, with branch ``drop`` ("attn" or "mlp") left out."""

    def __init__(self, layer: nn.Module, family: str, drop: str):
        super().__init__()
        self.layer, self.family, self.drop = layer, family, drop

    def forward(self, hidden_states, *args, **kwargs):
        layer, h = self.layer, hidden_states
        if self.family == "gpt2":  # GPT-2 passes (h, cache, attention_mask) positionally
            kwargs = dict(kwargs, cache=args[0] if args else kwargs.get("cache"),
                          attention_mask=args[1] if len(args) > 1 else kwargs.get("attention_mask"))
        pre_attn, pre_mlp = ((layer.ln_1, layer.ln_2) if self.family == "gpt2"
                             else (layer.input_layernorm, layer.post_attention_layernorm))
        if self.drop != "attn":
            attn_kwargs = {k: kwargs.get(k) for k in ("attention_mask", "position_ids", "cache", "use_cache",
                                                      "position_embeddings") if k in kwargs}
            h = h + _attention(layer, self.family)(pre_attn(h), **attn_kwargs)[0]
        if self.drop != "mlp":
            h = h + layer.mlp(pre_mlp(h))
        return h


class SummedLayers(nn.Module):
    """Physical parallel group: every layer on the same input, updates summed."""

    def __init__(self, layers):
        super().__init__()
        self.group = nn.ModuleList(layers)

    def forward(self, h, *args, **kwargs):
        outs = [layer(h, *args, **kwargs) for layer in self.group]
        return h + sum((o[0] if isinstance(o, tuple) else o) - h for o in outs)


def physical(model, family: str, step_seq) -> nn.Module:
    """A deep copy with the layers deep-copied in step order (config layer count and lists rewritten)."""
    ref = copy.deepcopy(model)
    old = adapters.decoder_layers(ref)
    built, sources, extra_slot = [], [], len(step_seq)
    for step in step_seq:
        group = []
        for k, member in enumerate(steps.members(step)):
            layer = copy.deepcopy(old[member.layer])
            slot = len(built) if k == 0 else extra_slot
            extra_slot += k > 0
            for module in layer.modules():
                for attr in ("layer_idx", "layer_id"):
                    if isinstance(getattr(module, attr, None), int):
                        setattr(module, attr, slot)
            if member.branches != "am":
                layer = HandWrittenLayer(layer, family, "attn" if "a" not in member.branches else "mlp")
            group.append(layer)
        built.append(group[0] if len(group) == 1 else SummedLayers(group))
        sources.append(steps.members(step)[0].layer)
    holder = ref.transformer if family == "gpt2" else ref.model
    name = "h" if family == "gpt2" else "layers"
    setattr(holder, name, nn.ModuleList(built))
    for attr in ("layer_types",):
        if isinstance(getattr(ref.config, attr, None), list):
            setattr(ref.config, attr, [getattr(ref.config, attr)[i] for i in sources])
    ref.config.num_hidden_layers = len(built)
    return ref


def replayed(model, step_seq, ids):
    calls = adapters.capture_layer_calls(model, ids)
    run = adapters.StepRunner(model)
    hidden = calls.hidden
    for step in step_seq:
        hidden = run(step, hidden, calls)
    return adapters.final_norm_fn(model)(hidden)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param, seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 90, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key", KEYS)
def test_step_replay_equals_physical_reference(family_model, ids, key):
    family, model = family_model
    step_seq = steps.steps_of(steps.parse_key(key), 4)
    got = replayed(model, step_seq, ids)
    want = physical(model, family, step_seq).base_model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with adapters.applied(model, steps.parse_key(key)):  # the in-memory variant (per-variant engine, latency)
        in_memory = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(in_memory, want, rtol=0, atol=1e-6)


def test_model_is_untouched_by_steps(family_model, ids):
    family, model = family_model
    before = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    replayed(model, steps.steps_of(("a1", "m2", "r3"), 4), ids)
    with adapters.applied(model, ("a0", "p1-2")):
        pass
    after = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(before, after)
    assert adapters.n_layers_of(model.config) == 4 and len(adapters.decoder_layers(model)) == 4


ATTENTION_OUTPUT = {"gpt2": "attn.c_proj", "gpt_neo": "attn.attention.out_proj", "opt": "self_attn.out_proj"}
"""Where each family keeps its attention's output projection (default ``self_attn.o_proj``)."""


@pytest.mark.parametrize("family", ("gpt2", "gpt_neo", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                    "phi3"))
def test_attention_with_zero_output_projection_removes_exactly(family, ids):
    model = tiny_model(family, seed=5)
    proj = adapters.decoder_layers(model)[2].get_submodule(ATTENTION_OUTPUT.get(family, "self_attn.o_proj"))
    proj.weight.zero_()
    if getattr(proj, "bias", None) is not None:
        proj.bias.zero_()
    baseline = replayed(model, steps.steps_of((), 4), ids)
    removed = replayed(model, steps.steps_of(("a2",), 4), ids)
    assert torch.equal(baseline, removed)


def test_parallel_block_family_is_refused_by_name():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gptj", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  rotary_dim=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ArchitectureError, match="GPT-J"):
        adapters.check_steps(model, steps.steps_of(("a1",), 2))
    adapters.check_steps(model, steps.steps_of(("r1",), 2))  # order edits need no separable branches


def test_parallel_group_of_mixed_attention_types_is_refused():
    model = tiny_model("gemma2")
    with pytest.raises(PlanError, match="layer_types"):
        adapters.check_steps(model, steps.steps_of(("p1-2",), 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_step_parameters_exclude_removed_branches(family):
    model = tiny_model(family)
    layer = adapters.decoder_layers(model)[1]
    attn = _attention(layer, family)
    pre_attn = layer.ln_1 if family == "gpt2" else layer.input_layernorm
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    whole = count(layer)
    assert adapters.step_params(model, steps.Step(1, "m")) == whole - count(attn) - count(pre_attn)
    assert adapters.step_params(model, steps.Step(1, "am")) == whole


def _decode(model, prompt, cache, n_new: int = 5):
    """Greedy decoding with a plain forward loop (what latency.time_decode does): (new tokens, logits per step)."""
    kwargs = {} if cache is None else {"past_key_values": cache}
    out = model(input_ids=prompt, use_cache=True, **kwargs)
    tokens, logits = [], []
    for _ in range(n_new):
        logits.append(out.logits[0, -1])
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))  # (1, 1)
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, 1), torch.stack(logits)


@pytest.mark.parametrize("key", ("a0", "a0,a2", "r1", "r1-2", "s1", "a1,r2", "p1-2"))
def test_cached_decoding_of_a_variant_equals_its_physical_model(family_model, key):
    """Removed attentions get no cache slot (positions stay right), repeated layers their own slot: decoding
    with the cache gives what the physical model computes without one (teacher-forced)."""
    family, model = family_model
    prompt = torch.randint(2, 90, (1, 10), generator=torch.Generator().manual_seed(2))
    with adapters.applied(model, steps.parse_key(key)) as variant:
        tokens, got = _decode(model, prompt, variant.new_cache())
    reference = physical(model, family, steps.steps_of(steps.parse_key(key), 4))
    text = torch.cat([prompt, tokens[:, :-1]], 1)
    want = reference(input_ids=text, use_cache=False).logits[0, prompt.shape[1] - 1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- worker and runner


def _worker(model):
    from sweep.config import SweepConfig
    from sweep.engine.data import EvalSetup, TokenizedText
    from sweep.engine.worker import Worker

    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(0))
    cfg = SweepConfig(latency="off", batch_size=4)
    return Worker(model, TokenizedText(ids.numpy(), 200, "t", "t"), EvalSetup(64, 32, None), cfg)


@pytest.mark.parametrize("family", ("llama", "opt"))
def test_trie_rows_of_units_and_order_edits_equal_per_variant_rows(family):
    worker = _worker(tiny_model(family))
    variants = [(), (1,), ("a1",), ("m1",), ("a0", "m3"), ("r1",), ("s2",), ("v0-2",), ("p1-2",), ("a0", "p2-3")]
    rows = {r["removed"]: r for r in worker.evaluate_many(variants)}
    for variant in variants:
        reference = worker.evaluate(variant)  # the in-memory model (adapters.applied), one variant at a time
        got = rows[reference["removed"]]
        assert got["ppl"] == pytest.approx(reference["ppl"], rel=1e-6), variant
        assert (got["params"], got["n_layers"], got["kept_layers"]) == (
            reference["params"], reference["n_layers"], reference["kept_layers"])


def test_rows_count_units_calls_and_parameters():
    model = tiny_model("llama")
    worker = _worker(model)
    layers = adapters.decoder_layers(model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = worker.total_params
    row = worker.evaluate_many([("a1", "m2")])[0]
    assert (row["removed"], row["n_removed"], row["n_layers"], row["kept_layers"]) == ("a1,m2", 2, 4, "0,1m,2a,3")
    assert row["params"] == total - count(layers[1].self_attn) - count(layers[1].input_layernorm) \
        - count(layers[2].mlp) - count(layers[2].post_attention_layernorm)
    repeat = worker.evaluate_many([("r1-2",)])[0]
    assert (repeat["n_removed"], repeat["n_layers"]) == (0, 6)
    assert repeat["params"] == total + count(layers[1]) + count(layers[2])  # a copy per occurrence, as exported
    parallel = worker.evaluate_many([("p1-2",)])[0]
    assert (parallel["n_layers"], parallel["kept_layers"], parallel["params"]) == (4, "0,1+2,3", total)


def test_unit_variants_share_a_latency_signature_and_differ_from_blocks():
    worker = _worker(tiny_model("llama"))
    assert worker.signature(("a1",)) == worker.signature(("a3",))
    assert worker.signature(("a1",)) != worker.signature((1,)) != worker.signature(())
    assert worker.signature(("s1",)) == worker.signature(())  # same layers, another order: same cost


def test_run_units_and_order_edits_end_to_end(tiny_gpt2_dir, sample_text_file, tmp_path):
    import sqlite3

    from sweep.config import SweepConfig
    from sweep.engine.runner import run_sweep

    common = dict(model=str(tiny_gpt2_dir), data=str(sample_text_file), db=str(tmp_path / "r.db"),
                  cache_dir=str(tmp_path / "cache"), max_length=64, max_tokens=512, latency_seq=16,
                  decode_tokens=4, latency_repeats=5, latency_max_repeats=5, latency_budget=0.0)
    run_sweep(SweepConfig(**common, strategy="single", unit="attn"), log=lambda s: None, progress=False)
    run_sweep(SweepConfig(**common, strategy="repeat,swap,parallel"), log=lambda s: None, progress=False)
    rows = {r[0]: r[1:] for r in sqlite3.connect(tmp_path / "r.db").execute(
        "select removed, status, ppl, prefill_ms, decode_ms_per_token from results")}
    # 4 layers: the middle ones are 1 and 2, so s2 and p2-3 (which would move layer 3) are not planned
    assert set(rows) == {"", "a0", "a1", "a2", "a3", "r1", "r2", "s1", "p1-2"}
    assert all(status == "ok" and ppl > 0 and prefill > 0 and decode > 0
               for status, ppl, prefill, decode in rows.values())


def test_run_refuses_branch_removal_of_a_parallel_block_family(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sweep.engine.worker import Worker  # noqa: F401 - the refusal comes from the worker's check

    config = AutoConfig.for_model("gptj", vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  rotary_dim=4)
    worker = _worker(AutoModelForCausalLM.from_config(config).eval())
    with pytest.raises(ArchitectureError, match=r"GPT-J \(gptj\).*--unit block"):
        worker.check_variants([("m0",)])


def test_greedy_over_mix_units_runs_end_to_end_and_is_stored_beside_block_greedy(
        tiny_gpt2_dir, sample_text_file, tmp_path):
    import sqlite3

    from sweep.config import SweepConfig
    from sweep.engine.runner import run_sweep

    common = dict(model=str(tiny_gpt2_dir), data=str(sample_text_file), calib_data=str(sample_text_file),
                  db=str(tmp_path / "g.db"), cache_dir=str(tmp_path / "cache"), max_length=32, max_tokens=256,
                  calib_max_tokens=256, latency="off", strategy="greedy", n="1-3")
    run_sweep(SweepConfig(**common, unit="mix"), log=lambda s: None, progress=False)
    run_sweep(SweepConfig(**common), log=lambda s: None, progress=False)
    db = sqlite3.connect(tmp_path / "g.db")
    choices = dict(((s, n), r) for s, n, r in db.execute("select strategy, n, removed from strategy_choices"))
    assert {s for s, _ in choices} == {"greedy", "greedy-mix"}
    mix = [choices[("greedy-mix", n)] for n in (1, 2, 3)]

    def units(key):  # a block in a mix key is both of its branches
        return {u for e in steps.parse_key(key) for u in ([f"a{e}", f"m{e}"] if isinstance(e, int) else [e])}

    assert [len(units(k)) for k in mix] == [1, 2, 3]
    assert units(mix[0]) < units(mix[1]) < units(mix[2])  # each round adds one unit to the previous variant
    stored = {r[0] for r in db.execute("select removed from results where status = 'ok'")}
    assert set(mix) <= stored


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("key", ("r1", "r1-2", "s0", "v1-3", "1,r2"))
def test_export_of_reordered_layers_reloads_as_the_physical_model(family_model, key, tmp_path):
    from transformers import AutoModelForCausalLM

    from sweep.engine import models

    family, model = family_model
    variant = steps.parse_key(key)
    step_seq = steps.steps_of(variant, 4)
    models.export_pruned(model, None, variant, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation)
    reloaded.eval()
    assert reloaded.config.num_hidden_layers == len(step_seq)
    prompt = torch.randint(2, 90, (1, 12), generator=torch.Generator().manual_seed(4))
    reference = physical(model, family, step_seq)
    torch.testing.assert_close(reloaded(input_ids=prompt).logits, reference(input_ids=prompt).logits,
                               rtol=0, atol=1e-6)
    # generate() with the reloaded model's own cache: one slot per occurrence
    tokens, got = _decode(reloaded, prompt, None)
    text = torch.cat([prompt, tokens[:, :-1]], 1)
    torch.testing.assert_close(got, reference(input_ids=text, use_cache=False).logits[0, prompt.shape[1] - 1:],
                               rtol=0, atol=1e-5)
    assert adapters.n_layers_of(model.config) == 4 and len(adapters.decoder_layers(model)) == 4


@pytest.mark.parametrize("key, why", (("a1", "attention-only or MLP-only"), ("m2,r1", "attention-only or MLP-only"),
                                      ("p1-2", "parallel layers")))
def test_export_refuses_what_no_standard_config_expresses(key, why, tmp_path):
    from sweep.engine import models
    from sweep.errors import ExportError

    with pytest.raises(ExportError, match=why):
        models.export_pruned(tiny_model("llama"), None, steps.parse_key(key), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", ("gemma2", "gpt_neo", "qwen2", "opt", "phi3"))
def test_export_of_a_repeat_reloads_on_families_with_per_layer_config_lists(family, tmp_path):
    from sweep.engine import models

    model = tiny_model(family)
    models.export_pruned(model, None, ("r1-2",), tmp_path)  # verifies the reloaded logits against the in-memory variant
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("num_layers", config.get("n_layer"))) == 6

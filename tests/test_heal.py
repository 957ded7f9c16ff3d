"""`sweep heal`: LoRA healing of a pruned tiny model, offline on CPU."""
from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # trains a tiny model, heals it with LoRA and evaluates tasks

pytest.importorskip("peft")

from tiny import FAMILIES, tiny_model

from sweep import store
from sweep.engine import adapters, models
from sweep.config import build_config
from sweep.errors import MissingExtraError
from sweep.extras.heal import heal_variant, sequences

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    """(evaluation text, healing text): two different fixed texts from tests/data."""
    out = tmp_path_factory.mktemp("heal-text")
    evaluation, healing = out / "eval.txt", out / "heal.txt"
    evaluation.write_text((DATA / "calib.txt").read_text()[:4000])
    healing.write_text((DATA / "sample.txt").read_text()[:4000])
    return evaluation, healing


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, byte_tokenizer_dir, texts) -> Path:
    """A tiny 4-layer GPT-2 trained briefly (80 steps) on the healing text, saved with its tokenizer.

    Trained enough that its layers matter: removing one raises the loss, which LoRA can then win back.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    model = tiny_model("gpt2", n_layers=4, vocab=256).train()
    seqs = sequences(tokenizer(texts[1].read_text())["input_ids"], 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = seqs[torch.randint(len(seqs), (8,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained-gpt2")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def heal_config(model_dir: Path, texts, db: Path, cache: Path, **extra):
    values = {"model": str(model_dir), "data": str(texts[0]), "heal_data": str(texts[1]), "db": str(db),
              "cache_dir": str(cache), "max_tokens": 512, "max_length": 64, "latency": "off", "device": "cpu",
              "heal_steps": 30, "heal_seq": 64, "heal_batch_size": 8, "heal_lr": 1e-2, "heal_eval_every": 10,
              "heal_eval_batches": 2, "lora_r": 8, "lora_alpha": 16}
    values.update(extra)
    return build_config(**values)


@pytest.fixture(scope="module")
def healed(tmp_path_factory, trained_dir, texts):
    """One heal of the variant without layer 2, exported, with --heal-tasks when lm-eval is installed;
    returns (config, heal row, export dir)."""
    tmp = tmp_path_factory.mktemp("heal")
    cfg = heal_config(trained_dir, texts, tmp / "results.db", tmp / "cache")
    if importlib.util.find_spec("lm_eval") is not None:
        from toy_tasks import arithmetic_docs, write_task

        task_dir = write_task(tmp / "tasks", "toy_arith", arithmetic_docs())
        cfg = heal_config(trained_dir, texts, tmp / "results.db", tmp / "cache", heal_tasks=True, tasks="toy_arith",
                          task_include=str(task_dir))
    row = heal_variant(cfg, (2,), export=str(tmp / "export"), log=lambda s: None, progress=False)
    return cfg, row, tmp / "export"


def test_heal_lowers_the_loss_on_the_healing_data(healed):
    _, row, _ = healed
    assert row["status"] == "ok", row["error"]
    assert row["heal_loss_after"] < row["heal_loss_before"]
    assert row["trainable_params"] > 0


def test_healed_row_links_to_its_unhealed_variant(healed):
    cfg, row, _ = healed
    heals = store.read_heals(cfg.db)
    assert len(heals) == 1
    stored = heals[0]
    assert stored["id"] == row["id"]
    assert (stored["removed"], stored["n_removed"], stored["n_layers"]) == ("2", 1, 3)
    unhealed = store.find_result(store.open_db(cfg.db), stored["setup_id"], "2")
    assert unhealed is not None and unhealed["status"] == "ok"  # the link points at a real results row
    assert stored["ppl_pruned"] == unhealed["ppl"] == pytest.approx(stored["ppl_unhealed"])
    assert (stored["lora_r"], stored["lora_alpha"], stored["steps"], stored["method"]) == (8, 16, 30, "lora")
    assert stored["lora_targets"] == "c_attn,c_proj,c_fc"


def test_heal_tasks_store_base_pruned_and_healed_rows_linked_by_heal_id(healed):
    pytest.importorskip("lm_eval")
    cfg, row, _ = healed
    rows = {(r["removed"], r["heal_id"]): r for r in store.read_task_results(cfg.db)}
    assert set(rows) == {("", ""), ("2", ""), ("2", row["id"])}
    assert all(r["status"] == "ok" and r["task"] == "toy_arith" for r in rows.values())
    assert len({r["setup"] for r in rows.values()}) == 1  # healed rows share the task setup of the unhealed ones


def test_export_reloads_generates_and_has_the_healed_perplexity(healed):
    from transformers import AutoModelForCausalLM

    from sweep.engine.worker import load_worker

    cfg, row, export = healed
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert model.config.num_hidden_layers == 3
    prompt = torch.tensor([[10, 20, 30, 40]])
    out = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    # The exported model (physically pruned, LoRA merged) measured as a plain model gives the healed perplexity.
    reloaded = load_worker(build_config(**{**_fields(cfg), "model": str(export)})).evaluate([])
    assert reloaded["ppl"] == pytest.approx(row["ppl"], rel=1e-4)


def _fields(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def test_the_same_heal_twice_is_not_redone(healed):
    from dataclasses import replace

    cfg, row, _ = healed
    cfg = replace(cfg, heal_tasks=False)  # --heal-tasks or --export would need the healed model again
    again = heal_variant(cfg, (2,), log=lambda s: None, progress=False)
    assert again["id"] == row["id"] and again["measured_at"] == store.read_heals(cfg.db)[0]["measured_at"]
    conn = sqlite3.connect(cfg.db)
    assert conn.execute("SELECT COUNT(*) FROM heals").fetchone()[0] == 1
    conn.close()


def test_missing_peft_names_the_extra(monkeypatch):
    import sys

    from sweep.extras.heal import require_peft

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError, match=r"sweep\[heal\]"):
        require_peft()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_every_projection_of_a_decoder_layer(family):
    model = tiny_model(family)
    layer = adapters.decoder_layers(model)[0]
    linear_leaves = {name.rsplit(".", 1)[-1] for name, m in layer.named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    assert set(adapters.lora_target_modules(model)) == linear_leaves


def test_fresh_lora_adapters_leave_the_pruned_model_unchanged_and_merging_keeps_trained_ones():
    """LoRA's B matrix starts at zero: wrapping must not change the logits; after B is trained (here: set at
    random) the merged model must compute what the adapters compute (checks fan_in_fan_out on GPT-2's Conv1D)."""
    from sweep.extras.heal import lora_model

    model = tiny_model("gpt2")
    ids = torch.arange(1, 17)[None]
    cfg = build_config(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(0)
    with adapters.pruned(model, [1]), torch.no_grad():
        want = model(input_ids=ids).logits
        wrapped = lora_model(model, cfg, adapters.lora_target_modules(model)).eval()
        assert torch.allclose(wrapped(input_ids=ids).logits, want, atol=1e-6)
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        adapted = wrapped(input_ids=ids).logits
        assert not torch.allclose(adapted, want, atol=1e-3)
        merged = wrapped.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
    assert len(adapters.decoder_layers(model)) == 4  # the removed layer is back, untouched by LoRA


@pytest.mark.parametrize("remove", [None, "1;2", ""])
def test_cli_heal_needs_exactly_one_group_of_layers(tmp_path, capsys, tiny_gpt2_dir, remove):
    from sweep.cli import main

    argv = ["heal", "--model", str(tiny_gpt2_dir), "--db", str(tmp_path / "r.db")]
    code = main(argv + (["--remove", remove] if remove is not None else []))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sweep: error: ") and "--remove" in err and "Traceback" not in err
    assert not (tmp_path / "r.db").exists()


def test_cli_bad_lora_value_names_the_flag(tmp_path, capsys, tiny_gpt2_dir):
    from sweep.cli import main

    code = main(["heal", "--model", str(tiny_gpt2_dir), "--remove", "1", "--lora-dropout", "1.5"])
    assert code == 2 and "`--lora-dropout`" in capsys.readouterr().err


def test_missing_healing_data_names_heal_data(tmp_path, tiny_gpt2_dir, texts):
    from sweep.errors import DataError
    from sweep.extras.heal import heal_sequences
    from sweep.engine.models import tokenizer_for as load_tokenizer

    cfg = heal_config(tiny_gpt2_dir, texts, tmp_path / "r.db", tmp_path / "cache", heal_data=str(tmp_path / "no.txt"))
    with pytest.raises(DataError, match="^--heal-data "):
        heal_sequences(cfg, load_tokenizer(cfg))


def test_a_local_healing_file_holds_out_its_last_tenth(tmp_path, tiny_gpt2_dir, texts):
    from sweep.extras.heal import heal_sequences
    from sweep.engine.models import tokenizer_for as load_tokenizer

    cfg = heal_config(tiny_gpt2_dir, texts, tmp_path / "r.db", tmp_path / "cache")
    tokenizer = load_tokenizer(cfg)
    train, held, _, held_name = heal_sequences(cfg, tokenizer)
    everything = sequences(tokenizer(texts[1].read_text())["input_ids"], cfg.heal_seq)
    assert torch.equal(torch.cat([train, held]), everything)
    assert len(held) == len(everything) // 10 and "last" in held_name


def test_rows_heal_measures_are_complete_for_a_later_sweep_run(tmp_path, trained_dir, texts):
    """Baseline and variant rows that `sweep heal` had to measure carry latency and a log entry, like `sweep run`'s:
    a later `sweep run` of the setup keeps them and the speed columns of every row are filled."""
    from sweep.engine.runner import run_sweep

    timing = {"latency": "shared", "latency_seq": 16, "decode_tokens": 0, "latency_warmup": 0}
    cfg = heal_config(trained_dir, texts, tmp_path / "r.db", tmp_path / "cache", heal_steps=2, heal_eval_every=1,
                      **timing)
    heal_variant(cfg, (2,), log=lambda s: None, progress=False)
    run_sweep(heal_config(trained_dir, texts, tmp_path / "r.db", tmp_path / "cache", strategy="single", **timing),
              log=lambda s: None, progress=False)
    rows = {r["removed"]: r for r in store.read_view(cfg.db)}
    assert set(rows) == {"", "0", "1", "2", "3"}
    assert all(r["speed_ms"] is not None and r["speed_change_pct"] is not None for r in rows.values())
    log = store.open_db(cfg.db).execute("SELECT removed, count(*) FROM measurements GROUP BY removed").fetchall()
    assert dict(log) == {key: 1 for key in rows}  # heal's two rows were measured once, and not again by run

"""`sweep tasks`: lm-eval on a tiny model against a local multiple-choice task the test writes, offline."""
from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # lm-eval imports and indexes its tasks, then evaluates tiny models

pytest.importorskip("lm_eval")

from toy_tasks import N_DOCS, arithmetic_docs, write_task

from sweep import store
from sweep.config import build_config
from sweep.errors import ConfigError, MissingExtraError
from sweep.extras.tasks import check_task_names, run_tasks, task_manager


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("tasks"), "toy_arith", arithmetic_docs())


def tasks_config(model_dir: Path, task_dir: Path, db: Path, **extra):
    values = {"model": str(model_dir), "tasks": "toy_arith", "task_include": str(task_dir), "db": str(db),
              "limit": N_DOCS, "batch_size": 4, "device": "cpu", "remove": "1;0,2"}
    values.update(extra)
    return build_config(**values)


def reference_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Independent reference: argmax over choices of log p(" " + choice | question), summed over its tokens."""
    import torch

    correct = 0
    for doc in docs:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(" " + choice)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
            positions = range(len(context) - 1, len(context) + len(continuation) - 1)
            scores.append(sum(logprobs[p, ids[0, p + 1]].item() for p in positions))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return correct / len(docs)


def task_rows(db: Path) -> dict[str, tuple]:
    conn = sqlite3.connect(db)
    try:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT removed, value, stderr, status, n_samples, measured_at FROM task_results WHERE heal_id = ''")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def measured_db(tmp_path_factory, tiny_gpt2_dir, task_dir) -> Path:
    db = tmp_path_factory.mktemp("db") / "results.db"
    summary = run_tasks(tasks_config(tiny_gpt2_dir, task_dir, db), log=lambda s: None, progress=False)
    assert summary.measured == 3 and summary.failed == 0
    return db


def test_accuracy_of_each_pruned_variant_equals_the_reference(measured_db, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweep.engine import adapters, models

    rows = task_rows(measured_db)
    assert set(rows) == {"", "1", "0,2"}  # the baseline comes along for the "base" column
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    for key, removed in (("", []), ("1", [1]), ("0,2", [0, 2])):
        with adapters.pruned(model, removed):
            want = reference_accuracy(model, tokenizer, arithmetic_docs())
        value, stderr, status, n_samples, _ = rows[key]
        assert status == "ok" and n_samples == N_DOCS
        assert value == pytest.approx(want)
        # lm-eval's stderr of a mean of 0/1 outcomes: sqrt(p (1 - p) / (n - 1))
        assert stderr == pytest.approx(math.sqrt(want * (1 - want) / (N_DOCS - 1)))


def test_second_run_measures_nothing(measured_db, tiny_gpt2_dir, task_dir):
    before = task_rows(measured_db)
    summary = run_tasks(tasks_config(tiny_gpt2_dir, task_dir, measured_db), log=lambda s: None, progress=False)
    assert summary.measured == 0 and summary.already_done == 3
    assert task_rows(measured_db) == before


def test_other_task_settings_are_a_new_setup(measured_db, tiny_gpt2_dir, task_dir):
    summary = run_tasks(tasks_config(tiny_gpt2_dir, task_dir, measured_db, limit=5, remove="1"),
                        log=lambda s: None, progress=False)
    assert summary.measured == 2  # baseline and [1] again, under limit 5
    limits = {r["task_limit"] for r in store.read_task_results(measured_db)}
    assert limits == {N_DOCS, 5}


def test_a_task_that_cannot_load_is_a_failed_row_and_retried(tmp_path, tiny_gpt2_dir):
    broken = write_task(tmp_path / "broken", "toy_broken", None, data_file="missing.jsonl")
    db = tmp_path / "results.db"
    cfg = tasks_config(tiny_gpt2_dir, broken, db, tasks="toy_broken", remove="1")
    summary = run_tasks(cfg, log=lambda s: None, progress=False)
    assert summary.failed == 2
    rows = store.read_task_results(db)
    assert {r["status"] for r in rows} == {"failed"} and all(r["error"] for r in rows)
    write_task(tmp_path / "broken", "toy_broken", arithmetic_docs(4), data_file="missing.jsonl")
    again = run_tasks(cfg, log=lambda s: None, progress=False)
    assert again.measured == 2 and again.failed == 0


def test_unknown_task_names_the_close_one(task_dir):
    manager = task_manager(str(task_dir), defaults=False)
    with pytest.raises(ConfigError, match="toy_arith"):
        check_task_names(["toy_arth"], manager)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import sys

    from sweep.extras.tasks import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r"sweep\[tasks\]"):
        require_lm_eval()


# ---------------------------------------------------------------------------------------------- selection


def test_best_reads_perplexities_from_the_db(tmp_path, tiny_gpt2_dir, sample_text_file, task_dir):
    from sweep.engine.runner import run_sweep
    from sweep.extras.tasks import select_variants

    db = tmp_path / "results.db"
    run_sweep(build_config(model=str(tiny_gpt2_dir), data=str(sample_text_file), db=str(db), max_tokens=256,
                           max_length=64, latency="off", cache_dir=str(tmp_path / "cache"), strategy="single"),
              log=lambda s: None, progress=False)
    view = [r for r in store.read_view(db) if r["n_removed"] == 1]
    cfg = tasks_config(tiny_gpt2_dir, task_dir, db, remove=None, best=1)
    chosen = select_variants(cfg, 4, store.open_db(db))
    assert chosen == [(), tuple(map(int, min(view, key=lambda r: r["ppl"])["removed"].split(",")))]


def test_best_without_perplexities_says_to_run_first(tmp_path, tiny_gpt2_dir, task_dir):
    from sweep.errors import SweepError
    from sweep.extras.tasks import select_variants

    cfg = tasks_config(tiny_gpt2_dir, task_dir, tmp_path / "r.db", remove=None, pareto=True)
    with pytest.raises(SweepError, match="sweep run"):
        select_variants(cfg, 4, store.open_db(tmp_path / "r.db"))


def test_only_one_way_of_choosing_variants(tmp_path, tiny_gpt2_dir, task_dir):
    from sweep.extras.tasks import select_variants

    cfg = tasks_config(tiny_gpt2_dir, task_dir, tmp_path / "r.db", remove="1", best=2)
    with pytest.raises(ConfigError, match="--remove and --best"):
        select_variants(cfg, 4, store.open_db(tmp_path / "r.db"))


# ---------------------------------------------------------------------------------------------- command line


def test_cli_tasks_stores_rows_and_resumes(tmp_path, capsys, tiny_gpt2_dir, task_dir):
    from sweep.cli import main

    db = tmp_path / "results.db"
    argv = ["tasks", "--model", str(tiny_gpt2_dir), "--tasks", "toy_arith", "--task-include", str(task_dir),
            "--limit", "4", "--remove", "3", "--db", str(db), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert "2 variants evaluated" in capsys.readouterr().out
    assert {r["removed"] for r in store.read_task_results(db)} == {"", "3"}
    assert main(argv) == 0
    assert "0 variants evaluated, 2 already in" in capsys.readouterr().out


def test_cli_tasks_unknown_task_is_one_error_line(tmp_path, capsys, tiny_gpt2_dir, task_dir):
    from sweep.cli import main

    code = main(["tasks", "--model", str(tiny_gpt2_dir), "--tasks", "toy_arith,toy_arth", "--task-include",
                 str(task_dir), "--db", str(tmp_path / "r.db"), "--remove", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("sweep: error: unknown lm-eval task 'toy_arth'") and "toy_arith" in err
    assert not (tmp_path / "r.db").exists()


def test_signal_strategies_reuse_the_choices_sweep_run_stored(tmp_path):
    from sweep.config import build_config
    from sweep.errors import SweepError
    from sweep.extras.tasks import select_variants

    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "toy", None, "float32", 4, "GPT2LMHeadModel")
    store.upsert_setup(db, model_id, {"data": "t", "weights": "w"})
    cfg = build_config(model="toy", db=str(tmp_path / "r.db"), strategy="angular,greedy", n="1,2")
    with pytest.raises(SweepError, match="sweep run --model toy --strategy angular,greedy"):
        select_variants(cfg, 4, db)
    key = {"model_id": model_id, "weights": "w", "calib_fingerprint": "c"}
    store.record_strategy_choices(db, key, [
        {"strategy": "angular", "signal": "a", "n": 1, "removed": "2", "score": 0.1},
        {"strategy": "angular", "signal": "a", "n": 3, "removed": "0,1,2", "score": 0.1},
        {"strategy": "greedy", "signal": "g", "n": 2, "removed": "1,3", "score": 5.0}])
    assert select_variants(cfg, 4, db) == [(), (2,), (1, 3)]  # n=3 is not in --n

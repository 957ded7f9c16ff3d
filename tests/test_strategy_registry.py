"""The strategy registry (``sweep.plan.STRATEGIES``): one record per strategy, and every consumer reads it.

Adding a strategy is its module and one record: the toy records below reach planning, ``sweep plan``'s count, the
``--strategy`` help, the runner's signal choices, the report's strategy table and ``sweep browse`` with no other
change; and no module outside the registry keeps its own list of strategy names.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweep import config, plan, store
from sweep.cli import build_parser
from sweep.errors import UnknownNameError
from sweep.plan import KINDS, STRATEGIES, PlanSpec, Strategy
from sweep.report import signals as strategy_report
from sweep.strategies import Choice

ROOT = Path(__file__).resolve().parents[1]
TOY = Strategy("toy", "layers 0 and 2", "plan", lambda n_layers, spec: iter([(0, 2)]), reported="plan",
               style=dict(marker="x"))
"""A new plan strategy: one fixed removal, reported by its plan."""
TOY_SIGNAL = Strategy("toy-signal", "the first n layers", "signal", lambda n_layers, spec: iter(()),
                      chooses=lambda sizes, cal: [Choice("toy-signal", n, tuple(range(n)), "toy", 1.0) for n in sizes],
                      reported="choices")
"""A new signal strategy that needs no calibration signal: it chooses the first n layers."""


@pytest.fixture
def toys(monkeypatch):
    for record in (TOY, TOY_SIGNAL):
        monkeypatch.setitem(STRATEGIES, record.name, record)


def _strategies_table() -> str:
    text = (ROOT / "docs" / "strategies.md").read_text()
    return text.split("## Strategies", 1)[1].split("\n\n", 2)[1]


def test_every_registered_strategy_is_in_the_strategies_table_of_the_docs():
    firsts = [row.split("|")[1] for row in _strategies_table().splitlines()[2:]]
    for name in STRATEGIES:
        assert any(f"`{name}`" in cell for cell in firsts), f"docs/strategies.md does not list `{name}`"


def test_records_are_consistent():
    for name, record in STRATEGIES.items():
        assert record.name == name and record.kind in KINDS and record.summary
        assert (record.chooses is not None) == (record.kind == "signal"), name
        assert record.reported in (None, "plan", "choices"), name
        assert set(record.needs) <= {"signals", "greedy-path", "search"}, name


def test_config_race_strategies_agree_with_the_registry():
    assert set(config.RACE_STRATEGIES) == set(plan.race_strategies())


def test_lookup_of_an_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="did you mean 'greedy'") as info:
        plan.strategy("greedyy")
    assert info.value.valid == sorted(STRATEGIES)


def _strategy_help() -> str:
    run = next(a for a in build_parser()._actions if a.dest == "command").choices["run"]
    return next(a.help for a in run._actions if a.dest == "strategy")


def test_strategy_help_is_derived_from_the_registry(toys):
    assert all(name in _strategy_help() for name in STRATEGIES)


def test_a_new_plan_strategy_is_planned_and_counted(toys):
    assert plan.plan_variants(4, PlanSpec(strategy="toy,single")) == [(), (0,), (1,), (2,), (3,), (0, 2)]
    assert plan.count_variants(4, PlanSpec(strategy="toy")) == 2
    assert plan.count_variants(4, PlanSpec(strategy="toy,exhaustive")) == 16
    with pytest.raises(UnknownNameError, match="toy"):
        plan.plan_variants(4, PlanSpec(strategy="nope"))


def _db_with(tmp_path, removals):
    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "org/tiny", None, "float32", 4, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "d", "weights": "w", "max_length": 8})
    for key in ("", *removals):
        store.record_result(db, {"setup_id": setup, "removed": key, "n_removed": len(plan.parse_key(key)),
                                 "n_layers": 4 - len(plan.parse_key(key)), "ppl": 10.0 + len(key), "status": "ok"})
    return db, setup, {"model_id": model_id, "weights": "w", "calib_fingerprint": "c"}


def test_a_new_signal_strategy_is_chosen_by_the_runner_and_reported(toys, tmp_path):
    from sweep.engine import similarity  # deferred: the engine imports torch; the rest of this file needs none

    db, setup, key = _db_with(tmp_path, ["0", "0,1", "0,2", "3"])
    cfg = config.SweepConfig(strategy="toy-signal,toy", n="1-2")
    cal = SimpleNamespace(n_layers=4, key=key, cfg=cfg)
    chosen = similarity.signal_choices(cfg, cal, db, log=lambda line: None)
    assert [(c.strategy, c.removed) for c in chosen] == [("toy-signal", (0,)), ("toy-signal", (0, 1))]
    table = strategy_report.strategy_table(store.read_view(db, setup=setup), store.read_strategy_choices(db, setup))
    assert "| toy-signal | " in table and "| toy | " in table and "| last-n | " in table


def test_browse_orders_a_new_strategy_from_the_registry():
    code = ("from sweep import plan; plan.STRATEGIES['toy'] = plan.Strategy('toy', 's', 'plan', plan._single, "
            "reported='plan'); from sweep.extras import browse; print(browse.STRATEGY_ORDER)")
    order = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    last = len(plan.reported_strategies())  # the registry's reported strategies, then toy, then the oracle
    assert f"WHEN 'toy' THEN {last} WHEN 'oracle' THEN {last + 1} ELSE {last + 2} END" in order


# ------------------------------------------------------------------------------------------ no other lists


def _is_docstring(node: ast.AST, parents: dict) -> bool:
    return isinstance(parents.get(node), ast.Expr)


def _name_lists(path: Path) -> list[str]:
    """Literal tuples, lists, sets and dict keys naming two or more strategies, and strings (not docstrings) that
    list two (``"angular, greedy"``, ``"angular/greedy"``, ``"angular or greedy"``, SQL's ``'angular' ... 'greedy'``)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    name = r"(?<![\w-])(?:" + "|".join(re.escape(n) for n in STRATEGIES) + r")(?![\w-])"
    listed = re.compile(name + r"(?:\s*[,/]\s*|,?\s+(?:or|and)\s+)" + name)
    quoted = re.compile("'(" + "|".join(re.escape(n) for n in STRATEGIES) + ")'")  # SQL: WHEN 'angular' THEN ...
    found = []
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            names = {i.value for i in items if isinstance(i, ast.Constant) and i.value in STRATEGIES}
            if len(names) >= 2:
                found.append(f"{path.name}:{node.lineno} {sorted(names)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and not _is_docstring(node, parents):
            if listed.search(node.value) or len(set(quoted.findall(node.value))) >= 2:
                found.append(f"{path.name}:{node.lineno} {node.value[:60]!r}")
    return found


ALLOWED = {"config.py": "RACE_STRATEGIES: the config sits below the plan; checked above"}
"""Modules that may list strategy names besides the registry (sweep/plan.py), and why."""


def test_no_module_outside_the_registry_lists_strategy_names():
    modules = [p for p in sorted((ROOT / "sweep").rglob("*.py"))
               if p.relative_to(ROOT / "sweep").as_posix() not in {"plan.py", *ALLOWED}]
    found = [hit for path in modules for hit in _name_lists(path)]
    assert found == [], "derive these from sweep.plan.STRATEGIES: " + "; ".join(found)

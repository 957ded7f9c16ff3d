"""The suite's own scheduling: tests that share a costly fixture, or must not run beside each other, share a worker.

pytest-xdist's ``--dist loadgroup`` (the README's test command) schedules by an ``@group`` suffix it writes into
each node id; pytest 9.2 moved node ids where pytest-xdist 3.8 no longer writes (pytest-xdist issue #1386), and the
groups are then silently ignored: costly module fixtures are built once per worker and the worker-process tests
run two at a time. ``pyproject.toml`` keeps pytest below 9.2; this test fails if grouping stops working again.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import COSTLY_MODULE_FIXTURES


@pytest.mark.xdist_group("suite-layout")
def test_a_grouped_test_is_scheduled_as_its_group(request):
    if "PYTEST_XDIST_WORKER" not in os.environ or not request.config.getvalue("loadgroup"):
        pytest.skip("not run with pytest-xdist --dist loadgroup (the README's test command)")
    assert request.node.nodeid.endswith("@suite-layout"), request.node.nodeid


def test_each_costly_fixture_is_a_module_fixture_of_the_suite():
    """Each name in the rule is defined with module scope in some test module (a renamed fixture would drop out
    of the rule silently)."""
    sources = "\n".join(path.read_text() for path in Path(__file__).parent.glob("test_*.py"))
    for name in COSTLY_MODULE_FIXTURES:
        assert re.search(rf'@pytest\.fixture\(scope="module"\)\ndef {name}\(', sources), name

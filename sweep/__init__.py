"""sweep: map what happens to a transformer language model when its decoder layers are removed.

    >>> import sweep
    >>> df = sweep.load_results("results.db", model="gpt2")   # pandas DataFrame of results_vs_baseline
    >>> sweep.compare("results.db", "2", "3", model="gpt2")     # is removing layer 2 really worse than layer 3?

The package is layered (see docs/architecture.md): a torch-free core (``cli``, ``config``, ``errors``, ``plan``,
``strategies``, ``ranking``, ``store``), the measuring ``engine`` (torch), the ``report`` (pandas, matplotlib; no
torch) and the ``extras`` (lm-eval tasks, LoRA healing, the offline demo).
"""
from __future__ import annotations

from collections.abc import Callable

from sweep import store
from sweep.errors import StoreError

Log = Callable[[str], None]
"""Where a command's progress lines go (``print`` by default; tests pass a list's ``append``)."""

__version__ = "0.1.0"
ENGINE_VERSION = "2"
"""Bumped whenever a change alters measured numbers; part of every setup id, so old rows are never mixed in."""


def load_results(db: str = "results.db", model: str | None = None, setup: str | None = None):
    """The rows of the view ``results_vs_baseline`` as a pandas DataFrame (same columns), optionally filtered.

    Raises:
        StoreError: no such database, or not a sweep database.
    """
    import pandas as pd  # deferred: pandas takes a second to import and only this function needs it here

    rows = store.read_view(db, model=model, setup=setup)
    columns = store.view_columns(db)
    return pd.DataFrame(rows, columns=columns)


def compare(db: str, a: str, b: str, model: str | None = None, setup: str | None = None):
    """How much higher variant ``a``'s perplexity is than ``b``'s (%), with the 95 % paired bootstrap interval over
    the evaluation windows: an :class:`sweep.intervals.Interval` whose ``excludes_zero`` is False when the two are
    indistinguishable on this text. ``setup`` defaults to the newest setup of ``model`` (or of the only model).

    Raises:
        StoreError: no such database, no such setup, or a variant without per-window losses.
    """
    from sweep import intervals, ranking  # deferred: numpy is needed only here, not by `import sweep`

    if setup is None:
        chosen = ranking.newest_setup(store.setups_overview(db), model)
        if chosen is None:
            raise StoreError(f"no setup of {model or 'any model'} in {db}")
        setup = chosen["setup"]
    return intervals.compare_variants(db, setup, a, b)

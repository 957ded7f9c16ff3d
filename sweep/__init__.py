"""sweep: map what happens to a transformer language model when its decoder layers are removed.

    >>> import sweep
    >>> df = sweep.load_results("results.db", model="gpt2")   # pandas DataFrame of results_vs_baseline
"""
from __future__ import annotations

__version__ = "0.1.0"
ENGINE_VERSION = "1"
"""Bumped whenever a change alters measured numbers; part of every setup id, so old rows are never mixed in."""


def load_results(db: str = "results.db", model: str | None = None, setup: str | None = None):
    """The rows of the view ``results_vs_baseline`` as a pandas DataFrame (same columns), optionally filtered.

    Raises:
        StoreError: no such database, or not a sweep database.
    """
    import pandas as pd

    from sweep import store

    rows = store.read_view(db, model=model, setup=setup)
    columns = store.view_columns(db)
    return pd.DataFrame(rows, columns=columns)

"""sweep: map what happens to a transformer language model when its decoder layers are removed.

    >>> import sweep
    >>> df = sweep.load_results("results.db", model="gpt2")   # pandas DataFrame of results_vs_baseline

The package is layered (see docs/architecture.md): a torch-free core (``cli``, ``config``, ``errors``, ``plan``,
``strategies``, ``ranking``, ``store``), the measuring ``engine`` (torch), the ``report`` (pandas, matplotlib; no
torch) and the ``extras`` (lm-eval tasks, LoRA healing, the offline demo).
"""
from __future__ import annotations

from sweep import store

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

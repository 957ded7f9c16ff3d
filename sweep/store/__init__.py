"""results.db: the only package that runs SQL. No torch.

- :mod:`~sweep.store.schema`: every table, column and view (the single source of the schema and its docs);
- :mod:`~sweep.store.db`: opening, recognising and upgrading a file, and where it may live;
- :mod:`~sweep.store.results`: models, setups, result rows (one writer, with the measurement log), the view;
- :mod:`~sweep.store.runs`: runs and their liveness;
- :mod:`~sweep.store.signals`: calibration signals, the greedy path, the search's candidates, strategy choices;
- :mod:`~sweep.store.tasks`: task accuracy and heals.

A result row is committed the moment it is measured, so an interrupted sweep loses at most the chunk in flight.
Failures are rows too (``status`` = ``failed`` or ``diverged`` with ``error``), as in optuna's trial states: a
sweep never crashes on one bad variant and never silently skips it.
"""
from sweep.store.db import (BUSY_TIMEOUT_SECONDS, NETWORK_FILESYSTEMS, Database, as_db, check_local_and_writable,
                            check_writable, filesystem_type, fstype_from_mountinfo, integrity_ok, now, open_db,
                            schema_version, store_error)
from sweep.store.results import (LATENCY_COLUMNS, LATENCY_FAILED, STATUSES, awaiting_latency, done_keys,
                                 fill_latency, find_model, find_result, hashed_id, interval_resamples, intervals_missing,
                                 latency_by_signature, mark_eliminated, race_progress, read_view, read_window_losses,
                                 record_intervals, record_result, record_results, seconds_per_variant, setup_id,
                                 setups_overview, upsert_model, upsert_setup, view_columns)
from sweep.store.runs import (RUN_STALE_SECONDS, STALE_ENV, beating, finish_run, heartbeat, process_alive,
                              process_start, reap_dead_runs, runs_overview, stale_seconds, start_run)
from sweep.store.schema import (HEAL_COLUMNS, RESULT_COLUMNS, SCHEMA_VERSION, TASK_RESULT_COLUMNS, WINDOW_NLL,
                                WINDOW_TOKENS, schema_markdown)
from sweep.store.signals import (read_greedy_steps, read_layer_similarity, read_search_candidates,
                                 read_strategy_choices, record_greedy_step, record_layer_similarity,
                                 record_search_candidate, record_strategy_choices, search_overview,
                                 similarity_overview)
from sweep.store.tasks import (done_task_keys, find_heal, heal_id, read_heals, read_task_results, record_heal,
                               record_task_result, upsert_task_setup)

__all__ = [name for name in dir() if not name.startswith("_")]

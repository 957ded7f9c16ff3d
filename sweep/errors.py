"""Named exceptions. Library code raises these; only the CLI turns them into a one-line message and exit 2."""
from __future__ import annotations

import difflib


class SweepError(Exception):
    """Base class of every error sweep reports to users."""


class ConfigError(SweepError):
    """A preset, flag or config value is invalid."""


class UnknownNameError(ConfigError):
    """A name (strategy, preset key, dtype, ...) is not one of the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        valid = sorted(valid)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}")
        self.name, self.valid = name, valid


class PlanError(SweepError):
    """A layer plan is invalid (index out of range, repeated layer, too many variants)."""


class VariantKeyError(PlanError):
    """A variant key, or one of its edits (``a3``, ``r2-4``...), that the key grammar does not allow."""


class DataError(SweepError):
    """Evaluation text cannot be loaded or is too short."""


class ModelLoadError(SweepError):
    """A model or tokenizer cannot be loaded."""


class ArchitectureError(SweepError):
    """No adapter knows where the decoder layers of this model are."""


class StoreError(SweepError):
    """results.db cannot be opened, created or written."""


class ExportError(SweepError):
    """A pruned model cannot be exported faithfully."""


class MissingExtraError(SweepError):
    """An optional dependency (pip extra such as sweep[tasks] or sweep[heal]) is not installed."""


class ClusterError(SweepError):
    """Worker processes or the Dask cluster cannot be started or reached."""

"""What identifies a measurement, defined once: the model row and the evaluation setup.

`sweep run`, `sweep plan`, `sweep similarity`, `sweep tasks` and `sweep heal` all derive their ids here, from the
flags alone (the resolved dtype and device, never a loaded model's attributes), so the same flags always give the
same model row and setup id: `sweep plan` counts exactly what `sweep run` stored, and a heal links to the rows of
the run it continues.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from sweep import ENGINE_VERSION, store
from sweep.config import SweepConfig
from sweep.engine.adapters import n_layers_of
from sweep.engine.data import EvalSetup, TokenizedText, used_tokens
from sweep.engine.device import device_name
from sweep.engine.models import dtype_name, model_class_name, resolve_device, resolve_dtype, weights_fingerprint

QLORA_DTYPE = "nf4"
"""The dtype name of 4-bit QLoRA base weights: their numbers are not those of the bfloat16 model."""


@dataclass(frozen=True)
class ModelIdentity:
    """The ``models`` row of a sweep, and its weights fingerprint."""

    name: str
    revision: str | None
    dtype: str
    n_layers: int
    model_class: str
    weights: str


@dataclass(frozen=True)
class SetupIdentity:
    """An evaluation setup: its model and the fields of its ``setups`` row (everything that changes the numbers)."""

    model: ModelIdentity
    fields: dict[str, Any]


def model_identity(cfg: SweepConfig, model_config, device: torch.device | None = None) -> ModelIdentity:
    """The model row ``cfg`` measures: name, revision, the dtype ``--dtype`` resolves to on ``device``, layers.

    Args:
        model_config: the model's config (loaded without weights).
        device: the resolved device (default: what ``--device`` resolves to here).
    """
    device = device or resolve_device(cfg.device)
    dtype = QLORA_DTYPE if cfg.qlora else dtype_name(resolve_dtype(cfg.dtype, device))
    return ModelIdentity(cfg.model, cfg.revision, dtype, n_layers_of(model_config), model_class_name(model_config),
                         weights_fingerprint(cfg.model, model_config, cfg.random_init))


def latency_settings(cfg: SweepConfig) -> str:
    """The latency settings that change the timings, e.g.
    ``shared:seq=128:decode=16:repeats=5-50:precision=0.03:budget=20:warmup=1:threads=1:seed=0``."""
    if cfg.latency == "off":
        return "off"
    return (f"{cfg.latency}:seq={cfg.latency_seq}:decode={cfg.decode_tokens}"
            f":repeats={cfg.latency_repeats}-{cfg.latency_max_repeats}:precision={cfg.latency_precision:g}"
            f":budget={cfg.latency_budget:g}:warmup={cfg.latency_warmup}:threads={cfg.latency_threads}:seed={cfg.seed}")


def evaluation_setup(cfg: SweepConfig, model_config, tokens: TokenizedText, windows: EvalSetup,
                     device: torch.device | None = None) -> SetupIdentity:
    """The evaluation setup of ``cfg``: weights, data, windows, latency settings, device and engine version."""
    device = device or resolve_device(cfg.device)
    model = model_identity(cfg, model_config, device)
    fields = {"data": tokens.name, "data_fingerprint": tokens.fingerprint, "data_tokens": len(tokens.ids),
              "max_length": windows.max_length, "stride": windows.stride, "max_tokens": windows.max_tokens,
              "latency_seq": cfg.latency_seq, "latency_settings": latency_settings(cfg), "weights": model.weights,
              "device": device_name(device), "engine_version": ENGINE_VERSION}
    return SetupIdentity(model, fields)


def register_model(db, model: ModelIdentity) -> int:
    """The id of ``model``'s row in ``db``, created if needed."""
    return store.upsert_model(db, model.name, model.revision, model.dtype, model.n_layers, model.model_class)


def register_setup(db, setup: SetupIdentity) -> str:
    """The id of ``setup``'s row in ``db`` (and its model's), created if needed."""
    return store.upsert_setup(db, register_model(db, setup.model), setup.fields)


def find_setup(db, setup: SetupIdentity) -> str | None:
    """The id ``setup`` has in ``db`` without writing anything: None when its model row does not exist yet."""
    model_id = store.find_model(db, setup.model.name, setup.model.revision, setup.model.dtype)
    return None if model_id is None else store.setup_id(model_id, setup.fields)


def calibration_fingerprint(tokens: TokenizedText, max_length: int, max_tokens: int | None) -> str:
    """Fingerprint of the calibration tokens actually used: text + tokenizer (``tokens.fingerprint``) + windows."""
    used = used_tokens(len(tokens.ids), max_tokens)
    blob = f"{tokens.fingerprint}:max_length={max_length}:tokens={used}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibration_key(db, cfg: SweepConfig, model_config, tokens: TokenizedText, max_length: int,
                    device: torch.device | None = None) -> dict[str, Any]:
    """The key calibration signals are stored under: the model row (created if needed), its weights, and the
    fingerprint of the calibration tokens and windows."""
    model = model_identity(cfg, model_config, device)
    return {"model_id": register_model(db, model), "weights": model.weights,
            "calib_fingerprint": calibration_fingerprint(tokens, max_length, cfg.calib_max_tokens)}

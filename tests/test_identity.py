"""One setup identity: run, plan, similarity, tasks and heal derive the same model row and setup id from the same
flags (sweep/engine/identity.py), so each finds what the others stored."""
from __future__ import annotations

import numpy as np
import pytest

from sweep import engine, store
from sweep.config import SweepConfig, replace
from sweep.engine import identity, models, similarity
from sweep.engine.data import TokenizedText, load_tokens, resolve_windows, used_tokens


@pytest.fixture(scope="module")
def swept(tiny_gpt2_dir, sample_text_file, tmp_path_factory):
    """A finished `sweep run` of the single removals of the tiny model: (config, its summary)."""
    tmp = tmp_path_factory.mktemp("identity")
    cfg = SweepConfig(model=str(tiny_gpt2_dir), data=str(sample_text_file), max_length=64, max_tokens=256,
                      strategy="single", db=str(tmp / "r.db"), cache_dir=str(tmp / "cache"), device="cpu",
                      latency="off", calib_data=str(sample_text_file), calib_max_tokens=128)
    return cfg, engine.run_sweep(cfg, log=lambda s: None, progress=False)


def _model_id_of(db, setup: str) -> int:
    return db.execute("SELECT model_id FROM setups WHERE id = ?", [setup]).fetchone()[0]


def test_plan_computes_the_setup_id_run_stored_without_loading_weights(swept):
    cfg, summary = swept
    model_config = models.config_for(cfg)
    windows = resolve_windows(cfg, model_config)
    tokens = load_tokens(cfg, models.tokenizer_for(cfg), windows)
    db = store.open_db(cfg.db, create=False)
    assert identity.find_setup(db, identity.evaluation_setup(cfg, model_config, tokens, windows)) == summary.setup
    info = engine.describe_plan(cfg, log=lambda s: None)
    assert info["measured"] == info["variants"] == summary.planned  # plan counts exactly what run stored


def test_heal_opens_the_setup_run_stored(swept):
    cfg, summary = swept
    _, setup = engine.open_setup(cfg, engine.load_worker(cfg))  # what `sweep heal` calls
    assert setup == summary.setup


def test_similarity_and_tasks_register_the_run_model_row(swept):
    cfg, summary = swept
    db = store.open_db(cfg.db)
    model = models.model_for(cfg)
    calibration = similarity.open_calibration(cfg, model, models.tokenizer_for(cfg), db)
    assert calibration.key["model_id"] == _model_id_of(db, summary.setup)
    task_identity = engine.model_identity(cfg, model.config, next(model.parameters()).device)  # as `sweep tasks`
    assert engine.register_model(db, task_identity) == _model_id_of(db, summary.setup)
    assert db.execute("SELECT count(*) FROM models").fetchone()[0] == 1


def _identity_of(cfg: SweepConfig) -> tuple[str, str]:
    """(model dtype, setup fields hash) of ``cfg``, computed as every command computes it."""
    model_config = models.config_for(cfg)
    windows = resolve_windows(cfg, model_config)
    setup = identity.evaluation_setup(cfg, model_config, load_tokens(cfg, models.tokenizer_for(cfg), windows), windows)
    return setup.model.dtype, store.setup_id(0, setup.fields)


def test_a_changed_flag_is_a_different_setup_and_an_unchanged_one_is_not(swept):
    cfg, _ = swept
    original = _identity_of(cfg)
    assert _identity_of(replace(cfg, strategy="exhaustive", db="other.db")) == original  # not part of the setup
    for changed in (replace(cfg, max_length=32), replace(cfg, latency="shared"), replace(cfg, dtype="bfloat16"),
                    replace(cfg, max_tokens=192)):
        assert _identity_of(changed) != original, changed


def test_the_calibration_fingerprint_counts_the_tokens_used_not_the_cap():
    tokens = TokenizedText(ids=np.arange(500), n_bytes=2000, fingerprint="f", name="text")
    whole = identity.calibration_fingerprint(tokens, 64, None)
    assert identity.calibration_fingerprint(tokens, 64, 500) == whole
    assert identity.calibration_fingerprint(tokens, 64, 10_000) == whole  # a cap beyond the text cuts nothing
    assert identity.calibration_fingerprint(tokens, 64, 499) != whole
    assert used_tokens(500, None) == used_tokens(500, 10_000) == 500 and used_tokens(500, 64) == 64

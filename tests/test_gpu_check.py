"""`make gpu-check` without a GPU: it refuses cleanly; its pieces that need none work here."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import WIKITEXT_TEST, need_shared

ROOT = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu-check would run for minutes")
def test_gpu_check_needs_a_gpu(capsys):
    assert load_check().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_verdicts_name_each_target_met_missed_or_without_figure():
    check = load_check()
    figures = {"stages": {"gpt2": {"gpt2_exhaustive_seconds": 250.0}, "llama": {"llama_full_variant_seconds": 1.5,
                                                                              "llama_single_sweep_seconds": math.inf},
                          "pytest": {"status": "failed"}}}
    lines = "\n".join(check.verdicts(figures))
    assert "GPT-2 exhaustive sweep (4,096 variants), full test, end to end: 250 (target <= 300) met" in lines
    assert "one full variant (max-length 2048): 1.5 (target <= 1.2) MISSED" in lines
    assert "single-layer sweep, end to end: inf (target <= 25) MISSED" in lines  # stopped at its time limit
    assert "pytest -m gpu failures: no figure" in lines and "bfloat16 vs float32 perplexity, GPT-2: no figure" in lines
    assert set(check.LEVERS) and all({"head"} <= set(s) for s in check.LEVERS.values())


def test_a_stopped_exhaustive_sweep_reports_its_projection_and_runs_last():
    check = load_check()
    stopped = {"rows": 1024, "wall_seconds": 100.0, "seconds": math.inf}
    assert check.projected_seconds(stopped, 4096) == pytest.approx(400.0)  # a quarter of the plan in 100 s
    assert check.projected_seconds({**stopped, "rows": 4096}, 4096) == 100.0  # a whole plan: its own time
    assert check.projected_seconds({**stopped, "rows": 0}, 4096) == math.inf
    figures = {"stages": {"gpt2": {"gpt2_exhaustive_seconds": math.inf, "projected_seconds": 401.2}}}
    assert "inf (target <= 300) MISSED (stopped at its limit; projected 401 s)" in "\n".join(check.verdicts(figures))
    assert list(check.STAGE_LIMITS)[-1] == "gpt2"  # it can use its whole limit: the others run first


def test_prepared_text_is_the_text_sweep_evaluates(tmp_path):
    need_shared(WIKITEXT_TEST)
    from sweep.engine.data import load_text

    shared = WIKITEXT_TEST.parents[2]
    path = load_check().prepare_text(shared, tmp_path)
    assert load_text(str(path)) == load_text(str(WIKITEXT_TEST))  # same tokens, without `datasets` on the GPU


def test_gpu_tests_are_collected_from_modules_that_import_only_what_the_gpu_image_has():
    files = load_check().gpu_test_files()
    assert files and all("pytest.mark.gpu" in Path(f).read_text() for f in files)
    for path in files:
        imports = [line for line in Path(path).read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in imports if any(m in line for m in ("datasette", "lm_eval", "peft", "dask"))]


def test_gpu_wheels_target_downloads_what_the_check_installs():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("gpu-wheels:"):].split("\n\n")[0]
    for name in ("sqlite-utils", "click-default-group", "sqlite-fts4", "liger-kernel"):
        assert name in target
    assert "bench/wheels/" in (ROOT / ".gitignore").read_text()

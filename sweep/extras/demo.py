"""The offline demo model: a tiny byte-level GPT-2 trained for a fixed number of seeded steps on the Python standard
library (about a minute on two idle cores).

``make demo`` has to run the whole sweep loop with no hub access, yet its report should show layers that matter
*differently*; random weights would only show noise. So this module trains a real (if small) model on text every
Python install carries, its own standard library, and holds out a disjoint set of files as evaluation text::

    python -m sweep.extras.demo --out .cache/demo [--steps 800] [--force]

writes ``<out>/model`` (a GPT-2 and its byte-level tokenizer, both loadable offline with ``from_pretrained``),
``<out>/heldout.txt`` and ``<out>/demo.json``. Everything is seeded and the number of steps is fixed, so every
machine gets the same model and the same report (only the run time varies; training runs on a fixed number of
threads, because the order of floating-point sums depends on it). The module is standalone on purpose (stdlib,
torch, transformers and tokenizers only) so that it cannot break when the rest of the package changes.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import sysconfig
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

VERSION = 2
"""Bump whenever a change here would produce a different model or text, so stale builds are not reused."""

EOS = "<|endoftext|>"
EOS_ID = 256  # ids 0..255 are the bytes themselves, so a token id *is* the byte value
N_LAYER, N_EMBD, N_HEAD, N_POSITIONS = 4, 64, 4, 256
SEQ_LEN, BATCH, LR, WARMUP_STEPS = 64, 32, 1e-2, 100
HELDOUT_EVERY = 10  # one file in ten is held out
# Bytes of evaluation text. `make demo` sweeps all 16 layer subsets over it, and one full-model pass over ~90 KB
# already takes 1-3 s on two cores (more on a busy machine); the layer effects are far above sampling noise.
HELDOUT_CAP = 100_000
STEPS = 800
"""Training steps of the demo model: enough for the report to show layers that matter differently (about 50 s on two
idle cores; a busy machine takes longer and gets the same model)."""
THREADS = 1
"""Training threads, fixed: the order of floating-point sums, and so the trained weights, depend on the thread
count. One: 64-wide matmuls gain little from more, and threads that spin-wait for each other slow training down
many times over on a busy machine."""
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

Log = Callable[[str], object]


# --- corpus -----------------------------------------------------------------------------------------------


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's own ``.py`` files, sorted, without test suites or installed packages.

    Args:
        root: Directory to scan; defaults to this interpreter's stdlib (``sysconfig``'s ``stdlib`` path).

    Returns:
        Absolute paths in a deterministic order.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune while walking: site-packages alone can hold far more files than the stdlib itself.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        files += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def split_corpus(root: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """Split the stdlib files into disjoint training and held-out lists.

    A file is held out when the CRC32 of its relative path is divisible by ``HELDOUT_EVERY``: deterministic
    (CRC32, unlike ``hash()``, is not salted per process) and stable when other files come or go.

    Args:
        root: As for :func:`stdlib_files`.

    Returns:
        ``(train_files, heldout_files)``, each sorted.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for f in stdlib_files(root):
        key = zlib.crc32(f.relative_to(root).as_posix().encode())
        (heldout if key % HELDOUT_EVERY == 0 else train).append(f)
    if not train or not heldout:
        raise RuntimeError(f"too few Python files under {root} to build the demo corpus")
    return train, heldout


def heldout_text(files: list[Path], cap: int = HELDOUT_CAP) -> str:
    """Evaluation text: a centred excerpt of whole lines from every held-out file, about ``cap`` bytes in all.

    Every file contributes equally, so one huge file cannot dominate; excerpts come from the middle because
    file openings are mostly licence headers and docstrings rather than code.
    """
    budget = max(cap // len(files), 1)
    return "".join(_centred_lines(f.read_bytes(), budget) for f in files)


def _centred_lines(data: bytes, budget: int) -> str:
    if len(data) > budget:
        start = (len(data) - budget) // 2
        chunk = data[start : start + budget]
        # Cutting at newlines keeps whole lines and valid UTF-8: b"\n" never occurs inside a multi-byte character.
        data = chunk[chunk.find(b"\n") + 1 : chunk.rfind(b"\n") + 1]
    text = data.decode("utf-8", errors="replace")
    return text if not text or text.endswith("\n") else text + "\n"


def train_bytes(files: list[Path]) -> torch.Tensor:
    """The training files concatenated as one uint8 tensor (token ids, since one token is one byte)."""
    return torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8)


# --- tokenizer and model ----------------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte, which the ``ByteLevel`` (de)coder uses."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))  # the other bytes, in order, get the code points from U+0100 upwards
    return {b: chr(b) if b in printable else chr(next(stand_ins)) for b in range(256)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens whose id is the byte value, plus ``EOS`` (id 256).

    A BPE model with no merges over the ``ByteLevel`` alphabet yields exactly one token per UTF-8 byte and
    decodes any text back exactly. ``split_special_tokens`` keeps that true even for text that happens to
    contain the literal string ``<|endoftext|>``.
    """
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    vocab[EOS] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        model_max_length=N_POSITIONS,
        split_special_tokens=True,
    )


def build_model(seed: int) -> GPT2LMHeadModel:
    """The seeded, untrained demo GPT-2 (dropout off: a one-minute run underfits, it cannot overfit)."""
    config = GPT2Config(
        n_layer=N_LAYER,
        n_embd=N_EMBD,
        n_head=N_HEAD,
        n_positions=N_POSITIONS,
        vocab_size=EOS_ID + 1,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


# --- training and evaluation ------------------------------------------------------------------------------


def _lr(step: int, steps: int) -> float:
    """Linear warm-up over ``WARMUP_STEPS``, then cosine decay to zero at ``steps``."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    return LR * warmup * 0.5 * (1.0 + math.cos(math.pi * min(step / steps, 1.0)))


def _batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``BATCH`` x ``SEQ_LEN`` windows, placed at a random offset in the ``N_POSITIONS`` context.

    Training on short windows is what makes a minute enough; the random offset still trains every position
    embedding, so evaluation windows up to ``N_POSITIONS`` long do not hit untrained positions.
    """
    starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH, 1), generator=gen)
    ids = data[starts + torch.arange(SEQ_LEN)].long()
    offset = torch.randint(0, N_POSITIONS - SEQ_LEN + 1, (1,), generator=gen)
    return ids, (offset + torch.arange(SEQ_LEN)).expand(BATCH, -1)


def train(model: GPT2LMHeadModel, data: torch.Tensor, steps: int, seed: int, log: Log = print) -> dict:
    """Train ``model`` in place with AdamW for ``steps`` steps on seeded random windows of ``data``.

    Returns:
        ``steps`` and ``train_loss`` (mean over the last 50 steps, less noisy than the final batch).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    recent: collections.deque[float] = collections.deque(maxlen=50)
    model.train()
    start = time.monotonic()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps)
        ids, positions = _batch(data, gen)
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1:5d}  {time.monotonic() - start:5.1f}s  loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return {"steps": steps, "train_loss": sum(recent) / len(recent) if recent else math.log(EOS_ID)}


@torch.no_grad()
def byte_perplexity(model: GPT2LMHeadModel, text: str, window: int = N_POSITIONS, batch: int = 32) -> float:
    """Perplexity per byte of ``text`` over non-overlapping windows (each window's first byte is context only)."""
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    usable = len(ids) // window * window
    if usable == 0:
        raise ValueError(f"text of {len(ids)} bytes is shorter than one window of {window}")
    nll, count = 0.0, 0
    for chunk in ids[:usable].view(-1, window).split(batch):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


# --- build ------------------------------------------------------------------------------------------------


def _reusable(meta_path: Path, seed: int, steps: int) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    same = (meta.get("version"), meta.get("seed"), meta.get("steps")) == (VERSION, seed, steps)
    files = ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "heldout.txt")
    return same and all((meta_path.parent / name).is_file() for name in files)


def build_demo(out_dir: str | Path, steps: int = STEPS, seed: int = 0, force: bool = False, log: Log = print) -> Path:
    """Train (or reuse) the demo model.

    Creates ``out_dir/model`` (a ``GPT2LMHeadModel`` in safetensors plus a tokenizer that
    ``AutoTokenizer.from_pretrained`` reloads offline), ``out_dir/heldout.txt`` (evaluation text from files
    never trained on) and ``out_dir/demo.json`` (seed, steps, final train loss, held-out byte perplexity,
    version, build time). ``demo.json`` is written last, so it only exists for a complete build.

    Args:
        out_dir: Output directory (created if needed).
        steps: Training steps (the model depends on them, not on how long they take).
        seed: Seed of the weight initialisation and of the training windows.
        force: Rebuild even when a matching build exists.
        log: Receives one-line progress messages.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    meta_path = out / "demo.json"
    if not force and _reusable(meta_path, seed, steps):
        log(f"demo model: reusing {out} (delete it or pass --force to retrain)")
        return out
    meta_path.unlink(missing_ok=True)  # a build that dies half way must not look complete
    started = time.monotonic()

    train_files, heldout_files = split_corpus()
    data, text = train_bytes(train_files), heldout_text(heldout_files)
    log(
        f"demo model: {len(train_files)} stdlib files ({len(data) / 1e6:.1f} MB) to train on, "
        f"{len(heldout_files)} held out ({len(text.encode()) / 1e3:.0f} KB of evaluation text)"
    )
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        # fork_rng: seeding for this build must not change the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            model = build_model(seed)
            log(f"training a {N_LAYER}-layer byte GPT-2 for {steps} steps on {THREADS} thread(s)")
            result = train(model, data, steps, seed, log)
            ppl = byte_perplexity(model, text)
    finally:
        torch.set_num_threads(saved_threads)

    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    build_tokenizer().save_pretrained(out / "model")
    (out / "heldout.txt").write_text(text, encoding="utf-8")
    meta = {
        "version": VERSION,
        "seed": seed,
        "steps": result["steps"],
        "train_loss": round(result["train_loss"], 4),
        "heldout_byte_perplexity": round(ppl, 3),
        "threads": THREADS,
        "train_bytes": len(data),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "heldout_bytes": len(text.encode()),
        "python": platform.python_version(),  # the corpus is this interpreter's stdlib
        "build_seconds": round(time.monotonic() - started, 1),
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    log(
        f"demo model: {result['steps']} steps, train loss {result['train_loss']:.3f}, "
        f"held-out byte perplexity {ppl:.2f} -> {out}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m sweep.extras.demo --out .cache/demo [--steps 800] [--seed 0] [--force]``."""
    parser = argparse.ArgumentParser(prog="python -m sweep.extras.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".cache/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching build exists")
    args = parser.parse_args(argv)
    build_demo(args.out, steps=args.steps, seed=args.seed, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

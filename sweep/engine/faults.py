"""TEST-ONLY fault injection for the fault-injection suite and `make reliability`; inert unless $SWEEP_FAULTS is set.

Read here and nowhere else; in normal use every check is one environment lookup.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

from sweep.plan import variant_key

FAULTS_ENV = "SWEEP_FAULTS"
"""TEST-ONLY fault injection, read here and nowhere else; unset in normal use (then every check is a dict lookup).

``SWEEP_FAULTS="oom=1|2,3;nan=0;kill-once=4;sticky=5"``: ``KIND=KEYS`` pairs separated by ``;``, variant keys
separated by ``|`` (``baseline`` for the unpruned model). Kinds:

- ``oom``: evaluating the variant raises ``torch.OutOfMemoryError`` at every batch size (-> ``failed`` row);
  ``oom-retry``: only at the configured batch size (the half-batch retry succeeds);
- ``nan``: the variant's NLL becomes NaN (-> ``diverged`` row);
- ``kill``: the process evaluating a chunk with the variant kills itself with SIGKILL;
- ``sticky``: the chunk raises a CUDA "illegal memory access" error (a sticky error that poisons the process);
- ``delay=SECONDS``: every variant takes this much longer (gives fault tests time to strike mid-sweep);
- ``hold=SECONDS``: every chunk waits until the file ``$SWEEP_FAULTS_DIR/release`` exists (at most SECONDS),
  after creating ``$SWEEP_FAULTS_DIR/held``: a chunk as slow as a test needs, ended when the test says.

A ``-once`` suffix (``kill-once``) fires only the first time across all processes, using marker files in
``$SWEEP_FAULTS_DIR`` (required then).
"""


def _parse_faults(spec: str) -> dict[str, set[str]]:
    faults: dict[str, set[str]] = {}
    for part in filter(None, spec.split(";")):
        kind, _, keys = part.partition("=")
        faults[kind.strip()] = {"" if k == "baseline" else k.strip() for k in keys.split("|")}
    return faults


def injected_fault(kind: str, removed: Sequence[int], retrying: bool = False, once: bool = True) -> bool:
    """Whether ``$SWEEP_FAULTS`` asks for a fault of ``kind`` on this variant now (see ``FAULTS_ENV``).

    ``retrying`` (oom only): this is the half-batch retry, which ``oom-retry`` lets succeed. ``once=False``
    checks without consuming a ``-once`` marker.
    """
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return False
    faults, key = _parse_faults(spec), variant_key(removed)
    if key in faults.get(kind, ()) or (kind == "oom" and not retrying and key in faults.get("oom-retry", ())):
        return True
    if key not in faults.get(f"{kind}-once", ()):
        return False
    marker = os.path.join(os.environ["SWEEP_FAULTS_DIR"], f"{kind}-once-{key or 'baseline'}")
    if not once:
        return not os.path.exists(marker)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def injected_delay(n_variants: int) -> None:
    """Sleep ``delay`` seconds per variant, then wait for a ``hold`` to be released (see ``FAULTS_ENV``)."""
    spec = os.environ.get(FAULTS_ENV)
    faults = _parse_faults(spec) if spec else {}
    if faults.get("delay"):
        time.sleep(float(next(iter(faults["delay"]))) * n_variants)
    if faults.get("hold"):
        deadline = time.monotonic() + float(next(iter(faults["hold"])))
        folder = os.environ["SWEEP_FAULTS_DIR"]
        open(os.path.join(folder, "held"), "a").close()
        while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
            time.sleep(0.05)

"""Variant keys beyond whole-layer removal: attention-only and MLP-only removal, repeats, swaps, reversals and
parallel layers, as one grammar of *edits* on the identity order 0..L-1. Pure Python; must not import torch.

A variant is a tuple of edits; an edit is an ``int`` (remove that whole block, today's keys) or a token:

======== ========================================================== ===============================
token    meaning                                                    steps on 6 layers
======== ========================================================== ===============================
``3``    remove block 3                                             0 1 2 4 5
``a3``   remove layer 3's attention branch (its MLP branch stays)   0 1 2 3m 4 5
``m3``   remove layer 3's MLP branch (its attention stays)          0 1 2 3a 4 5
``r3``   repeat layer 3                                             0 1 2 3 3 4 5
``r2-3`` repeat the block 2..3                                      0 1 2 3 2 3 4 5
``s3``   swap layers 3 and 4                                        0 1 2 4 3 5
``v1-3`` reverse the block 1..3 (at least 3 layers; ``s`` for 2)    0 3 2 1 4 5
``p2-3`` run 2..3 in parallel on one input, residual updates summed 0 1 (2+3) 4 5
======== ========================================================== ===============================

The canonical key sorts edits by (first layer, kind): ``"m5,a3,1" -> "1,a3,m5"``; removing both branches of a
layer is removing the block (``a3,m3 -> 3``). Order edits may not overlap each other nor touch a removed or
unit-removed layer (one spelling per variant: ``r3,a3`` would not say which occurrence loses its attention).
A *step* is what the trie calls at one depth; its ``branches`` are the branches that run: ``Step(3, "am")`` the
whole block, ``Step(3, "m")`` only its MLP branch (attention removed), ``Step(3, "a")`` only its attention; the
members of a ``Par`` run on the same input.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sweep.errors import UnknownNameError, VariantKeyError

Edit = int | str
Variant = tuple[Edit, ...]

UNIT_OPS = ("a", "m")
"""Edits that remove one residual branch: attention (a) or MLP (m)."""
ORDER_OPS = ("r", "s", "v", "p")
"""Edits that change the order of layers: repeat, swap, reverse, parallel."""
_RANK = {"": 0, "a": 1, "m": 2, "r": 3, "s": 4, "v": 5, "p": 6}
_TOKEN = re.compile(r"^(?P<op>[amrsvp]?)(?P<lo>\d+)(?:-(?P<hi>\d+))?$")


@dataclass(frozen=True, order=True)
class Step:
    """One decoder layer called at one depth, with the residual branches that run (``"am"``: the whole block)."""

    layer: int
    branches: str = "am"

    def __str__(self) -> str:
        return str(self.layer) if self.branches == "am" else f"{self.layer}{self.branches}"

    @property
    def dropped(self) -> tuple[str, ...]:
        """The removed branches, as ``("attn",)``, ``("mlp",)`` or ``()``."""
        return tuple(kind for kind, code in (("attn", "a"), ("mlp", "m")) if code not in self.branches)


@dataclass(frozen=True)
class Par:
    """Layers run on the same input; the output is the input plus the sum of their residual updates."""

    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return "+".join(map(str, self.steps))


Steps = tuple[Step | Par, ...]


def members(step: Step | Par) -> tuple[Step, ...]:
    """The layer calls of one depth: ``(step,)`` or a parallel group's members."""
    return step.steps if isinstance(step, Par) else (step,)


def parse_edit(edit: Edit) -> tuple[str, int, int]:
    """``3 -> ("", 3, 3)``, ``"a3" -> ("a", 3, 3)``, ``"s3" -> ("s", 3, 4)``, ``"p2-4" -> ("p", 2, 4)``.

    Raises:
        VariantKeyError: a token outside the grammar, naming what is wrong.
    """
    if isinstance(edit, int) and not isinstance(edit, bool):
        if edit < 0:
            raise VariantKeyError(f"layer {edit} is negative")
        return "", edit, edit
    token = str(edit).strip()
    match = _TOKEN.match(token)
    if not match:
        raise VariantKeyError(f"bad edit {token!r}: edits look like 3, a3, m3, r3, r3-5, s3, v3-5 or p3-4")
    op, lo = match["op"], int(match["lo"])
    hi = int(match["hi"]) if match["hi"] is not None else (lo + 1 if op == "s" else lo)
    if op == "s" and match["hi"] is not None:
        raise VariantKeyError(f"{token!r}: s swaps a layer with the next one (s3: layers 3 and 4)")
    if op in ("", "a", "m") and match["hi"] is not None:
        raise VariantKeyError(f"{token!r}: removals name one layer each")
    if hi < lo:
        raise VariantKeyError(f"{token!r}: empty range")
    if op == "v" and hi < lo + 2:
        raise VariantKeyError(f"{token!r}: reverse a block of at least 3 layers (s{lo} swaps two)")
    if op == "p" and hi < lo + 1:
        raise VariantKeyError(f"{token!r}: parallel needs at least 2 layers")
    return op, lo, hi


def format_edit(op: str, lo: int, hi: int) -> Edit:
    """Inverse of :func:`parse_edit`: whole-block removals stay ``int``."""
    if op == "":
        return lo
    if op in ("a", "m", "s") or (op == "r" and hi == lo):
        return f"{op}{lo}"
    return f"{op}{lo}-{hi}"


def edit_order(edit: Edit) -> tuple[int, int, int]:
    """Sort key of edits in a canonical key: first layer, then kind, then last layer."""
    op, lo, hi = parse_edit(edit)
    return lo, _RANK[op], hi


def normalize(variant: Iterable[Edit]) -> Variant:
    """The canonical form of a variant: parsed, de-duplicated, ``a3,m3`` merged to ``3``, sorted.

    Example: ``normalize(["m5", "a3", 1, "m3"]) == (1, 3, "m5")``.
    """
    edits = {format_edit(*parse_edit(e)) for e in variant}
    for edit in [e for e in edits if isinstance(e, str) and e[0] == "a"]:
        layer = int(edit[1:])
        if f"m{layer}" in edits:
            edits -= {edit, f"m{layer}"}
            edits.add(layer)
    return tuple(sorted(edits, key=edit_order))


def normalized(variant: Iterable[Edit]) -> Variant:
    """The canonical tuple of a variant: sorted ints for block removals (as before), else :func:`normalize`."""
    variant = tuple(variant)
    return tuple(sorted(variant)) if is_block_variant(variant) else normalize(variant)


def variant_key(variant: Iterable[Edit]) -> str:
    """Canonical key: ``(3, 1) -> "1,3"``; ``("m5", "a3", 1) -> "1,a3,m5"``; baseline ``""``."""
    return ",".join(str(e) for e in normalize(variant))


def parse_key(key: str) -> Variant:
    """Inverse of :func:`variant_key`: ``"1,a3" -> (1, "a3")``.

    Raises:
        VariantKeyError: a malformed edit.
    """
    tokens = [t.strip() for t in str(key).split(",") if t.strip()]
    return normalize(int(t) if t.isdigit() else t for t in tokens)


def is_block_variant(variant: Iterable[Edit]) -> bool:
    """Only whole blocks removed (or nothing): what sweep measured before units and order edits."""
    return all(isinstance(e, int) for e in variant)


def n_removed(variant: Iterable[Edit]) -> int:
    """The ``n_removed`` column: removed layers of a block variant (``"1,3"`` -> 2); otherwise removed residual
    branches, a whole block counting as its two (``"1,a3"`` -> 3, as ``a1,m1,a3``; ``"a3,r5"`` -> 1), so that a
    greedy search over ``--unit mix`` removes n units at step n."""
    ops = [parse_edit(e)[0] for e in variant]
    if all(op == "" for op in ops):
        return len(ops)
    return sum(2 if op == "" else 1 for op in ops if op in ("", "a", "m"))


def variant_kind(variant: Iterable[Edit]) -> str:
    """``baseline``, ``block``, ``attn``, ``mlp``, ``mix`` (more than one kind of unit) or ``order`` (any order
    edit). Example: ``("a1", "a3") -> "attn"``, ``(2, "a3") -> "mix"``, ``("r3",) -> "order"``."""
    ops = {parse_edit(e)[0] for e in variant}
    if not ops:
        return "baseline"
    if ops & set(ORDER_OPS):
        return "order"
    if len(ops) > 1:
        return "mix"
    return {"": "block", "a": "attn", "m": "mlp"}[ops.pop()]


def order_edit(variant: Iterable[Edit]) -> tuple[str, int, int] | None:
    """The one order edit of a variant, parsed (None when there is none or more than one)."""
    found = [parse_edit(e) for e in variant if parse_edit(e)[0] in ORDER_OPS]
    return found[0] if len(found) == 1 else None


def steps_of(variant: Iterable[Edit], n_layers: int) -> Steps:
    """The step sequence a variant denotes (what the trie and the in-memory model run, in order).

    Example: ``steps_of(("a0", "p2-3"), 6)`` -> ``0m 1 (2+3) 4 5``; ``steps_of((1, 3), 4)`` -> ``0 2``.

    Raises:
        VariantKeyError: an edit out of range, order edits overlapping, or a reordered layer also removed.
    """
    edits = [parse_edit(e) for e in normalize(variant)]
    for op, lo, hi in edits:
        if hi >= n_layers:
            raise VariantKeyError(f"{format_edit(op, lo, hi)}: layer {hi} is out of range 0-{n_layers - 1}")
    gone = {lo for op, lo, _ in edits if op == ""}
    dropped = {lo: op for op, lo, _ in edits if op in UNIT_OPS}
    spans = sorted((lo, hi, op) for op, lo, hi in edits if op in ORDER_OPS)
    touched = [i for lo, hi, _ in spans for i in range(lo, hi + 1)]
    if len(set(touched)) != len(touched):
        raise VariantKeyError("order edits overlap: each layer takes part in at most one")
    if set(touched) & (gone | set(dropped)):
        raise VariantKeyError(f"layer {min(set(touched) & (gone | set(dropped)))} is both removed and reordered")

    def step(i: int) -> Step:
        return Step(i, {"a": "m", "m": "a"}.get(dropped.get(i, ""), "am"))

    out: list[Step | Par] = []
    starts = {lo: (hi, op) for lo, hi, op in spans}
    i = 0
    while i < n_layers:
        if i in starts:
            hi, op = starts[i]
            block = [step(j) for j in range(i, hi + 1)]
            out += {"r": block + block, "s": block[::-1], "v": block[::-1], "p": [Par(tuple(block))]}[op]
            i = hi + 1
            continue
        if i not in gone:
            out.append(step(i))
        i += 1
    return tuple(out)


def steps_text(steps: Steps) -> str:
    """The ``kept_layers`` column: ``"0,1m,2+3,4"`` (plain ``"0,2,3"`` for block variants)."""
    return ",".join(str(s) for s in steps)


def n_calls(steps: Steps) -> int:
    """Layer calls of one forward (a parallel group counts each member): the ``n_layers`` column."""
    return sum(len(members(s)) for s in steps)


# ---------------------------------------------------------------------------------------------- unit lists


UNITS = ("block", "attn", "mlp", "mix")
"""``--unit`` values: what the removal strategies remove one of."""


def unit_edits(unit: str, n_layers: int) -> list[Edit]:
    """The removable units of ``--unit``, in layer order (mix: attention before MLP, as BlockPruner orders them).

    Example: ``unit_edits("mix", 2) == ["a0", "m0", "a1", "m1"]``.
    """
    if unit == "block":
        return list(range(n_layers))
    if unit == "attn":
        return [f"a{i}" for i in range(n_layers)]
    if unit == "mlp":
        return [f"m{i}" for i in range(n_layers)]
    if unit == "mix":
        return [f"{op}{i}" for i in range(n_layers) for op in UNIT_OPS]
    raise UnknownNameError("--unit", unit, list(UNITS))


def unit_layer(edit: Edit) -> int:
    """The layer a removal edit acts on: ``"a3" -> 3``, ``3 -> 3``."""
    return parse_edit(edit)[1]

"""Activations a run leaves although their slopes are within tolerance: the caller's accuracy budget (`optimize`
folds the chains that keep validation within rtol, and leaves the rest). A left activation counts as outside
every tolerance, so no rule takes it as the identity."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import onnx_graphsurgeon as gs

REASON = "left for the accuracy budget"
SLOPED = ("PRelu", "LeakyRelu")  # the activations a rule may take as the identity when their slopes are near 1

# the activations left (ids), and for each exact replacement of one (a PRelu run as LeakyRelu) its id -> the left one's
_LEFT: ContextVar[tuple[set[int], dict[int, int]] | None] = ContextVar("passes_left", default=None)


@contextmanager
def leaving(nodes: frozenset[int]) -> Iterator[None]:
    """Within, the activations in `nodes` (ids, while the graph lives) are outside every tolerance."""
    token = _LEFT.set((set(nodes), {}))
    try:
        yield
    finally:
        _LEFT.reset(token)


def tolerance(activation: gs.Node, tol: float) -> float:
    """`tol`, or -1 (no slope is that close to 1) for an activation the run leaves."""
    left = _LEFT.get()
    return -1.0 if left is not None and id(activation) in left[0] else tol


def carry(old: gs.Node, new: gs.Node) -> None:
    """`new` replaces `old` exactly (a PRelu run as LeakyRelu): where `old` is left, `new` is left too."""
    left = _LEFT.get()
    if left is not None and id(old) in left[0]:
        left[0].add(id(new))
        left[1][id(new)] = left[1].get(id(old), id(old))


def carried() -> dict[int, int]:
    """Each replacement `carry` made in this run: its id -> the id of the activation it replaced first."""
    left = _LEFT.get()
    return {} if left is None else dict(left[1])

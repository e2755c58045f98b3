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

_LEFT: ContextVar[frozenset[int]] = ContextVar("passes_left", default=frozenset())


@contextmanager
def leaving(nodes: frozenset[int]) -> Iterator[None]:
    """Within, the activations in `nodes` (ids, while the graph lives) are outside every tolerance."""
    token = _LEFT.set(frozenset(nodes))
    try:
        yield
    finally:
        _LEFT.reset(token)


def tolerance(activation: gs.Node, tol: float) -> float:
    """`tol`, or -1 (no slope is that close to 1) for an activation the run leaves."""
    return -1.0 if id(activation) in _LEFT.get() else tol

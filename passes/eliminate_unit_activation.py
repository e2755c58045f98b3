"""Rule: a PRelu/LeakyRelu whose slope is within tol of 1 everywhere is the identity: remove it.

Tried after the chain rules, on what they left: an activation next to a layer whose weight is a graph input,
one that feeds several nodes (fan-out), one between layers where no fold pays, one with no layer around it.
Error per element at slope α: (α − 1)·min(0, x), so the bound is max|1 − α|·‖min(0, x)‖ (0 at α = 1)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes import budget
from passes.linear import Names
from passes.match import const_value, is_default, is_op, producer, rank_of, redirect_readers, slope_problem
from passes.rule import NodeRule, Rewrite

NAME = "eliminate_unit_activation"


def slopes(node: gs.Node) -> np.ndarray | None:
    """The slopes of a PRelu (constant, not an overridable default) or LeakyRelu, flat in float64; None when
    they cannot be read or the node is neither."""
    if is_op(node, "LeakyRelu") and len(node.inputs) == 1:
        return np.array([float(node.attrs.get("alpha", 0.01))])
    if not is_op(node, "PRelu") or len(node.inputs) != 2 or is_default(node.inputs[1]):
        return None
    value = const_value(node.inputs[1])
    if value is None or not value.size or value.dtype.kind != "f":
        return None
    # a slope of higher rank than the input, or with a dim it lacks, grows the output (ONNX Runtime)
    if value.ndim > 1 and rank_of(node.inputs[0]) is None or slope_problem(node):
        return None
    return value.astype(np.float64).reshape(-1)


def off_by(node: gs.Node) -> float | None:
    """max |α − 1| over the node's slopes; None when it has no finite constant slopes or is no activation."""
    s = slopes(node)
    if s is None or len(node.outputs) != 1 or not np.isfinite(s).all():
        return None
    return float(np.abs(s - 1.0).max())


def applies(node: gs.Node, tol: float) -> bool:
    off = off_by(node)
    return off is not None and off <= budget.tolerance(node, tol)


def rewrite(graph: gs.Graph, names: Names, node: gs.Node) -> Rewrite:
    s = slopes(node)
    off = float(np.abs(s - 1.0).max())
    x, y = node.inputs[0], node.outputs[0]
    p = producer(x)
    node.inputs.clear()
    node.outputs.clear()
    if not any(t is y for t in graph.outputs):
        redirect_readers(y, x)
    elif (p is not None and any(n is p for n in graph.nodes) and not x.outputs
          and not any(t is x for t in graph.outputs + graph.inputs)):
        # y keeps its name as a graph output: its producer writes it directly (if it is this graph's: a
        # subgraph's output may not be written by an outer node)
        p.outputs[next(i for i, t in enumerate(p.outputs) if t is x)] = y
    else:  # an input that is also an output, or read elsewhere: the output name needs a node of its own
        graph.nodes.append(gs.Node("Identity", node.name, inputs=[x], outputs=[y]))
    return Rewrite(NAME, [node.name], (float(s.min()), float(s.max())), None, 0, 0, 0, 0, off)


RULE = NodeRule(NAME, "remove a PRelu/LeakyRelu whose slope is within --tol of 1 (the identity) where no fold takes it",
                applies, rewrite)

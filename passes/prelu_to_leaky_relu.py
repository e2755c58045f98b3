"""Rule: a PRelu with one slope for every element is that LeakyRelu, which ONNX Runtime runs faster.

The blocks a partial collapse leaves keep their PRelu; ViT-T with the last 4 of 12 blocks collapsed runs in
9.0 ms with the other 8 as LeakyRelu, 11.4 ms with PRelu (ONNX Runtime CPU, batch 1, 2 threads;
benchmarks/RESULTS.md). Exact: both compute x < 0 ? α·x : x."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes import budget
from passes.linear import Names
from passes.match import const_value, is_op, rank_of, slope_problem
from passes.rule import NodeRule, Rewrite

NAME = "prelu_to_leaky_relu"
FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _alpha(node: gs.Node) -> float | None:
    """The one slope, where LeakyRelu's float32 `alpha` holds it exactly; else None."""
    if not is_op(node, "PRelu") or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    slope = const_value(node.inputs[1])
    if slope is None or slope.size != 1 or slope.dtype not in FLOATS:
        return None
    # a slope of higher rank than the input broadcasts the output to it (ONNX Runtime); LeakyRelu would not
    if slope.ndim and (rank_of(node.inputs[0]) is None or slope_problem(node)):
        return None
    value = slope.reshape(-1)[0]
    alpha = np.float32(value)
    if not np.isfinite(alpha) or alpha.astype(slope.dtype) != value:
        return None
    return float(alpha)


def applies(node: gs.Node, tol: float) -> bool:
    """Not for a slope within tol of 1: that PRelu is the identity (eliminate_unit_activation removes it), and
    a LeakyRelu(alpha≈1) left in its place would be an identity node that nothing else removes; unless the run
    leaves it (the accuracy budget), when the LeakyRelu inherits that."""
    alpha = _alpha(node)
    return alpha is not None and abs(alpha - 1.0) > budget.tolerance(node, tol)


def rewrite(graph: gs.Graph, names: Names, node: gs.Node) -> Rewrite:
    alpha = _alpha(node)
    x, y = node.inputs[0], node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()  # the PRelu dies in cleanup; the new node keeps its name for the report and notes
    leaky = gs.Node("LeakyRelu", node.name, attrs={"alpha": alpha}, inputs=[x], outputs=[y])
    budget.carry(node, leaky)
    graph.nodes.append(leaky)
    return Rewrite(NAME, [node.name], (alpha, alpha), None, 0, 0, 0, 0, 0.0)


RULE = NodeRule(NAME, "run a PRelu with one slope as LeakyRelu (faster in ONNX Runtime, exact)", applies, rewrite)

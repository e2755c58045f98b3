"""Rule: `linear → ≈identity → linear` becomes one linear layer: W = W_A·W_B, b = b_A·W_B + b_B."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.chain import Chain
from passes.linear import Names, write_linear
from passes.rule import Rewrite, Rule

NAME = "collapse_linear_chain"


def check(chain: Chain) -> str | None:
    c = chain.cost
    if c.collapse_is_cheaper:
        return None
    return (f"bottleneck: one {chain.first.d_in}x{chain.second.d_out} layer ({c.macs_after} MACs/row) "
            f"costs more than the two factors ({c.macs_before})")


def rewrite(graph: gs.Graph, names: Names, chain: Chain) -> Rewrite:
    a, b = chain.first, chain.second
    weight = a.weight @ b.weight  # float64 throughout; cast once when written
    bias = None
    if a.bias is not None or b.bias is not None:
        bias = np.zeros(b.d_out) if b.bias is None else b.bias.copy()
        if a.bias is not None:
            bias += a.bias @ b.weight
    chain.rewire_shape_readers()
    base = b.nodes[0].name.removesuffix("_collapsed") + "_collapsed"
    write_linear(graph, names, base, a.x, b.y, weight, bias, b.dtype, gemm=a.x_rank == 2, bias_first=b.bias_first)
    cost = chain.cost
    return Rewrite(
        NAME,
        chain.names,
        chain.slope_range,
        (a.d_in, a.d_out, b.d_out),
        cost.params_before,
        cost.params_after,
        cost.macs_before,
        cost.macs_after,
        chain.error_coefficient,
    )


RULE = Rule(
    NAME, "fuse two linear layers joined by a (nearly) linear activation into one", check, rewrite, folds_weights=True
)

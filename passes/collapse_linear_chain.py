"""Rule: `linear → ≈identity → linear` becomes one linear layer: W = W_A·W_B, b = b_A·W_B + b_B."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.chain import Chain
from passes.linear import LinearLayer, Names, write_linear
from passes.rule import Rewrite, Rule

NAME = "collapse_linear_chain"
BLOCK_VALUES = 1 << 22  # values of W_A turned to float64 at a time (32 MB)


def check(chain: Chain) -> str | None:
    c = chain.cost
    if c.collapse_is_cheaper:
        return None
    return (f"bottleneck: one {chain.first.d_in}x{chain.second.d_out} layer ({c.macs_after} MACs/row) "
            f"costs more than the two factors ({c.macs_before})")


def fold(a: LinearLayer, wb: np.ndarray) -> np.ndarray:
    """W_A·W_B computed in float64 and cast to the model's dtype, a block of W_A's rows at a time, so no
    float64 copy of W_A (VGG's 25088x4096 would be 0.8 GB) is ever made."""
    out = np.empty((a.d_in, wb.shape[1]), dtype=a.dtype)
    step = max(1, BLOCK_VALUES // max(a.d_out, 1))
    for i in range(0, a.d_in, step):
        out[i : i + step] = (a.w[i : i + step].astype(np.float64) * a.scale) @ wb
    return out


def rewrite(graph: gs.Graph, names: Names, chain: Chain) -> Rewrite:
    a, b = chain.first, chain.second
    wb = b.weight  # float64
    weight = fold(a, wb)
    bias = None
    if a.bias is not None or b.bias is not None:
        bias = np.zeros(b.d_out) if b.bias is None else b.bias.copy()
        if a.bias is not None:
            bias += a.bias @ wb
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

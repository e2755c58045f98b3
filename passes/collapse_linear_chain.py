"""Rule: `linear → ≈identity → linear` becomes one linear layer: W = W_A·W_B, b = b_A·W_B + b_B."""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from passes.chain import Chain
from passes.linear import LinearLayer, Names, write_fused
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


def _fuse(chain: Chain) -> tuple[np.ndarray, np.ndarray | None]:
    """The fused weight (in the model's dtype) and bias (float64)."""
    a, b = chain.first, chain.second
    wb = b.weight  # float64
    bias = None
    if a.bias is not None or b.bias is not None:
        bias = np.zeros(b.d_out) if b.bias is None else b.bias.copy()
        if a.bias is not None:
            bias += a.bias @ wb
    return fold(a, wb), bias


def verify(chain: Chain) -> str | None:
    """The fused weight and bias must be finite in the model's dtype (float16 ends at 65504). Where the
    largest possible entry, h·max|W_A|·max|W_B| (and likewise for the bias), fits, no product is needed."""
    a, b = chain.first, chain.second
    top = float(np.finfo(a.dtype).max)
    wb = float(np.abs(b.w).max(initial=0)) * abs(b.scale)
    bound = a.d_out * float(np.abs(a.w).max(initial=0)) * abs(a.scale) * wb
    if a.bias is not None:
        bound = max(bound, a.d_out * float(np.abs(a.bias).max(initial=0)) * wb)
    if b.bias is not None:
        bound += float(np.abs(b.bias).max(initial=0))
    if bound < top / 2:
        return None
    with np.errstate(over="ignore"):  # an overflow is the answer here, not a warning
        chain.folded = weight, bias = _fuse(chain)
        if np.isfinite(weight).all() and (bias is None or np.isfinite(bias.astype(a.dtype)).all()):
            return None
    return f"the fused weight or bias overflows {a.dtype} (beyond ±{top:g}, it would be inf)"


def rewrite(graph: gs.Graph, names: Names, chain: Chain) -> Rewrite:
    a, b = chain.first, chain.second
    weight, bias = chain.folded or _fuse(chain)
    chain.rewire_shape_readers(graph, names)
    base = re.sub(r"_collapsed(_\d+)?$", "", b.nodes[0].name) + "_collapsed"  # not _collapsed_1_collapsed..
    # in b's layout: Gemm, MatMul(+Add), Conv, tf2onnx's, or Reshape → Gemm for the mixed layout
    write_fused(graph, names, base, a, b, weight, bias, flatten=chain.flatten is not None)
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
    NAME, "fuse two linear layers joined by a (nearly) linear activation into one", check, rewrite, folds_weights=True,
    verify=verify,
)

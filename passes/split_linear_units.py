"""Rule: a block `A → PRelu(one slope per unit) → B` where only some units L have slope within tol of 1 is
split into a direct map for those units beside a narrower MLP for the others N:

    y = x·(W_A[:,L]·W_B[L,:]) + (b_B + b_A[L]·W_B[L,:])  +  PRelu_N(x·W_A[:,N] + b_A[N])·W_B[N,:]

exact but for the L units' (α − 1)·min(0, h) terms, where d_in·d_out + |N|·(d_in + d_out) MACs per row are
fewer than the block's h·(d_in + d_out): more than d_in·d_out/(d_in + d_out) units must be linear."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes import sharing
from passes.chain import Chain, Reject, find_chain
from passes.cost import Cost, split_cost
from passes.linear import Names, write_linear
from passes.match import const_value, constant, is_op
from passes.rule import BlockRule, Context, Rewrite

NAME = "split_linear_units"


@dataclass
class Split:
    chain: Chain
    linear: np.ndarray  # indices of the units within tol of 1
    other: np.ndarray  # the rest
    cost: Cost
    note: str = ""
    parts: tuple | None = None  # (W_lin, b_lin, W_AN, b_AN, W_BN), once loaded

    @property
    def nodes(self) -> list[gs.Node]:
        return self.chain.nodes

    @property
    def names(self) -> list[str]:
        return self.chain.names

    @property
    def slope_range(self) -> tuple[float, float]:
        s = self.chain.slopes[self.linear]
        return float(s.min()), float(s.max())

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.chain.first.d_in, self.chain.first.d_out, self.chain.second.d_out

    def load(self) -> str | None:
        """Read both weights and compute the parts; why not (NaN or inf, an overflow of the dtype), or None."""
        reason = self.chain.load()
        if reason:
            return reason
        a, b = self.chain.first, self.chain.second
        wa, wb = a.weight, b.weight  # float64
        L, N = self.linear, self.other
        with np.errstate(over="ignore", invalid="ignore"):
            w_lin = (wa[:, L] @ wb[L, :]).astype(a.dtype)
            b_lin = None
            if a.bias is not None or b.bias is not None:
                b_lin = np.zeros(b.d_out) if b.bias is None else b.bias.copy()
                if a.bias is not None:
                    b_lin += a.bias[L] @ wb[L, :]
            parts = (w_lin, b_lin, wa[:, N], None if a.bias is None else a.bias[N], wb[N, :])
            if not all(p is None or np.isfinite(p.astype(a.dtype)).all() for p in parts):
                return f"the split's weights or bias overflow {a.dtype}"
        self.parts = parts
        return None


def match(node: gs.Node, ctx: Context) -> Split | Reject | None:
    if not is_op(node, "Gemm", "MatMul"):
        return None
    chain = find_chain(node, ctx.outputs, math.inf)  # any finite slopes: which units are linear is decided here
    if not isinstance(chain, Chain) or chain.activation is None or not is_op(chain.activation, "PRelu"):
        return None
    a, b = chain.first, chain.second
    if not ctx.inside(chain.nodes):
        return None
    if not (sharing.plain(a) and sharing.plain(b)):
        return None  # pointwise Conv and tf2onnx layouts: written back by their own helper, not split here
    slope = constant(chain.activation.inputs[1])
    dims = list(slope.shape) if slope is not None else []
    if not dims or dims[-1] != a.d_out or any(d != 1 for d in dims[:-1]) or a.d_out < 2:
        return None  # one slope for all units (all in or all out), or not one per unit of the last axis
    if any(is_op(n, "Reshape", "BatchNormalization") for n in chain.between) or chain.shape_readers:
        return None
    unit = np.abs(chain.slopes - 1.0) <= ctx.tol
    if unit.all() or not unit.any():
        return None  # a plain collapse (or drop), or no unit to take out: collapse_linear_chain says why
    L, N = np.flatnonzero(unit), np.flatnonzero(~unit)
    freed, shared = sharing.freed([a, b], chain.nodes, ctx.outputs)
    cost = split_cost(a.d_in, a.d_out, b.d_out, len(N), a.params + b.params, freed, bias_in=a.bias is not None,
                      bias_out=b.bias is not None)
    lo, hi = float(chain.slopes[L].min()), float(chain.slopes[L].max())
    shape = (a.d_in, a.d_out, b.d_out)
    head = f"{len(L)} of {a.d_out} units within tolerance"
    if cost.macs_after >= cost.macs_before:
        need = a.d_in * b.d_out // (a.d_in + b.d_out) + 1
        return Reject(chain.nodes, f"{head}: a split ({cost.macs_after} MACs/row) would not save over the block "
                                   f"({cost.macs_before}); it needs at least {need} linear units", (lo, hi), shape)
    note = f"{head}; the other {len(N)} stay a {a.d_in}>{len(N)}>{b.d_out} MLP beside one {a.d_in}x{b.d_out} map"
    if cost.grows:
        why = f"{head}: the split grows the model by {cost.growth()}" + (
            f" ({shared} weight(s) also read elsewhere stay)" if shared else "")
        if not ctx.allow_growth:
            return Reject(chain.nodes, why + "; --allow-growth splits anyway", (lo, hi), shape)
        note += "; " + why + ", allowed by --allow-growth"
    return Split(chain, L, N, cost, note)


def rewrite(graph: gs.Graph, names: Names, block: Split) -> Rewrite:
    if block.parts is None:
        block.load()
    w_lin, b_lin, w_an, b_an, w_bn = block.parts
    chain = block.chain
    a, b, act = chain.first, chain.second, chain.activation
    dtype, gemm = a.dtype, a.x_rank == 2
    base = re.sub(r"_split(_\d+)?$", "", b.nodes[0].name) + "_split"
    y = b.y
    # shapes where the input states its own: the narrow PRelu's rank is then known, so prelu_to_leaky_relu
    # takes a one-unit PRelu in this run, not only in a second one (the run would not be idempotent)
    lead = None if a.x.shape is None else list(a.x.shape[:-1])
    h_n, a_n, z, lin = (gs.Variable(names(f"{base}.{s}"), dtype=dtype, shape=None if lead is None else lead + [d])
                        for s, d in (("hidden", len(block.other)), ("act", len(block.other)), ("nonlinear", b.d_out),
                                     ("linear", b.d_out)))
    write_linear(graph, names, f"{base}.in", a.x, h_n, w_an, b_an, dtype, gemm=gemm, bias_first=a.bias_first)
    value = const_value(act.inputs[1])
    slope = gs.Constant(names(f"{base}.slope"), np.ascontiguousarray(value[..., block.other]))
    graph.nodes.append(gs.Node("PRelu", names(act.name), inputs=[h_n, slope], outputs=[a_n]))
    write_linear(graph, names, f"{base}.out", a_n, z, w_bn, None, dtype, gemm=gemm)
    write_linear(graph, names, f"{base}.direct", a.x, lin, w_lin, b_lin, dtype, gemm=gemm, bias_first=b.bias_first)
    y.inputs.clear()
    graph.nodes.append(gs.Node("Add", names(f"{base}.sum"), inputs=[lin, z], outputs=[y]))
    off = float(np.abs(chain.slopes[block.linear] - 1.0).max())
    c = block.cost
    return Rewrite(NAME, chain.names, block.slope_range, block.shape, c.params_before, c.params_after, c.macs_before,
                   c.macs_after, off * float(np.linalg.norm(b.weight[block.linear, :])), note=block.note)


RULE = BlockRule(NAME, "split a per-unit PRelu block into a direct map for its unit-slope units and a narrower MLP",
                 match, rewrite)

"""Rule: a block `A → PRelu(one slope per unit) → B` where only some units L have slope within tol of 1 is
split into a direct map for those units beside a narrower MLP for the others N:

    y = x·(W_A[:,L]·W_B[L,:]) + (b_B + b_A[L]·W_B[L,:])  +  PRelu_N(x·W_A[:,N] + b_A[N])·W_B[N,:]

exact but for the L units' (α − 1)·min(0, h) terms, where d_in·d_out + |N|·(d_in + d_out) MACs per row are
fewer than the block's h·(d_in + d_out): more than d_in·d_out/(d_in + d_out) units must be linear.

Written in the block's layout: Gemm/MatMul(+Add), or pointwise Convs (units = channels, the slope per channel on
its axis 1, `[C, 1, 1]` or `[1, C, 1, 1]`); a BatchNormalization after either layer or after the activation is
folded in (it is affine per feature, so exact whatever the slopes)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes import budget, sharing
from passes.chain import LAYER_OPS, Chain, Reject, find_chain
from passes.cost import Cost, split_cost
from passes.linear import LinearLayer, Names, write_layer, write_linear, write_reshaped_bias
from passes.match import const_value, constant, is_op, reshape_last_dim
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


def unit_axis(act: gs.Node, layer: LinearLayer) -> int | str | None:
    """The axis of the PRelu's slope array that holds one slope per unit of `layer`'s output: the channels (axis 1
    of the Conv's input, counted from the right as the slope broadcasts) for a pointwise Conv, the last axis for a
    matrix product; every other slope dim must be 1. None where the slope is one value (all units in or all out);
    a reason where its values cannot be told apart by unit (another axis, or several)."""
    slope = constant(act.inputs[1])
    dims = list(slope.shape) if slope is not None else []
    if math.prod(dims) <= 1 or layer.d_out < 2:
        return None
    axis = len(dims) - (layer.conv_rank - 1) if layer.conv_rank else len(dims) - 1
    if 0 <= axis < len(dims) and dims[axis] == layer.d_out and all(d == 1 for i, d in enumerate(dims) if i != axis):
        return axis
    where = f"its {layer.d_out} channels (axis 1 of a rank-{layer.conv_rank} input)" if layer.conv_rank else \
        f"its {layer.d_out} units (the last axis)"
    return f"slope of {act.name} has shape {dims}, which is not one slope per unit of {where}: no split"


def layout_problem(chain: Chain) -> str | None:
    """Why the split cannot be written, or None. Gemm/MatMul(+Add) and pointwise Convs are written in their own
    layout (a BatchNormalization folded in either way). tf2onnx's `Reshape → MatMul → Reshape → Add` and Reshapes
    between 2-D layers are taken as the chain rule proves them (`find_chain`: both layers' inputs 2-D, every
    Reshape keeping the feature dim): the narrow MLP and the direct map are then written on the 2-D inputs, and
    the sum goes through the second layer's own Reshape and bias. The per-unit slopes must still meet their
    units: a Reshape before the activation must keep them on the last axis. Shape readers of the block's tensors
    are the chain's (`Chain.shape_readers`): rewired as the chain rule does, or the chain is refused."""
    a, act = chain.first, chain.activation
    if chain.flatten is not None:
        return (f"{chain.flatten.name} flattens a layer's output for a 2-D one (the chain rule's mixed layout): the "
                f"split is not written for it")
    for node in chain.between[: chain.between.index(act)]:
        if is_op(node, "Reshape") and reshape_last_dim(node) != a.d_out:
            return (f"{node.name} (Reshape) before {act.name} does not keep the {a.d_out} units on the last axis "
                    f"(or its target does not say so): the per-unit slopes may not meet their units")
    return None


def _left_block(chain: Reject, ctx: Context) -> Reject | None:
    """A block the chain rule refuses whatever its slopes (a Shape or another node reads its hidden tensor, a graph
    output inside it): where some but not all of its PRelu's slopes are within tol, a split was the candidate, so
    it is listed with the chain's reason (which, with slopes outside tol, would only name them)."""
    act = next((n for n in chain.nodes if is_op(n, "PRelu")), None)
    value = None if act is None or chain.slope_range is None else const_value(act.inputs[1])
    if value is None or not ctx.inside(chain.nodes):
        return None
    unit = np.abs(value.astype(np.float64) - 1.0) <= budget.tolerance(act, ctx.tol)
    return Reject(chain.nodes, chain.reason, chain.slope_range, chain.shape) if unit.any() and not unit.all() else None


def match(node: gs.Node, ctx: Context) -> Split | Reject | None:
    if not is_op(node, *LAYER_OPS):
        return None
    chain = find_chain(node, ctx.outputs, math.inf)  # any finite slopes: which units are linear is decided here
    if isinstance(chain, Reject):
        return _left_block(chain, ctx)
    if not isinstance(chain, Chain) or chain.activation is None or not is_op(chain.activation, "PRelu"):
        return None
    if not ctx.inside(chain.nodes):
        return None
    unit = np.abs(chain.slopes - 1.0) <= budget.tolerance(chain.activation, ctx.tol)
    if unit.all() or not unit.any():
        return None  # a plain collapse (or drop), or no unit to take out: collapse_linear_chain says why
    a, b = chain.first, chain.second
    lo, hi = float(chain.slopes[unit].min()), float(chain.slopes[unit].max())
    shape = (a.d_in, a.d_out, b.d_out)
    axis = unit_axis(chain.activation, a)
    why = axis if isinstance(axis, str) else layout_problem(chain)
    if why:
        return Reject(chain.nodes, why, (lo, hi), shape)
    if axis is None:
        return None
    return _priced(chain, np.flatnonzero(unit), np.flatnonzero(~unit), ctx)


def _priced(chain: Chain, L: np.ndarray, N: np.ndarray, ctx: Context) -> Split | Reject:
    """The split of units L (linear) and N, where it saves MACs and, unless --allow-growth, does not grow the
    model; else why not."""
    a, b = chain.first, chain.second
    freed, shared = sharing.freed([a, b], chain.nodes, ctx.outputs)
    # the h slopes go too (the narrow MLP gets n new ones): counted on both sides, as its weights are
    slopes = sharing.dying(chain.activation.inputs[1], chain.nodes, ctx.outputs) if len(chain.activation.inputs) > 1 \
        else 0
    cost = split_cost(a.d_in, a.d_out, b.d_out, len(N), a.params + b.params + slopes, freed + slopes,
                      bias_in=a.bias is not None, bias_out=b.bias is not None)
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


def _narrow_slope(act: gs.Node, layer: LinearLayer, units: np.ndarray) -> np.ndarray:
    """The PRelu's slope array keeping only `units`, on the axis that holds them (its shape otherwise kept), but
    never of higher rank than the layer's input, which the narrow PRelu reads (tf2onnx's: 2-D, where the old
    PRelu read the reshaped (N, T, h); every other slope dim is 1, so the last axis keeps the units)."""
    value = np.take(const_value(act.inputs[1]), units, axis=unit_axis(act, layer))
    if not layer.conv_rank and layer.x_rank is not None and value.ndim > layer.x_rank:
        value = value.reshape(-1)
    return np.ascontiguousarray(value)


def _hidden_shape(layer: LinearLayer, width: int) -> list | None:
    """The shape of a tensor laid out as the layer's input with `width` features, where the input states its own
    (or is known to be 2-D, as tf2onnx's flattened input): the features on axis 1 for a Conv, the last otherwise."""
    dims = layer.x.shape
    if not dims and layer.x_rank == 2 and not layer.conv_rank:
        dims = [None, None]
    if dims is None or not dims:
        return None
    dims = list(dims)
    dims[1 if layer.conv_rank else -1] = width
    return dims


def rewrite(graph: gs.Graph, names: Names, block: Split) -> Rewrite:
    if block.parts is None:
        block.load()
    w_lin, b_lin, w_an, b_an, w_bn = block.parts
    chain = block.chain
    a, b, act = chain.first, chain.second, chain.activation
    base = re.sub(r"_split(_\d+)?$", "", b.nodes[0].name) + "_split"
    y = b.y
    # shapes where the input states its own: the narrow PRelu's rank is then known, so prelu_to_leaky_relu
    # takes a one-unit PRelu in this run, not only in a second one (the run would not be idempotent)
    h_n, a_n, z, lin = (gs.Variable(names(f"{base}.{s}"), dtype=a.dtype, shape=_hidden_shape(a, d))
                        for s, d in (("hidden", len(block.other)), ("act", len(block.other)), ("nonlinear", b.d_out),
                                     ("linear", b.d_out)))
    write_layer(graph, names, f"{base}.in", a, a.x, h_n, w_an, b_an, bias_first=a.bias_first)
    slope = gs.Constant(names(f"{base}.slope"), _narrow_slope(act, a, block.other))
    graph.nodes.append(gs.Node("PRelu", names(act.name), inputs=[h_n, slope], outputs=[a_n]))
    write_layer(graph, names, f"{base}.out", a, a_n, z, w_bn, None)
    chain.rewire_shape_readers()  # as the chain rule does: the Shape readers get the shapes their tensors keep
    if b.reshape is None:
        write_layer(graph, names, f"{base}.direct", a, a.x, lin, w_lin, b_lin, bias_first=b.bias_first)
        y.inputs.clear()
        graph.nodes.append(gs.Node("Add", names(f"{base}.sum"), inputs=[lin, z], outputs=[y]))
    else:  # tf2onnx's dense: the sum of the 2-D products, then b's own Reshape and bias (as write_fused writes)
        write_linear(graph, names, f"{base}.direct", a.x, lin, w_lin, None, a.dtype, gemm=False)
        flat = gs.Variable(names(f"{base}.flat"), dtype=a.dtype, shape=_hidden_shape(a, b.d_out))
        graph.nodes.append(gs.Node("Add", names(f"{base}.sum"), inputs=[lin, z], outputs=[flat]))
        write_reshaped_bias(graph, names, base, b, flat, b_lin)
    off = float(np.abs(chain.slopes[block.linear] - 1.0).max())
    c = block.cost
    return Rewrite(NAME, chain.names, block.slope_range, block.shape, c.params_before, c.params_after, c.macs_before,
                   c.macs_after, off * float(np.linalg.norm(b.weight[block.linear, :])), note=block.note)


RULE = BlockRule(NAME, "split a per-unit PRelu block into a direct map for its unit-slope units and a narrower MLP",
                 match, rewrite)

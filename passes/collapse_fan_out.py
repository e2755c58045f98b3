"""Rule: one layer A whose (nearly) linear output feeds k linear layers B_i (two heads on one hidden layer)
becomes k layers W_i = W_A·W_Bi, b_i = b_A·W_Bi + b_Bi, where that costs fewer MACs and, unless
--allow-growth, no more parameters than A and the B_i it replaces. The layers are Gemm/MatMul(+Add) or pointwise
Convs of one rank (each with a BatchNormalization after it folded in), written back in that layout.

Where it does not pay, the unit activation is still the identity: eliminate_unit_activation removes it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes import sharing
from passes.chain import LAYER_OPS, MAX_WALK, Reject
from passes.collapse_linear_chain import fold
from passes.cost import Cost, fan_out_cost
from passes.eliminate_unit_activation import slopes as read_slopes
from passes.linear import LinearLayer, Names, read_linear_starting_at, write_layer
from passes.match import channel_slope_problem, is_const, is_inference_dropout, is_op, slope_problem
from passes.rule import BlockRule, Context, Rewrite

NAME = "collapse_fan_out"


@dataclass
class FanOut:
    first: LinearLayer
    between: list[gs.Node]  # Identity, inference Dropout and the activation, in graph order
    heads: list[LinearLayer]
    slopes: np.ndarray | None
    cost: Cost
    note: str = ""
    folded: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.first.nodes + self.between + [n for h in self.heads for n in h.nodes]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def slope_range(self) -> tuple[float, float] | None:
        return None if self.slopes is None else (float(self.slopes.min()), float(self.slopes.max()))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.first.d_in, self.first.d_out, sum(h.d_out for h in self.heads)

    def load(self) -> str | None:
        """Read the weights and fold each head; why not (NaN or inf, an overflow of the dtype), or None."""
        reason = self.first.load() or next((r for r in (h.load() for h in self.heads) if r), None)
        if reason:
            return reason
        a = self.first
        with np.errstate(over="ignore", invalid="ignore"):
            for head in self.heads:
                wb = head.weight
                bias = None
                if a.bias is not None or head.bias is not None:
                    bias = np.zeros(head.d_out) if head.bias is None else head.bias.copy()
                    if a.bias is not None:
                        bias += a.bias @ wb
                weight = fold(a, wb)
                if not np.isfinite(weight).all() or (bias is not None and not np.isfinite(bias.astype(a.dtype)).all()):
                    return f"a fused weight or bias overflows {a.dtype}"
                self.folded.append((weight, bias))
        return None


def _walk(t: gs.Tensor, outputs: set[str]) -> tuple[list[gs.Node], gs.Node | None, gs.Tensor] | None:
    """From a layer's output `t` through Identity, inference Dropout and at most one PRelu/LeakyRelu to the
    tensor read by several nodes; None where the output goes one way only (a chain) or anywhere else."""
    between, act = [], None
    for _ in range(MAX_WALK):
        if t.name in outputs or not t.outputs:
            return None
        if len(t.outputs) > 1:
            return between, act, t
        user = t.outputs[0]
        if is_op(user, "PRelu", "LeakyRelu") and act is None and user.inputs[0] is t:
            act = user
        elif not (is_op(user, "Identity") or is_inference_dropout(user, outputs)):
            return None
        between.append(user)
        t = user.outputs[0]
    return None


def _layer_end(node: gs.Node, outputs: set[str]) -> gs.Tensor:
    """Where the layer starting at `node` may end, from the shape of the graph only: after a bias Add of a
    constant, then after a BatchNormalization, each where it is the tensor's one reader."""
    t = node.outputs[0]
    for ops in (("Add",), ("BatchNormalization",)):
        user = t.outputs[0] if len(t.outputs) == 1 and t.name not in outputs else None
        if user is not None and is_op(user, *ops) and user.outputs and (ops != ("Add",) or any(
                is_const(i) for i in user.inputs)):
            t = user.outputs[0]
    return t


def _writable(layer: LinearLayer | str | None, like: LinearLayer | None = None) -> bool:
    """A layer write_layer can write in its own layout (not tf2onnx's Reshape), in `like`'s (the same axis:
    pointwise Convs of one rank, or matrix products)."""
    return (isinstance(layer, LinearLayer) and layer.reshape is None
            and (like is None or layer.conv_rank == like.conv_rank))


def _slope_problem(act: gs.Node, first: LinearLayer) -> str | None:
    """Why a PRelu's slope may change its input's shape, read as the layer's layout lays the features out."""
    if first.conv_rank:
        return channel_slope_problem(act, first.d_out, first.conv_rank)
    return slope_problem(act, first.d_out, first.x_rank)


def match(node: gs.Node, ctx: Context) -> FanOut | Reject | None:
    if not is_op(node, *LAYER_OPS) or not node.outputs:
        return None
    # first the shape of the graph (no value is read for a layer that does not fan out)
    if _walk(_layer_end(node, ctx.outputs), ctx.outputs) is None:
        return None
    first = read_linear_starting_at(node, ctx.outputs)
    if not _writable(first):
        return None
    walked = _walk(first.y, ctx.outputs)
    if walked is None:
        return None
    between, act, t = walked
    heads = []
    for user in t.outputs:
        if (not is_op(user, *LAYER_OPS) or user.inputs[0] is not t or any(user is h.nodes[0] for h in heads)
                or not ctx.inside([user])):
            return None  # a fan-out into a non-linear node: nothing to fold into it
        head = read_linear_starting_at(user, ctx.outputs)
        if not _writable(head, first) or head.d_in != first.d_out or head.dtype != first.dtype:
            return None
        heads.append(head)
    nodes = first.nodes + between + [n for h in heads for n in h.nodes]
    if not ctx.inside(nodes):
        return None
    shape = (first.d_in, first.d_out, sum(h.d_out for h in heads))
    slopes = None
    if act is not None:
        slopes = read_slopes(act)
        if slopes is None or not np.isfinite(slopes).all():
            return None
        if is_op(act, "PRelu") and _slope_problem(act, first):
            return None
        off = float(np.abs(slopes - 1.0).max())
        if off > ctx.tol:
            lo, hi = float(slopes.min()), float(slopes.max())
            return Reject(nodes, f"fan-out into {len(heads)} layers: slope {lo:.4g}..{hi:.4g} is {off:.3g} from 1, "
                                 f"outside tolerance {ctx.tol:g}", (lo, hi), shape)
    layers = [first, *heads]
    has_bias = [first.bias is not None or h.bias is not None for h in heads]
    params_after = sum(first.d_in * h.d_out + (h.d_out if b else 0) for h, b in zip(heads, has_bias, strict=True))
    freed, shared = sharing.freed(layers, nodes, ctx.outputs)
    cost = fan_out_cost(first.d_in, first.d_out, [h.d_out for h in heads], sum(la.params for la in layers),
                        params_after, freed)
    srange = None if slopes is None else (float(slopes.min()), float(slopes.max()))
    if cost.macs_after > cost.macs_before:
        return Reject(nodes, f"fan-out into {len(heads)} layers: the fused layers ({cost.macs_after} MACs/row) cost "
                             f"more than the shared layer and its heads ({cost.macs_before})", srange, shape)
    note = ""
    if cost.grows:
        why = (f"fan-out into {len(heads)} layers: the fused layers grow the model by {cost.growth()}"
               + (f" ({shared} weight(s) also read elsewhere stay)" if shared else ""))
        if not ctx.allow_growth:
            return Reject(nodes, why + "; --allow-growth collapses anyway", srange, shape)
        note = why + ", allowed by --allow-growth"
    return FanOut(first, between, heads, slopes, cost, note)


def rewrite(graph: gs.Graph, names: Names, block: FanOut) -> Rewrite:
    a = block.first
    if not block.folded:
        block.load()
    for head, (weight, bias) in zip(block.heads, block.folded, strict=True):
        base = re.sub(r"_collapsed(_\d+)?$", "", head.nodes[0].name) + "_collapsed"
        write_layer(graph, names, base, a, a.x, head.y, weight, bias, bias_first=head.bias_first)
    off = 0.0 if block.slopes is None else float(np.abs(block.slopes - 1.0).max())
    norm = float(np.sqrt(sum(h.frobenius ** 2 for h in block.heads)))
    c = block.cost
    return Rewrite(NAME, block.names, block.slope_range, block.shape, c.params_before, c.params_after, c.macs_before,
                   c.macs_after, off * norm, note=block.note)


RULE = BlockRule(NAME, "fold a layer into each of the layers its (nearly) linear output feeds, where that is cheaper",
                 match, rewrite)

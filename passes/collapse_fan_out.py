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

from passes import budget, sharing
from passes.chain import LAYER_OPS, MAX_WALK, Reject, ancestors, shape_problem, shape_readers
from passes.collapse_linear_chain import fold
from passes.cost import Cost, fan_out_cost
from passes.eliminate_unit_activation import slopes as read_slopes
from passes.linear import LinearLayer, Names, read_linear_starting_at, write_fused
from passes.match import (
    channel_slope_problem,
    is_const,
    is_inference_dropout,
    is_op,
    redirect_readers,
    slope_problem,
)
from passes.rule import BlockRule, Context, Rewrite

NAME = "collapse_fan_out"


@dataclass
class FanOut:
    first: LinearLayer
    between: list[gs.Node]  # Identity, inference Dropout, Reshape and the activation, in graph order
    heads: list[LinearLayer]
    slopes: np.ndarray | None
    cost: Cost
    note: str = ""
    folded: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    flattens: list[gs.Node | None] = field(default_factory=list)  # per head, tf2onnx's Reshape(h, [-1, h]) before it
    # Shape nodes outside the block that read a block tensor, with a surviving tensor holding that shape
    shape_readers: list[tuple[gs.Node, gs.Tensor]] = field(default_factory=list)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.first.nodes + self.between + head_nodes(self.heads, self.flattens)

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


def head_nodes(heads: list[LinearLayer], flattens: list[gs.Node | None]) -> list[gs.Node]:
    return [n for h, f in zip(heads, flattens, strict=True) for n in ([f] if f is not None else []) + h.nodes]


def _users(t: gs.Tensor) -> list[gs.Node]:
    """The nodes reading `t` for its values: a Shape reads only its shape (checked apart, as the chain rule does)."""
    return [u for u in t.outputs if not is_op(u, "Shape")]


def _walk(t: gs.Tensor, outputs: set[str]) -> tuple[list[gs.Node], gs.Node | None, gs.Tensor] | None:
    """From a layer's output `t` through Identity, inference Dropout, Reshape (tf2onnx's flatten, proven below as
    the chain rule proves it) and at most one PRelu/LeakyRelu to the tensor read by several nodes; None where
    the output goes one way only (a chain) or anywhere else. Graph outputs on the way are checked later."""
    between, act = [], None
    for _ in range(MAX_WALK):
        users = _users(t)
        if not users:
            return None
        if len(users) > 1:
            return between, act, t
        user = users[0]
        if is_op(user, "PRelu", "LeakyRelu") and act is None and user.inputs[0] is t:
            act = user
        elif not (is_op(user, "Identity") or is_inference_dropout(user, outputs)
                  or is_op(user, "Reshape") and user.inputs[0] is t):
            return None
        between.append(user)
        t = user.outputs[0]
    return None


def _layer_end(node: gs.Node, outputs: set[str]) -> gs.Tensor:
    """Where the layer starting at `node` may end, from the shape of the graph only: after a bias Add of a
    constant (behind tf2onnx's Reshape), then after a BatchNormalization, each where it is the tensor's one reader."""
    t = node.outputs[0]
    for ops in (("Reshape",), ("Add",), ("BatchNormalization",)):
        user = _one_user(t, outputs)
        if user is None or not is_op(user, *ops) or not user.outputs:
            continue
        if ops == ("Reshape",) and not _is_bias_add(_one_user(user.outputs[0], outputs)):
            continue  # no bias after it: the layer ends at the MatMul, and the walk sees through the Reshape
        if ops == ("Add",) and not _is_bias_add(user):
            continue
        t = user.outputs[0]
    return t


def _one_user(t: gs.Tensor, outputs: set[str]) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and t.name not in outputs else None


def _is_bias_add(node: gs.Node | None) -> bool:
    return node is not None and is_op(node, "Add") and bool(node.outputs) and any(is_const(i) for i in node.inputs)


def _head_at(user: gs.Node, t: gs.Tensor, outputs: set[str]) -> tuple[gs.Node | None, gs.Node] | None:
    """The layer node a reader of the fan-out tensor starts, behind tf2onnx's flatten Reshape of its own (then
    returned first); None where the reader is no head."""
    flatten = None
    if is_op(user, "Reshape") and user.inputs[0] is t and len(_users(user.outputs[0])) == 1:
        flatten, t, user = user, user.outputs[0], _users(user.outputs[0])[0]
    if not is_op(user, *LAYER_OPS) or user.inputs[0] is not t:
        return None
    return flatten, user


def _writable(layer: LinearLayer | str | None, like: LinearLayer | None = None) -> bool:
    """A layer write_fused can write in its own layout, in `like`'s (the same axis: pointwise Convs of one rank,
    or matrix products)."""
    return isinstance(layer, LinearLayer) and (like is None or layer.conv_rank == like.conv_rank)


def _slope_problem(act: gs.Node, first: LinearLayer, before: list[gs.Node]) -> str | None:
    """Why a PRelu's slope may change its input's shape, read as the layer's layout lays the features out (the
    input's rank unknown behind a Reshape, as the chain rule reads it)."""
    if first.conv_rank:
        return channel_slope_problem(act, first.d_out, first.conv_rank)
    reshaped = first.reshape is not None or any(is_op(n, "Reshape") for n in before)
    return slope_problem(act, first.d_out, None if reshaped else first.x_rank)


def _shape_readers(block: FanOut, outputs: set[str]) -> list[tuple[gs.Node, gs.Tensor]] | str:
    """The chain rule's handling of the nodes outside the block that read its inner tensors (`shape_readers`),
    over every head: none may, but a Shape that feeds only the block's own dying nodes dies with it, and one
    reading a tensor whose shape a Reshape target before it spells out (tf2onnx's `Concat(Shape(h)[:2], [d])`
    for a head's target) is rewired to that target. Returns those Shape readers, or why the block is left."""
    first, between = block.first, block.between
    kept = set().union(*(ancestors(h.reshape.inputs[1]) for h in block.heads if h.reshape is not None))
    inner = (first.internal + [first.y] + [n.outputs[0] for n in between]
             + [f.outputs[0] for f in block.flattens if f is not None] + [t for h in block.heads for t in h.internal])
    return shape_readers(inner, block.nodes, first, between, kept, outputs, once=False)


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
    found = [_head_at(u, t, ctx.outputs) for u in _users(t)]
    if any(f is None for f in found) or not ctx.inside([n for f in found for n in f if n is not None]):
        return None  # a fan-out into a non-linear node: nothing to fold into it
    flattens, heads = [f for f, _ in found], []
    for _, user in found:
        head = read_linear_starting_at(user, ctx.outputs)
        if not _writable(head, first) or any(user is h.nodes[0] for h in heads):
            return None
        heads.append(head)
    nodes = first.nodes + between + head_nodes(heads, flattens)
    if not ctx.inside(nodes):
        return None
    shape = (first.d_in, first.d_out, sum(h.d_out for h in heads))
    why = _layout_problem(first, between, flattens, heads)
    if why is not None:
        return Reject(nodes, why, None, shape) if why else None
    slopes = None
    if act is not None:
        bad = _slope_problem(act, first, between[: between.index(act)]) if is_op(act, "PRelu") else None
        if bad:
            return Reject(nodes, f"fan-out into {len(heads)} layers: {bad}", None, shape)
        slopes = read_slopes(act)
        if slopes is None or not np.isfinite(slopes).all():
            return None
        off = float(np.abs(slopes - 1.0).max())
        if off > budget.tolerance(act, ctx.tol):
            lo, hi = float(slopes.min()), float(slopes.max())
            why = budget.REASON if off <= ctx.tol else f"slope {lo:.4g}..{hi:.4g} is {off:.3g} from 1, outside " \
                                                       f"tolerance {ctx.tol:g}"
            return Reject(nodes, f"fan-out into {len(heads)} layers: {why}", (lo, hi), shape)
    srange = None if slopes is None else (float(slopes.min()), float(slopes.max()))
    block = _priced(first, between, heads, slopes, nodes, ctx, act)
    if isinstance(block, str):
        return Reject(nodes, block, srange, shape)
    block.flattens = flattens
    readers = _shape_readers(block, ctx.outputs)
    if isinstance(readers, str):
        return Reject(nodes, f"fan-out into {len(heads)} layers: {readers}", srange, shape)
    block.shape_readers = readers
    return block


def _layout_problem(first: LinearLayer, between: list[gs.Node], flattens: list[gs.Node | None],
                    heads: list[LinearLayer]) -> str | None:
    """Why the heads cannot take the first layer, as the chain rule proves a pair (`shape_problem`: features that
    chain, one dtype and axis, Reshapes only between layers whose inputs are 2-D). "" where the block is no
    candidate (a plain layout that does not fit: left silently, as before); a reason where tf2onnx's Reshape
    layout is in it (`inspect` lists it)."""
    reshaped = first.reshape is not None or any(f is not None or h.reshape is not None
                                                 for f, h in zip(flattens, heads, strict=True))
    reshaped = reshaped or any(is_op(n, "Reshape") for n in between)
    for flatten, head in zip(flattens, heads, strict=True):
        why = shape_problem(first, between + ([flatten] if flatten is not None else []), head)
        if why:
            return f"fan-out into {len(heads)} layers: {why}" if reshaped else ""
    return None


def _priced(first: LinearLayer, between: list[gs.Node], heads: list[LinearLayer], slopes: np.ndarray | None,
            nodes: list[gs.Node], ctx: Context, act: gs.Node | None = None) -> FanOut | str:
    """The block where the fused heads cost no more MACs and, unless --allow-growth, do not grow the model."""
    layers = [first, *heads]
    has_bias = [first.bias is not None or h.bias is not None for h in heads]
    params_after = sum(first.d_in * h.d_out + (h.d_out if b else 0) for h, b in zip(heads, has_bias, strict=True))
    freed, shared = sharing.freed(layers, nodes, ctx.outputs)
    # a PRelu's stored slopes go with the fold where nothing else reads them (as split_linear_units counts them)
    gone = sharing.dying(act.inputs[1], nodes, ctx.outputs) if act is not None and len(act.inputs) > 1 else 0
    cost = fan_out_cost(first.d_in, first.d_out, [h.d_out for h in heads], sum(la.params for la in layers) + gone,
                        params_after, freed + gone)
    if cost.macs_after > cost.macs_before:
        return (f"fan-out into {len(heads)} layers: the fused layers ({cost.macs_after} MACs/row) cost "
                f"more than the shared layer and its heads ({cost.macs_before})")
    note = ""
    if cost.grows:
        why = (f"fan-out into {len(heads)} layers: the fused layers grow the model by {cost.growth()}"
               + (f" ({shared} weight(s) also read elsewhere stay)" if shared else ""))
        if not ctx.allow_growth:
            return why + "; --allow-growth collapses anyway"
        note = why + ", allowed by --allow-growth"
    return FanOut(first, between, heads, slopes, cost, note)


def rewrite(graph: gs.Graph, names: Names, block: FanOut) -> Rewrite:
    a = block.first
    if not block.folded:
        block.load()
    for reader, shape in block.shape_readers:  # as the chain rule does: they get the shape their tensor keeps
        for out in reader.outputs:
            redirect_readers(out, shape)
    for head, (weight, bias) in zip(block.heads, block.folded, strict=True):
        base = re.sub(r"_collapsed(_\d+)?$", "", head.nodes[0].name) + "_collapsed"
        write_fused(graph, names, base, a, head, weight, bias)  # in the head's layout, as the chain rule writes
    off = 0.0 if block.slopes is None else float(np.abs(block.slopes - 1.0).max())
    norm = float(np.sqrt(sum(h.frobenius ** 2 for h in block.heads)))
    c = block.cost
    return Rewrite(NAME, block.names, block.slope_range, block.shape, c.params_before, c.params_after, c.macs_before,
                   c.macs_after, off * norm, note=block.note)


RULE = BlockRule(NAME, "fold a layer into each of the layers its (nearly) linear output feeds, where that is cheaper",
                 match, rewrite)

"""Which nodes read a layer's weight, seen through the nodes exporters put between a shared initializer and
its users (Identity, Transpose, Cast): what a rewrite frees, and what it cannot, when weights are shared."""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from passes.linear import LinearLayer
from passes.match import constant, is_empty, is_op, producer

VIEWS = ("Identity", "Transpose", "Cast")  # a node that hands a weight on to its reader unchanged in size


def _root(t: gs.Tensor) -> gs.Tensor:
    """`t` walked back through VIEWS to the tensor it is stored in."""
    for _ in range(16):
        p = producer(t)
        if p is None or not is_op(p, *VIEWS) or not p.inputs:
            break
        t = p.inputs[0]
    return t


def weight_root(layer: LinearLayer) -> gs.Tensor:
    """The tensor the layer's weight is stored in: its Gemm/MatMul's weight input, walked back through VIEWS."""
    node = next((n for n in layer.nodes if is_op(n, "Gemm", "MatMul", "Conv")), layer.nodes[0])
    return _root(node.inputs[1])


def bias_root(layer: LinearLayer) -> gs.Tensor | None:
    """The tensor the layer's bias is stored in (a Gemm's or Conv's third input, or the bias Add's other input),
    walked back through VIEWS; None where it has no bias, or one folded from a BatchNormalization only."""
    if layer.bias is None:
        return None
    for node in layer.nodes:
        if is_op(node, "Gemm", "Conv") and len(node.inputs) > 2 and not is_empty(node.inputs[2]):
            return _root(node.inputs[2])
        if is_op(node, "Add"):
            return _root(next(t for t in node.inputs if not any(producer(t) is n for n in layer.nodes)))
    return None


def readers(root: gs.Tensor, outputs: set[str]) -> list[gs.Node] | None:
    """Every node that uses `root`'s value, seen through VIEWS; None when it (or a view of it) is a graph
    output, so it never dies."""
    found, todo, seen = [], [root], set()
    while todo:
        t = todo.pop()
        if t.name in outputs:
            return None
        for user in t.outputs:
            if id(user) in seen:
                continue
            seen.add(id(user))
            if is_op(user, *VIEWS):
                todo += list(user.outputs)
            found.append(user)
    return found


def plain(layer: LinearLayer) -> bool:
    """A Gemm or MatMul(+Add) layer, with no Conv, BatchNorm or Reshape of its own: what write_linear writes."""
    return (not getattr(layer, "conv_rank", None) and getattr(layer, "reshape", None) is None
            and all(is_op(n, "Gemm", "MatMul", "Add") for n in layer.nodes))


def size(root: gs.Tensor) -> int:
    c = constant(root)
    shape = (c if c is not None else root).shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return 0
    return math.prod(shape)


def batchnorm_roots(nodes: list[gs.Node]) -> list[gs.Tensor]:
    """The tensors the BatchNormalizations among `nodes` store their parameters in (scale, B, mean, var), each
    walked back through VIEWS: a folded BatchNormalization's 4 values per channel die with the block."""
    return [_root(t) for n in nodes if is_op(n, "BatchNormalization") for t in n.inputs[1:5] if not is_empty(t)]


def dying(t: gs.Tensor, nodes: list[gs.Node], outputs: set[str]) -> int:
    """The size of the value stored behind `t` (through VIEWS) where every reader of it is among `nodes` (it dies
    with them), else 0: an activation's slope, say, which `freed` (about layers) does not see."""
    root = _root(t)
    return size(root) if constant(root) is not None and _dies(root, {id(n) for n in nodes}, outputs) else 0


def _dies(root: gs.Tensor, inside: set[int], outputs: set[str]) -> bool:
    """Whether every reader of the value stored in `root` (seen through VIEWS) is among the nodes `inside` (ids),
    so it dies with them; never where it, or a view of it, is a graph output."""
    users = readers(root, outputs)
    return users is not None and all(id(u) in inside or is_op(u, *VIEWS) for u in users)


def freed(layers: list[LinearLayer], nodes: list[gs.Node], outputs: set[str]) -> tuple[int, int]:
    """(params that die with `nodes`, number of stored tensors read by nodes outside them): each stored weight,
    bias and folded BatchNormalization parameter counts once, however many of the layers read it, and dies only
    when every reader of it is among `nodes` (a bias computed from a BatchNormalization is stored nowhere: its
    parameters are what dies). Counts what `LinearLayer.params` counts."""
    inside = {id(n) for n in nodes}
    roots = [r for layer in layers for r in (weight_root(layer), bias_root(layer)) if r is not None]
    gone, shared, seen = 0, 0, set()
    for root in roots + batchnorm_roots(nodes):
        if id(root) in seen:
            continue
        seen.add(id(root))
        if _dies(root, inside, outputs):
            gone += size(root)
        else:
            shared += 1
    return gone, shared

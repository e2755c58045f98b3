"""Blocks of an already quantized model: quantized linear -> PRelu/LeakyRelu -> quantized linear. No rule folds
quantized weights (the fused weight would need quantizing again), so they are listed with what to do instead."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.match import const_value, is_const, is_default, is_op, producer

REASON = "weights are quantized: collapse before quantizing"
MS = "com.microsoft"
# layers that hold their weights quantized, by (domain, op); the activation path is their first input
QUANTIZED_LAYERS = {("", "MatMulInteger"), ("", "ConvInteger"), ("", "QLinearMatMul"), ("", "QLinearConv"),
                    (MS, "QGemm"), (MS, "DynamicQuantizeMatMul"), (MS, "MatMulIntegerToFloat"), (MS, "MatMulNBits")}
# float layers whose weight is a DequantizeLinear output (static QDQ, as quantize_static writes it)
QDQ_LAYERS = ("MatMul", "Gemm", "Conv")
# nodes on the way between a layer and the activation: (de)quantization, the dynamic path's rescaling, and the
# float ops a layer ends with; followed only through their data (a scale's or zero point's path is not)
BETWEEN = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "Mul", "Add", "Identity",
           "Reshape", "Dropout")
MS_BETWEEN = {"QLinearAdd": (0, 3), "QLinearMul": (0, 3)}  # their data inputs
MAX_WALK = 16


def _domain(node: gs.Node) -> str:
    return "" if node.domain in (None, "", "ai.onnx") else node.domain


def _weight(node: gs.Node) -> gs.Tensor | None:
    """The stored weight of a quantized layer (the input of a QDQ layer's DequantizeLinear); None if none."""
    index = 3 if node.op in ("QLinearMatMul", "QLinearConv", "QGemm") else 1
    if len(node.inputs) <= index:
        return None
    w = node.inputs[index]
    if (_domain(node), node.op) in QUANTIZED_LAYERS:
        return w
    p = producer(w)
    return p.inputs[0] if p is not None and is_op(p, "DequantizeLinear") and p.inputs else None


def is_quantized_layer(node: gs.Node) -> bool:
    """A linear layer whose constant weights are stored quantized (not a product of two activations)."""
    if (_domain(node), node.op) not in QUANTIZED_LAYERS and not is_op(node, *QDQ_LAYERS):
        return False
    w = _weight(node)
    return w is not None and is_const(w)


def _data_inputs(node: gs.Node, came_from: int) -> list[gs.Tensor]:
    """The inputs to walk back through from `node`'s output `came_from`: its data, never a scale's path."""
    if _domain(node) == MS and node.op in MS_BETWEEN:
        return [node.inputs[i] for i in MS_BETWEEN[node.op] if i < len(node.inputs)]
    if not is_op(node, *BETWEEN):
        return []
    if is_op(node, "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return [node.inputs[0]] if came_from == 0 else []
    if is_op(node, "Cast", "Identity", "Reshape", "Dropout"):
        return [node.inputs[0]]
    return [t for t in node.inputs if const_value(t) is None]  # Mul, Add: not the constant operand


def _walk(t: gs.Tensor, path: list[gs.Node], act: gs.Node | None, found: list) -> None:
    """Back from tensor `t` to a quantized layer with exactly one PRelu/LeakyRelu on the way."""
    p = producer(t)
    if p is None or len(path) > MAX_WALK or any(p is q for q in path):
        return
    if is_quantized_layer(p):
        if act is not None:
            found.append((p, path, act))
        return
    if is_op(p, "PRelu", "LeakyRelu"):
        if act is None and p.inputs:
            _walk(p.inputs[0], [p] + path, p, found)
        return
    index = next(i for i, o in enumerate(p.outputs) if o is t)
    for i in _data_inputs(p, index):
        _walk(i, [p] + path, act, found)


def _slopes(act: gs.Node) -> tuple[float, float] | None:
    if is_op(act, "LeakyRelu"):
        alpha = float(act.attrs.get("alpha", 0.01))
        return alpha, alpha
    if len(act.inputs) < 2 or is_default(act.inputs[1]):
        return None
    value = const_value(act.inputs[1])
    if value is None or not value.size:
        return None
    value = value.astype(np.float64)
    return float(value.min()), float(value.max())


def _dims(node: gs.Node) -> tuple[int, int] | None:
    """(d_in, d_out) of a layer, from its stored weight's shape."""
    op = node.op
    if op == "MatMulNBits":
        k, n = node.attrs.get("K"), node.attrs.get("N")
        return (int(k), int(n)) if k and n else None
    w = _weight(node)
    shape = None if w is None else w.shape
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    if "Conv" in op and len(shape) >= 3:
        return shape[1] * int(node.attrs.get("group", 1)), shape[0]
    if len(shape) != 2:
        return None
    return (shape[1], shape[0]) if int(node.attrs.get("transB", 0)) else (shape[0], shape[1])


def blocks(graph: gs.Graph) -> list[tuple[list[gs.Node], tuple[float, float] | None, tuple[int, int, int] | None]]:
    """Every quantized linear -> activation -> quantized linear of `graph` (not its subgraphs): its nodes, the
    activation's slope range and (d_in, hidden, d_out) where the weights' shapes tell."""
    out, seen = [], set()
    for node in graph.nodes:
        if not is_quantized_layer(node) or not node.inputs:
            continue
        found: list = []
        _walk(node.inputs[0], [], None, found)
        for first, path, act in found:
            if (id(first), id(node)) in seen:
                continue
            seen.add((id(first), id(node)))
            a, b = _dims(first), _dims(node)
            shape = (a[0], a[1], b[1]) if a and b and a[1] == b[0] else None
            out.append(([first, *path, node], _slopes(act), shape))
    return out

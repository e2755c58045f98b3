"""Walking producers and consumers of an onnx-graphsurgeon graph, seeing through no-op nodes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

ONNX_DOMAINS = (None, "", "ai.onnx")


def is_op(node: gs.Node, *ops: str) -> bool:
    """True for a standard-domain node of one of `ops` (custom domains never match)."""
    return node.op in ops and node.domain in ONNX_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a `Constant` node's output, also seen through `Identity` (the
    legacy torch exporter shares equal initializers that way); None when it is computed or an input."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return _read(tensor)
    node = producer(tensor)
    if node is not None and is_op(node, "Identity"):
        return const_value(node.inputs[0])
    if node is not None and is_op(node, "Constant") and isinstance(node.attrs.get("value"), gs.Constant):
        return _read(node.attrs["value"])
    return None


def is_const(tensor: gs.Tensor | None) -> bool:
    """Whether `const_value` would find a value, without reading it (weights may be large, or on disk)."""
    if tensor is None:
        return False
    if isinstance(tensor, gs.Constant):
        return True
    node = producer(tensor)
    if node is not None and is_op(node, "Identity"):
        return is_const(node.inputs[0])
    return node is not None and is_op(node, "Constant") and isinstance(node.attrs.get("value"), gs.Constant)


def _read(constant: gs.Constant) -> np.ndarray:
    # `.values` would cache the array on the tensor, and graphsurgeon then re-encodes it on export
    # (inline, even where it was external data); reading the lazy source leaves the tensor as it was
    lazy = constant._values
    return np.asarray(lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else lazy)


def rank_of(tensor: gs.Tensor) -> int | None:
    """The tensor's rank where the graph states it (value_info, inputs, constants)."""
    shape = tensor.shape
    return None if shape is None else len(shape)


def is_empty(tensor: gs.Tensor | None) -> bool:
    """An omitted optional input or output."""
    return tensor is None or (isinstance(tensor, gs.Variable) and tensor.name == "")


def is_inference_dropout(node: gs.Node, graph_outputs: set[str]) -> bool:
    """A Dropout that is the identity: not in training mode and with its mask unused."""
    if not is_op(node, "Dropout"):
        return False
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        training = const_value(node.inputs[2])
        if training is None or bool(training.reshape(-1)[0]):
            return False
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if not is_empty(mask) and (mask.outputs or mask.name in graph_outputs):
            return False
    return True


def only_feeds(tensor: gs.Tensor, targets: list[gs.Node], graph_outputs: set[str], depth: int = 0) -> bool:
    """True when everything computed from `tensor` ends in `targets` (e.g. a Shape feeding a Reshape)."""
    if tensor.name in graph_outputs or depth > 8:
        return False
    for consumer in tensor.outputs:
        if any(consumer is t for t in targets):
            continue
        if not all(only_feeds(out, targets, graph_outputs, depth + 1) for out in consumer.outputs):
            return False
    return True


SHAPE_PRESERVING = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Identity", "Cast", "Reshape", "Flatten")


def is_explicit_shape(tensor: gs.Tensor, depth: int = 0) -> bool:
    """True when `tensor`, used as a Reshape target, holds every output dim as it is (no -1 to infer, no 0
    to copy): built only from Shape results and positive constants. Then it *is* the Reshape output's shape."""
    if depth > 12:
        return False
    value = const_value(tensor) if is_const(tensor) else None
    if value is not None:
        return value.dtype.kind in "iu" and bool((value > 0).all())
    node = producer(tensor)
    if node is None:
        return False
    if is_op(node, "Shape"):
        return True
    if is_op(node, "Concat"):
        return all(is_explicit_shape(t, depth + 1) for t in node.inputs)
    if is_op(node, *SHAPE_PRESERVING):
        return is_explicit_shape(node.inputs[0], depth + 1)
    return False

"""Walking producers and consumers of an onnx-graphsurgeon graph, seeing through no-op nodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

ONNX_DOMAINS = (None, "", "ai.onnx")
KEEP_BYTES = 1 << 20  # values up to this size (slopes, biases, shape constants) are kept for the whole run


@dataclass
class _Run:
    """What one run of the passes remembers: values already read (a weight on disk is read once, not once
    per sweep), and the initializers that are also graph inputs (IR >= 4: defaults a caller may override,
    so not constants). Held by object, so no id is reused while the run lasts."""

    kept: dict[int, tuple[gs.Constant, np.ndarray]] = field(default_factory=dict)
    defaults: dict[int, gs.Constant] = field(default_factory=dict)


_RUN: ContextVar[_Run | None] = ContextVar("passes_run", default=None)


@contextmanager
def one_run(defaults: list[gs.Constant] = ()) -> Iterator[None]:
    """Within, small values are read once and `defaults` count as graph inputs, not constants."""
    token = _RUN.set(_Run(defaults={id(t): t for t in defaults}))
    try:
        yield
    finally:
        _RUN.reset(token)


def is_op(node: gs.Node, *ops: str) -> bool:
    """True for a standard-domain node of one of `ops` (custom domains never match)."""
    return node.op in ops and node.domain in ONNX_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _source(tensor: gs.Tensor | None) -> gs.Constant | None:
    """The constant behind an initializer or a `Constant` node's output, also seen through `Identity` (the
    legacy torch exporter shares equal initializers that way), overridable or not."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return tensor
    node = producer(tensor)
    if node is not None and is_op(node, "Identity"):
        return _source(node.inputs[0])
    if node is not None and is_op(node, "Constant") and isinstance(node.attrs.get("value"), gs.Constant):
        return node.attrs["value"]
    return None


def is_default(tensor: gs.Tensor | None) -> bool:
    """An initializer that is also a graph input (IR >= 4): a default value the caller may override."""
    run, source = _RUN.get(), _source(tensor)
    return run is not None and source is not None and id(source) in run.defaults


def constant(tensor: gs.Tensor | None) -> gs.Constant | None:
    """The constant holding `tensor`'s value, not read; None when it is computed, an input or a default."""
    return None if is_default(tensor) else _source(tensor)


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a `Constant` node's output (see `constant`); None when it is
    computed, an input or an overridable default."""
    c = constant(tensor)
    return None if c is None else read(c)


def is_const(tensor: gs.Tensor | None) -> bool:
    """Whether `const_value` would find a value, without reading it (weights may be large, or on disk)."""
    return constant(tensor) is not None


def read(c: gs.Constant, keep: bool = True) -> np.ndarray:
    """The constant's value. `.values` would cache the array on the tensor, and graphsurgeon then re-encodes it
    on export (inline, even where it was external data); reading the lazy source leaves the tensor as it was.
    Small values (biases, slopes, shape constants, looked at on every pass) are kept for the run unless `keep`
    is False; a weight is read by the one chain that folds it, and not kept."""
    run = _RUN.get()
    if run is not None and id(c) in run.kept:
        return run.kept[id(c)][1]
    lazy = c._values
    value = np.asarray(lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else lazy)
    if run is not None and keep and value.nbytes <= KEEP_BYTES:
        run.kept[id(c)] = (c, value)
    return value


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


def only_feeds(tensor: gs.Tensor, targets: list[gs.Node], graph_outputs: set[str], limit: int = 256) -> bool:
    """True when everything computed from `tensor` ends in `targets` (e.g. a Shape feeding a Reshape). Each
    node is looked at once (following every path was exponential on a lattice of shape nodes); past `limit`
    nodes the answer is False."""
    seen: set[int] = {id(t) for t in targets}
    todo = [tensor]
    while todo:
        t = todo.pop()
        if t.name in graph_outputs:
            return False
        for consumer in t.outputs:
            if id(consumer) not in seen:
                seen.add(id(consumer))
                if len(seen) > limit + len(targets):
                    return False
                todo += consumer.outputs
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


def slope_problem(prelu: gs.Node, last_dim: int | None = None, rank: int | None = None) -> str | None:
    """Why a PRelu's slope may change the output's shape, or None. ONNX says the slope broadcasts to the
    input's shape, but ONNX Runtime broadcasts both ways: a slope of higher rank than the input, or with a
    dim the input lacks, grows the output, and a rewrite dropping the PRelu would change that shape.
    `last_dim` and `rank` are the input's last dim and rank where the caller knows them (a layer's)."""
    source = _source(prelu.inputs[1])
    if source is None:
        return None  # not a constant: no rule uses it
    slope = list(source.shape)
    dims = prelu.inputs[0].shape
    if dims is None and rank:
        dims = [None] * (rank - 1) + [last_dim]
    if dims is None:
        if len(slope) > 1:
            return f"slope of {prelu.name} has rank {len(slope)} and the rank of its input is unknown"
        dims = [last_dim] if slope and last_dim is not None else [None] * len(slope)
    if len(slope) > len(dims):
        return (f"slope of {prelu.name} has rank {len(slope)}, above its input's {len(dims)}: the output "
                f"would broadcast to a higher rank")
    dims = list(dims[len(dims) - len(slope):])
    if slope and last_dim is not None and not isinstance(dims[-1], int):
        dims[-1] = last_dim
    for s, d in zip(slope, dims, strict=True):
        if s != 1 and s != d:
            return f"slope of {prelu.name} has shape {slope}, which may not fit its input's shape {list(dims)}"
    return None

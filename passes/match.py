"""Walking producers and consumers of an onnx-graphsurgeon graph, seeing through no-op nodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

ONNX_DOMAINS = (None, "", "ai.onnx")
KEEP_BYTES = 1 << 20  # values up to this size (slopes, biases, shape constants) are kept for the whole run


@dataclass
class _Run:
    """What one run of the passes remembers: values already read (a weight on disk is read once, not once
    per sweep), and the initializers that are no constants: graph inputs (IR >= 4: defaults a caller may
    override) and those a training_info trains in place (`bound`). Held by object, so no id is reused while the
    run lasts."""

    kept: dict[int, tuple[gs.Constant, np.ndarray]] = field(default_factory=dict)
    defaults: dict[int, gs.Constant] = field(default_factory=dict)
    bound: dict[int, gs.Constant] = field(default_factory=dict)


_RUN: ContextVar[_Run | None] = ContextVar("passes_run", default=None)


@contextmanager
def one_run(defaults: list[gs.Constant] = (), bound: list[gs.Constant] = ()) -> Iterator[None]:
    """Within, small values are read once, and `defaults` (graph inputs) and `bound` (trained in place by a
    training_info) count as no constants."""
    token = _RUN.set(_Run(defaults={id(t): t for t in [*defaults, *bound]}, bound={id(t): t for t in bound}))
    try:
        yield
    finally:
        _RUN.reset(token)


def is_op(node: gs.Node, *ops: str) -> bool:
    """True for a standard-domain node of one of `ops` (custom domains never match)."""
    return node.op in ops and node.domain in ONNX_DOMAINS


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def redirect_readers(old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every node that reads `old` at `new` instead (`old` is then unread, though it may be a graph output)."""
    for user in list(old.outputs):
        for i, t in enumerate(user.inputs):
            if t is old:
                user.inputs[i] = new


FLOAT_TYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class ConstView:
    """A constant as a node reads it through a `Transpose` and float-to-float `Cast`s of it: the dynamo
    exporter writes a weight that two calls share (ALBERT's one layer run twice) as `Transpose(initializer)`,
    fp16 exports cast float32 weights. Reading applies them to a copy; the stored constant stays as it is."""

    source: gs.Constant
    perm: tuple[int, ...] | None = None  # output axis i is the source's axis perm[i] (casts commute with it)
    casts: tuple[np.dtype, ...] = ()  # applied in order: each rounds to its dtype, as ONNX Runtime does

    @property
    def shape(self) -> tuple:
        shape = tuple(self.source.shape)
        return shape if self.perm is None else tuple(shape[p] for p in self.perm)

    @property
    def dtype(self):
        return self.casts[-1] if self.casts else self.source.dtype

    @property
    def name(self) -> str:
        return self.source.name

    def read(self, keep: bool = True) -> np.ndarray:
        value = read(self.source, keep)
        with np.errstate(over="ignore"):  # a cast that overflows gives inf, as in ORT; the rules then leave it
            for dtype in self.casts:
                if value.dtype == np.float64 and dtype == np.float16:
                    value = value.astype(np.float32)  # ORT casts double to half through float (2 roundings)
                value = value.astype(dtype)
        return value if self.perm is None else np.transpose(value, self.perm)


def _float_dtype(dtype) -> np.dtype | None:
    try:
        d = np.dtype(dtype)
    except TypeError:  # an ONNX type numpy has no name for (bfloat16, float8)
        return None
    return d if d in FLOAT_TYPES else None


def _view(tensor: gs.Tensor | None, depth: int = 0) -> gs.Constant | ConstView | None:
    """The constant behind a tensor (see `_source`), or a view of it through Transpose and float Casts."""
    if tensor is None or depth > 16:
        return None
    if isinstance(tensor, gs.Constant):
        return tensor
    node = producer(tensor)
    if node is not None and is_op(node, "Constant"):
        value = node.attrs.get("value")
        return value if isinstance(value, gs.Constant) else None
    if node is None or len(node.outputs) != 1 or not node.inputs:
        return None
    if is_op(node, "Identity"):
        return _view(node.inputs[0], depth + 1)
    if is_op(node, "Transpose", "Cast"):
        inner = _view(node.inputs[0], depth + 1)
        if inner is None:
            return None
        view = inner if isinstance(inner, ConstView) else ConstView(inner)
        if is_op(node, "Cast"):
            to = _float_dtype(gs_dtype(node.attrs.get("to")))
            if to is None or _float_dtype(view.dtype) is None:
                return None  # a cast to or from integers (or bfloat16, float8) changes values: not read
            return ConstView(view.source, view.perm, view.casts + (to,))
        rank = len(view.shape)
        perm = node.attrs.get("perm")
        perm = tuple(range(rank))[::-1] if perm is None else tuple(int(p) for p in perm)
        if sorted(perm) != list(range(rank)):
            return None
        before = view.perm if view.perm is not None else tuple(range(rank))
        return ConstView(view.source, tuple(before[p] for p in perm), view.casts)
    return None


def gs_dtype(to) -> np.dtype | None:
    """The numpy dtype of a Cast's `to` attribute (an ONNX TensorProto type number)."""
    if to is None:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(to)))
    except (TypeError, ValueError, KeyError):
        return None


def _source(tensor: gs.Tensor | None) -> gs.Constant | ConstView | None:
    """The constant behind an initializer or a `Constant` node's output, also seen through `Identity` (the
    legacy torch exporter shares equal initializers that way), `Transpose` and float-to-float `Cast` (a
    `ConstView` then), overridable or not."""
    return _view(tensor)


def is_default(tensor: gs.Tensor | None) -> bool:
    """An initializer that is also a graph input (IR >= 4: a default value the caller may override), or one a
    training_info trains in place: no constant either way."""
    run, source = _RUN.get(), _source(tensor)
    if isinstance(source, ConstView):
        source = source.source
    return run is not None and source is not None and id(source) in run.defaults


def why_default(tensor: gs.Tensor) -> str:
    """Why `is_default(tensor)`, in words that follow the tensor's role ("weight of X ...")."""
    run, source = _RUN.get(), _source(tensor)
    if isinstance(source, ConstView):
        source = source.source
    if run is not None and source is not None and id(source) in run.bound:
        return "is trained in place (the model's training_info binds it)"
    return "is a graph input with a default (the caller may override it)"


def constant(tensor: gs.Tensor | None) -> gs.Constant | ConstView | None:
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


def read(c: gs.Constant | ConstView, keep: bool = True) -> np.ndarray:
    """The constant's value. `.values` would cache the array on the tensor, and graphsurgeon then re-encodes it
    on export (inline, even where it was external data); reading the lazy source leaves the tensor as it was.
    Small values (biases, slopes, shape constants, looked at on every pass) are kept for the run unless `keep`
    is False; a weight is read by the one chain that folds it, and not kept."""
    if isinstance(c, ConstView):
        return c.read(keep)
    run = _RUN.get()
    if run is not None and id(c) in run.kept:
        return run.kept[id(c)][1]
    lazy = c._values
    value = np.asarray(lazy.load() if isinstance(lazy, gs.ir.tensor.LazyValues) else lazy)
    if run is not None and keep and value.nbytes <= KEEP_BYTES:
        run.kept[id(c)] = (c, value)
    return value


def rank_of(tensor: gs.Tensor) -> int | None:
    """The tensor's rank where the graph states it (value_info, inputs, constants), or where a Reshape makes
    it from a target of known length (tf2onnx states few shapes)."""
    shape = tensor.shape
    if shape is not None:
        return len(shape)
    node = producer(tensor)
    if node is not None and is_op(node, "Reshape") and len(node.inputs) == 2:
        target = node.inputs[1]
        c = constant(target)
        dims = c.shape if c is not None else target.shape
        if dims is not None and len(dims) == 1 and isinstance(dims[0], int):
            return dims[0]
    return None


def _positive_last(tensor: gs.Tensor) -> int | None:
    value = const_value(tensor) if is_const(tensor) else None
    if value is None or value.ndim != 1 or not value.size or value.dtype.kind not in "iu" or value[-1] <= 0:
        return None
    return int(value[-1])


def reshape_last_dim(node: gs.Node) -> int | None:
    """The last dim of a Reshape's output where its target spells it out: a positive last entry of a constant
    target, or of the constant that ends the Concat building it (tf2onnx: `Concat(Shape(x)[:-1], [units])`).
    None where it is inferred (-1), copied (0) or computed."""
    if not is_op(node, "Reshape") or len(node.inputs) != 2:
        return None
    target = node.inputs[1]
    if is_const(target):
        return _positive_last(target)
    p = producer(target)
    if p is not None and is_op(p, "Concat") and p.inputs and int(p.attrs.get("axis", 0)) in (0, -1):
        return _positive_last(p.inputs[-1])
    return None


def inference_batchnorm(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | str | None:
    """A BatchNormalization in inference form as a per-channel affine map (scale, shift), float64:
    `y = scale·x + shift`. None when `node` is no BatchNormalization; a reason when it is one that cannot be
    folded (training mode, running statistics read, parameters not constant or not finite)."""
    if not is_op(node, "BatchNormalization"):
        return None
    if int(node.attrs.get("training_mode", 0)) or int(node.attrs.get("is_test", 1)) == 0:
        return f"{node.name} is a BatchNormalization in training mode"
    if any(not is_empty(t) for t in node.outputs[1:]):
        return f"{node.name} is a BatchNormalization with running-statistics outputs (training form)"
    if len(node.inputs) != 5:
        return f"{node.name} is a BatchNormalization with {len(node.inputs)} inputs"
    values = []
    for t in node.inputs[1:]:
        if is_default(t):
            return f"parameter {t.name} of {node.name} {why_default(t)}"
        v = const_value(t)
        if v is None:
            return f"parameter {t.name} of {node.name} is not a constant"
        values.append(v.astype(np.float64).reshape(-1))
    scale, bias, mean, var = values
    if len({v.size for v in values}) != 1:
        return f"parameters of {node.name} differ in size"
    denom = var + float(node.attrs.get("epsilon", 1e-5))
    if not all(np.isfinite(v).all() for v in values) or not (denom > 0).all():
        return f"parameters of {node.name} hold NaN or inf, or a variance + epsilon <= 0"
    s = scale / np.sqrt(denom)
    return s, bias - mean * s


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


def channel_slope_problem(prelu: gs.Node, channels: int, rank: int) -> str | None:
    """`slope_problem` for a PRelu between pointwise convolutions: its input is (N, C, *spatial) of rank `rank`
    with C = `channels`; the slope may be one value, per channel ((C, 1, 1) for NCHW), or match dims the graph
    states, and may not raise the rank."""
    source = _source(prelu.inputs[1])
    if source is None:
        return None
    slope = list(source.shape)
    if len(slope) > rank:
        return (f"slope of {prelu.name} has rank {len(slope)}, above its input's {rank}: the output "
                f"would broadcast to a higher rank")
    dims: list = [None] * rank
    if prelu.inputs[0].shape is not None and len(prelu.inputs[0].shape) == rank:
        dims = list(prelu.inputs[0].shape)
    dims[1] = channels
    for axis, s in zip(range(rank - len(slope), rank), slope, strict=True):
        if s != 1 and s != dims[axis]:
            return f"slope of {prelu.name} has shape {slope}, which may not fit its input's shape {dims}"
    return None

"""Is the input a well-formed model? Text fields, initializer sizes, then onnx.checker on a weightless copy."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor

from lc_onnx import io, shapes
from lc_onnx.errors import InputError, one_line


def check_model(model: onnx.ModelProto, base: Path | None = None) -> onnx.ModelProto:
    """Raise InputError naming the first problem; return the weightless copy the checker passed. `base` is
    the folder external data lives in (the checker itself would look in the cwd)."""
    bad = _bad_text(model)
    if bad:
        raise InputError(f"the model is not valid ONNX: its {bad} is not valid UTF-8")
    for g in shapes.graphs(model.graph):
        named = [(f"initializer {t.name!r}", t) for t in g.initializer]
        named += [(f"the {a.name} of node {n.name or n.output[0]!r}", t) for n in g.node for a in n.attribute
                  for t in ([a.t] if a.type == onnx.AttributeProto.TENSOR else list(a.tensors))]
        for what, t in named:
            problem = _size_problem(t)
            if problem:
                raise InputError(f"the model is not valid ONNX: {what} {problem}")
    light = shapes.weightless(model)
    _stand_in_external(light, base)
    try:
        onnx.checker.check_model(light, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise InputError(f"the model is not valid ONNX: {one_line(e)}") from None
    return light


def _stand_in_external(light: onnx.ModelProto, base: Path | None) -> None:
    """External tensors the weightless copy still holds (Constant-node values, subgraph initializers) become
    inline: small ones read through io's resolver (shape inference may use their values). A large one, of which
    the checker and shape inference need only dtype and dims, becomes an empty sparse tensor (all zeros, no
    bytes): a Constant's `sparse_value`, and for a subgraph initializer a Constant node that makes it. Where
    that cannot be (opset < 11 has no sparse_value; an initializer that is also an input; another op's tensor
    attribute) it is zeros of its full size: onnx.checker refuses raw_data shorter than the dims."""
    external = [t for t in io.all_tensors(light) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external and base is None:
        raise InputError(f"tensor {external[0].name!r} is external data, and the folder it lives in is unknown")
    opset = next((o.version for o in light.opset_import if o.domain in ("", "ai.onnx")), 0)
    if external and opset >= 11:
        for g in reversed(list(shapes.graphs(light.graph))):  # innermost first: a graph's nodes are copied below
            _sparse_stand_ins(g)
    for t in io.all_tensors(light):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        try:
            raw = io.external_bytes(t, base) if not _large(t) else bytes(io.stored_bytes(t) or 0)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read external data ({one_line(e)})") from None
        io.inline(t, raw)


def _large(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and math.prod(t.dims) > shapes.SMALL


def _empty_sparse(t: onnx.TensorProto) -> onnx.SparseTensorProto:
    """An all-zero sparse tensor of `t`'s dtype and dims, with no values."""
    values = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=[0])
    return onnx.SparseTensorProto(values=values, indices=onnx.TensorProto(data_type=onnx.TensorProto.INT64, dims=[0]),
                                  dims=t.dims)


def _sparse_stand_ins(g: onnx.GraphProto) -> None:
    """`g`'s large external Constant values and initializers as empty sparse Constants (see `_stand_in_external`)."""
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and _large(a.t):
                    a.sparse_tensor.CopyFrom(_empty_sparse(a.t))
                    a.ClearField("t")
                    a.name, a.type = "sparse_value", onnx.AttributeProto.SPARSE_TENSOR
    inputs = {i.name for i in g.input}
    moved = [t for t in g.initializer if _large(t) and t.name not in inputs]
    if not moved:
        return
    kept = [t for t in g.initializer if not (_large(t) and t.name not in inputs)]
    made = [onnx.helper.make_node("Constant", [], [t.name], sparse_value=_empty_sparse(t)) for t in moved]
    nodes = made + list(g.node)  # ahead of every reader: a graph's nodes are in topological order
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.node[:]
    g.node.extend(nodes)


def _bad_text(message, path: str = "model") -> str | None:
    """The path of the first string field holding bytes (protobuf's answer to damaged UTF-8), or None.
    Tensor payloads are bytes fields, and numbers are skipped, so this touches no weights."""
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_STRING:
            values = value if _repeated(fd) else [value]
            if any(not isinstance(v, str) for v in values):
                return f"{path}.{fd.name}"
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            for i, item in enumerate(value if _repeated(fd) else [value]):
                found = _bad_text(item, f"{path}.{fd.name}[{i}]" if _repeated(fd) else f"{path}.{fd.name}")
                if found:
                    return found
    return None


def _repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _size_problem(t: onnx.TensorProto) -> str | None:
    """Whether an inline tensor's data holds as many values as its dims say."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in (0, onnx.TensorProto.STRING):
        return None
    count = math.prod(t.dims)
    if t.HasField("raw_data"):
        itemsize = io.stored_itemsize(t.data_type)
        if itemsize is None:
            return None
        if len(t.raw_data) != count * itemsize:
            return f"holds {len(t.raw_data)} bytes for {count} values of {itemsize} bytes"
        return None
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        n = len(getattr(t, field))
        if n:
            per = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
            want = io.stored_bytes(t) if t.data_type in io.PACKED_BITS else count * per  # packed: an entry per byte
            return None if n == want else f"holds {n} values for dims {list(t.dims)}"
    return None if count == 0 else f"holds no data for dims {list(t.dims)}"

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
    inline: small ones read through io's resolver (shape inference may use their values), large ones zeros
    of the right size (the checker needs only dtype and dims)."""
    for t in io.all_tensors(light):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if base is None:
            raise InputError(f"tensor {t.name!r} is external data, and the folder it lives in is unknown")
        small = math.prod(t.dims) <= shapes.SMALL
        try:
            raw = io.external_bytes(t, base) if small else bytes(io.stored_bytes(t) or 0)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read external data ({one_line(e)})") from None
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw


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

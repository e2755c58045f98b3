"""Is the input a well-formed model? Text fields, initializer sizes, then onnx.checker on a weightless copy."""

from __future__ import annotations

import math

import onnx
from google.protobuf.descriptor import FieldDescriptor

from lc_onnx import io, shapes
from lc_onnx.errors import InputError, one_line


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Raise InputError naming the first problem; return the weightless copy the checker passed."""
    bad = _bad_text(model)
    if bad:
        raise InputError(f"the model is not valid ONNX: its {bad} is not valid UTF-8")
    for g in shapes.graphs(model.graph):
        for t in g.initializer:
            problem = _size_problem(t)
            if problem:
                raise InputError(f"the model is not valid ONNX: initializer {t.name!r} {problem}")
    light = shapes.weightless(model)
    try:
        onnx.checker.check_model(light, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise InputError(f"the model is not valid ONNX: {one_line(e)}") from None
    return light


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
            return None if n == count * per else f"holds {n} values for dims {list(t.dims)}"
    return None if count == 0 else f"holds no data for dims {list(t.dims)}"

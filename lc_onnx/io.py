"""Loading and saving models: clear errors for bad paths and files, atomic writes, external data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from lc_onnx.errors import InputError

PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models must keep their weights as external data


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise InputError saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    try:
        model = onnx.load(str(p))
    except (DecodeError, RuntimeError, ValueError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{p}: not a readable ONNX model ({first})") from e
    if not model.HasField("graph") or not model.graph.node and not model.graph.output:
        raise InputError(f"{p}: the file holds no ONNX graph")
    return model


def default_output(path: str | os.PathLike) -> Path:
    """model.onnx -> model.lc.onnx, next to the input."""
    p = Path(path)
    return p.with_name(f"{p.stem}.lc{p.suffix or '.onnx'}")


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write atomically (temp file in the same folder, then rename); weights go to `<name>.data` when
    asked or when the model is over protobuf's 2 GB limit."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{folder}: output folder is not writable")
    if external_data is None:
        external_data = model.ByteSize() > PROTOBUF_LIMIT
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if external_data:
            data_name = f"{p.name}.data"
            tmp_data = folder / f".{data_name}.tmp"
            onnx.save_model(
                model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                location=tmp_data.name, size_threshold=1024,
            )
            # the model names its data file; point it at the final name before the renames
            saved = onnx.load(tmp, load_external_data=False)
            for t in _external_tensors(saved):
                for kv in t.external_data:
                    if kv.key == "location":
                        kv.value = data_name
            onnx.save_model(saved, tmp)
            os.replace(tmp_data, folder / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]

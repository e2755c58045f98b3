"""Loading and saving models: clear errors for bad paths and files, atomic writes, external data."""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx.external_data_helper import _get_initializer_tensors, uses_external_data

from lc_onnx.errors import InputError, one_line

PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models must keep their weights as external data
EXTERNAL_THRESHOLD = 1024  # bytes; smaller initializers stay inside the .onnx file
# types packed several to a byte, and their bits (the newer ones only where this onnx has them)
PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
               (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
               if hasattr(onnx.TensorProto, name)}


def read(path: str | os.PathLike, load_weights: bool = True) -> tuple[onnx.ModelProto, bool]:
    """The model, and whether its weights are stored as external data; InputError says what is wrong with
    the path or file (missing, a folder, empty, not ONNX, external data missing or outside the model's
    folder). With `load_weights=False`, external weights stay on disk (checked, not read): see `Source`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file")
    if is_torch_file(p):
        raise InputError(f"{p}: {TORCH_HINT}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        if p.suffix.lower() in TORCH_SUFFIXES:  # not ONNX, and named as torch names its files
            raise InputError(f"{p}: {TORCH_HINT}") from None
        raise InputError(f"{p}: not a readable ONNX model ({one_line(e)})") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise InputError(f"{p}: the file holds no ONNX graph")
    external = [t for t in all_tensors(model) if uses_external_data(t)]
    base = p.parent.resolve()
    try:
        for t in external:  # every external tensor, Constant nodes and subgraphs too, through one resolver
            if load_weights:
                inline(t, external_bytes(t, base))
            else:
                _external_span(t, base)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read its external data ({one_line(e)})") from None
    return model, bool(external)


TORCH_HINT = "a PyTorch file; export it to ONNX with lc_onnx.train.export (see README)"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_torch_file(path: Path) -> bool:
    """Whether the file is a PyTorch checkpoint rather than ONNX, by its content: a zip archive holding a pickle
    (torch.save, TorchScript), a pickle (the legacy torch.save), or a safetensors header. No ONNX file starts so:
    its first byte is a field tag of ModelProto, never b"P" or 0x80, and its first 8 bytes as a length are huge."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if head.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(".pkl") or n.endswith("/version") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode and its protocol
        return True
    size = path.stat().st_size
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8


def _external_span(t: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor: the one place external data is resolved, always
    against the model's folder `base` (never the cwd), refusing files outside it (`..`, absolute paths,
    symlinks out) and spans that do not fit the tensor's dims or the file."""
    info = {kv.key: kv.value for kv in t.external_data}
    location = info.get("location", "")
    target = (base / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(base):
        raise ValueError(f"tensor {t.name}: external data location {location!r} points outside {base}")
    if not target.is_file():
        raise ValueError(f"tensor {t.name}: external data file {location!r} is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ValueError(f"tensor {t.name}: external data offset or length is not a number") from None
    expected = stored_bytes(t)
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"tensor {t.name}: negative external data offset or length")
    if length is None:  # optional in the spec: the dims say how much to read
        length = expected if expected is not None else target.stat().st_size - offset
    elif expected is not None and length != expected:
        raise ValueError(f"tensor {t.name}: external data length {length} does not fit dims {list(t.dims)} "
                         f"({expected} bytes)")
    if offset + length > target.stat().st_size:
        raise ValueError(f"tensor {t.name}: external data runs past the end of {location!r}")
    return target, offset, length


def stored_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes a tensor's dims and dtype call for in raw form; None for strings and unknown types."""
    count = math.prod(t.dims)
    if t.data_type in PACKED_BITS:
        return -(-count * PACKED_BITS[t.data_type] // 8)
    itemsize = stored_itemsize(t.data_type)
    return None if itemsize is None else count * itemsize


def inline(t: onnx.TensorProto, raw: bytes) -> None:
    """Make `t` an inline tensor holding `raw` (an external tensor's bytes, or a stand-in for them)."""
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw


def external_array(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """An external tensor's values, read from disk now; `t` is not changed."""
    full = onnx.TensorProto()
    full.CopyFrom(t)
    inline(full, external_bytes(t, base))
    return onnx.numpy_helper.to_array(full)


def files_read(path: Path, model: onnx.ModelProto) -> set[Path]:
    """The model file and every external data file it points at, resolved: what no write may land on."""
    base = path.parent.resolve()
    return {path.resolve()} | {_external_span(t, base)[0] for t in all_tensors(model) if uses_external_data(t)}


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks and hard links included)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_overlap(reads: set[Path], writes) -> None:
    """InputError when a path to be written is a file the input reads: writing it would destroy the input."""
    for w in writes:
        for r in reads:
            if same_file(w, r):
                raise InputError(f"{w}: the input reads this file ({r.name}); writing it would destroy the "
                                 f"input: choose another path")


def check_target(path: Path, what: str) -> None:
    """Refuse, before any work, a path that cannot be written: a directory, a missing or read-only folder, and
    anything that is not a regular file (a FIFO, a device such as /dev/null, a socket), which a write would
    replace with a file (or block on)."""
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory")
    if path.exists() and not path.is_file():
        kind = ("a FIFO" if path.is_fifo() else "a device" if path.is_char_device() or path.is_block_device()
                else "a socket" if path.is_socket() else "a special file")
        raise InputError(f"{what} {path}: is {kind}, not a regular file; lc-onnx writes only to regular files "
                         f"or new paths")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what} {path}: folder {folder} is not writable")


def data_path(path: Path) -> Path:
    """Where `save` puts the weights of a model written with external data."""
    return path.with_name(f"{path.name}.data")


def external_bytes(t: onnx.TensorProto, base: Path) -> bytes:
    """The raw bytes of one external tensor, read from disk now."""
    target, offset, length = _external_span(t, base)
    with open(target, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


class ExternalValues(gs.ir.tensor.LazyValues):
    """graphsurgeon's lazy values for a tensor whose data is still on disk: read only when a rule needs it,
    and exported as the original (small) TensorProto that points at the file."""

    def __init__(self, tensor: onnx.TensorProto, base: Path):
        super().__init__(tensor)
        self.base = base

    def load(self) -> np.ndarray:
        return external_array(self.tensor, self.base)


def attach_external(graph: gs.Graph, base: Path) -> None:
    """Point every constant of `graph` whose data is external at the files in `base`: initializers and
    Constant-node values, in subgraphs too (graphsurgeon's own loader would read them from the cwd)."""
    for g in [graph, *graph.subgraphs(recursive=True)]:
        values = [v for n in g.nodes for v in n.attrs.values() if isinstance(v, gs.Constant)]
        for t in list(g.tensors().values()) + values:
            lazy = getattr(t, "_values", None)
            if isinstance(lazy, gs.ir.tensor.LazyValues) and uses_external_data(lazy.tensor):
                t._values = ExternalValues(lazy.tensor, base)


def has_external(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in all_tensors(model))


def external_size(model: onnx.ModelProto) -> int:
    """Bytes of weights that live outside the protobuf."""
    total = 0
    for t in all_tensors(model):
        if uses_external_data(t):
            info = {kv.key: kv.value for kv in t.external_data}
            total += int(info["length"]) if "length" in info else stored_bytes(t) or 0
    return total


def serialized_size(model: onnx.ModelProto) -> int:
    """`model.ByteSize()` without encoding the weights: upb's ByteSize serializes the whole model into a
    scratch buffer (0.2 s and a second copy of the weights for a 0.4 GB model). The main graph's raw_data
    payloads are counted from dims and dtype (reading `raw_data` copies it; lc_onnx.check has made sure
    every payload is as long as its dims say); every other byte is measured on a weightless shell."""
    shell = _without_initializers(model)
    graph = _strip_subgraph_initializers(shell.graph) + shell.graph.ByteSize()
    for t in model.graph.initializer:
        size = _tensor_size(t)
        graph += _field_size(size)  # GraphProto.initializer = 5: a one-byte tag
    has_graph = model.HasField("graph")
    shell.ClearField("graph")
    return shell.ByteSize() + (_field_size(graph) if has_graph else 0)  # ModelProto.graph = 7


def _strip_subgraph_initializers(g: onnx.GraphProto) -> int:
    """Take the initializers of `g`'s subgraphs out of `g` (a copy), and return the bytes they took in its
    encoding, counted as the main graph's are: fused If-branch weights past 2 GB are never encoded."""
    removed = 0
    for n in g.node:
        in_node = 0
        for a in n.attribute:
            in_attr = sum(_shrunk(sub, _take_initializers(sub))
                          for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))
            in_node += _shrunk(a, in_attr) if in_attr else 0  # AttributeProto.g = 6, graphs = 11: one-byte tags
        removed += _shrunk(n, in_node) if in_node else 0  # GraphProto.node = 1, NodeProto.attribute = 5
    return removed


def _take_initializers(g: onnx.GraphProto) -> int:
    """Bytes `g` (a subgraph, in a copy) loses when its initializers, and its own subgraphs', are taken out."""
    taken = sum(_field_size(_tensor_size(t)) for t in g.initializer)
    del g.initializer[:]
    return taken + _strip_subgraph_initializers(g)


def _shrunk(message, removed: int) -> int:
    """How much a length-delimited field with a one-byte tag holding `message` shrank when `removed` bytes left
    the message: the bytes themselves and, at times, one of its length's."""
    after = message.ByteSize()
    return _field_size(after + removed) - _field_size(after)


def _tensor_size(t: onnx.TensorProto) -> int:
    if not t.HasField("raw_data"):
        return t.ByteSize()
    light = onnx.TensorProto()
    _copy_fields(t, light, skip="raw_data")
    return light.ByteSize() + _field_size(_raw_length(t))  # TensorProto.raw_data = 9: a one-byte tag


def _raw_length(t: onnx.TensorProto) -> int:
    itemsize = stored_itemsize(t.data_type)
    if itemsize is None:
        return len(t.raw_data)  # packed or variable-size types: ask the payload itself
    return math.prod(t.dims) * itemsize


def stored_itemsize(data_type: int) -> int | None:
    """Bytes per value in a tensor's raw_data; None where that is no whole number (4- and 2-bit types,
    several to a byte), strings, or an unknown type."""
    if data_type in (0, onnx.TensorProto.STRING) or data_type in PACKED_BITS:
        return None
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _field_size(length: int) -> int:
    """Bytes of a length-delimited field with a one-byte tag: tag, varint length, payload."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def load(path: str | os.PathLike) -> onnx.ModelProto:
    return read(path)[0]


def default_output(path: str | os.PathLike) -> Path:
    """model.onnx -> model.lc.onnx, next to the input."""
    p = Path(path)
    return p.with_name(f"{p.stem}.lc{p.suffix or '.onnx'}")


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
         source: Path | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write atomically: temp files in the same folder, then renames, so an interrupted run leaves no
    half-written model. With `external_data` (default: when the model is over protobuf's 2 GB limit or
    still points at external data in `source`) the weights go to `<name>.data` beside it, streamed one
    tensor at a time (`progress(done, total)` after each). `model` is not changed."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    check_target(p, "save:")  # the CLI checked its paths; an API caller's -o /dev/null must not replace a device
    if external_data is None:
        external_data = has_external(model) or serialized_size(model) > PROTOBUF_LIMIT
    if external_data:
        check_target(data_path(p), "save:")
    elif not external_data and has_external(model):
        raise InputError("the model's weights are external data; it can only be saved with external data")
    temps: list[str] = []
    try:
        tmp = _temp(folder, p.name, temps)
        if external_data:
            data_name = f"{p.name}.data"
            tmp_data = _temp(folder, data_name, temps)
            if _write_split(model, tmp, tmp_data, data_name, source, progress):
                os.replace(tmp_data, folder / data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp, p)
    except OSError as e:
        raise InputError(f"{p}: cannot write ({e.strerror or one_line(e)})") from None
    finally:
        for t in temps:
            Path(t).unlink(missing_ok=True)
    return p


def _temp(folder: Path, name: str, temps: list[str]) -> str:
    """An empty temp file beside the target, with the permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    temps.append(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _write_split(model: onnx.ModelProto, model_path: str, data_path: str, data_name: str,
                 source: Path | None, progress: Callable[[int, int], None] | None = None) -> int:
    """The main graph's large initializers to `data_path` one at a time, and a model that points at them
    under `data_name`; no second copy of the weights is made. External tensors elsewhere (Constant nodes,
    subgraphs) move into the same file, so the output never points back at the input's files, and so do the
    subgraphs' large initializers, as the main graph's (the shell past 2 GB fails to serialize). Returns the
    bytes of external data."""
    shell = onnx.ModelProto()
    shell.CopyFrom(_without_initializers(model))
    total = len(model.graph.initializer)
    with open(data_path, "wb") as data:
        for t in all_tensors(shell):  # main-graph initializers are not in the shell yet
            if uses_external_data(t):
                _store(t, _raw_bytes(t, source), data, data_name)
        for t in _get_initializer_tensors(shell):  # so these are the subgraphs' (fused If-branch weights)
            raw = None if uses_external_data(t) else _raw_bytes(t, source)
            if raw is not None and len(raw) >= EXTERNAL_THRESHOLD:
                _store(t, raw, data, data_name)
        for i, t in enumerate(model.graph.initializer):
            if progress:
                progress(i, total)
            stub = shell.graph.initializer.add()
            raw = _raw_bytes(t, source)
            if raw is None or (len(raw) < EXTERNAL_THRESHOLD and not uses_external_data(t)):
                stub.CopyFrom(t)
                continue
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            _store(stub, raw, data, data_name)
        written = data.tell()
    if progress:
        progress(total, total)
    with open(model_path, "wb") as f:
        f.write(shell.SerializeToString())
    return written


def _store(t: onnx.TensorProto, raw: bytes, data, data_name: str) -> None:
    """Make `t` hold `raw`: inline when small, else appended to the open data file and pointed at."""
    if len(raw) < EXTERNAL_THRESHOLD:
        inline(t, raw)
        return
    del t.external_data[:]
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)  # an inline tensor may hold its values in a typed field
    t.data_location = onnx.TensorProto.EXTERNAL
    offset = data.tell()
    data.write(raw)
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
        t.external_data.add(key=key, value=value)


def _raw_bytes(t: onnx.TensorProto, source: Path | None) -> bytes | None:
    if uses_external_data(t):
        if source is None:
            raise InputError(f"tensor {t.name} is external data, and the folder it lives in is unknown")
        return external_bytes(t, source)
    if t.HasField("raw_data"):
        return t.raw_data
    if t.data_type == onnx.TensorProto.STRING:
        return None
    return onnx.numpy_helper.to_array(t).tobytes()


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the main graph's initializers (cheap: those hold the weights)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field but `skip`, which is never read (reading a bytes field copies it)."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(getattr(src, fd.name))
        elif not src.HasField(fd.name):
            continue
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
        else:
            setattr(dst, fd.name, getattr(src, fd.name))


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes, in every subgraph."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def is_utf8(path: str | os.PathLike) -> bool:
    """Whether a path is valid UTF-8 (bytes that are not come from the OS as surrogates): ONNX Runtime takes paths,
    and a model names its external data file, only as UTF-8 text."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

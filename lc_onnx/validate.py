"""Run the original and the optimized model in ONNX Runtime on the same inputs and compare outputs."""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from lc_onnx import io, pins
from lc_onnx.errors import InputError, ValidationError, one_line
from lc_onnx.io import PROTOBUF_LIMIT

DYNAMIC_DIM = pins.DEFAULT  # size given to a dimension the model leaves open and nothing in it pins
INT_HIGH = 8  # random integers are drawn in [0, INT_HIGH) unless they index a table
RTOL_CAP = 1e-2  # the default rtol never allows more than this

# ONNX Runtime prints its own coloured error lines on stderr beside ours (a failing kernel, a model it cannot
# load): only fatal ones, before any session exists
ort.set_default_logger_severity(4)
# the shapes drawn for open dims are said here (one line, as Polygraphy does); with no logging set up, Python
# prints a warning's bare message on stderr
log = logging.getLogger(__name__)


def parse_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """`name:1,3,224,224` -> {"name": [1, 3, 224, 224]}."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise InputError(f"--input-shape {spec!r}: expected NAME:D1,D2,... with positive integer dims") from None
    return shapes


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def make_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, list[int]] | None = None,
    given: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (see `draw_inputs`)."""
    return draw_inputs(model, shapes, given, seed)[0]


def check_seed(seed: int) -> None:
    if seed < 0:
        raise InputError(f"--seed {seed}: must be >= 0")


def draw_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, list[int]] | None = None,
    given: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Seeded inputs for every graph input, and what was drawn for each: floats ~ N(0,1), masks (a name
    ending in `mask`) all ones, integers that index a constant table (a Gather's indices) below its size,
    other integers in [0, 8); open dims as the graph pins them (`pins.guess_shapes`: a Conv's channels, the image
    a ViT's position table fits, a mask over past and new tokens), else 2, said in one logged line. Values real
    models accept: OPT's position ids come from the cumulative attention mask and overrun their table on random
    masks."""
    shapes, given = shapes or {}, given or {}
    check_seed(seed)
    rng = np.random.default_rng(seed)
    feeds, drawn = {}, {}
    held = 0  # bytes of the inputs drawn so far
    names = [i.name for i in _graph_inputs(model)]
    for name in list(shapes) + list(given):
        if name not in names:
            raise InputError(f"the model has no input {name!r}; its inputs are {', '.join(names)}")
    tables = _index_tables(model)
    guessed, why = pins.guess_shapes(model, shapes, given)
    if guessed:
        log.warning(pins.guess_line(guessed, why))
    for vi in _graph_inputs(model):
        if vi.name in given:
            feeds[vi.name], drawn[vi.name] = given[vi.name], "given"
            continue
        ttype = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"input {vi.name!r} is not a tensor; give it with --inputs")
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if vi.name in shapes:
            shape = shapes[vi.name]
        elif vi.name in guessed:
            shape = guessed[vi.name]
        else:
            shape = [d.dim_value if d.HasField("dim_value") else DYNAMIC_DIM for d in ttype.shape.dim]
        numeric = dtype == np.bool_ or np.issubdtype(dtype, np.number)
        mask = numeric and vi.name.lower().endswith("mask")
        if numeric:  # sized before anything is allocated: numpy's MemoryError would be an internal error
            held += _room(vi.name, shape, dtype, held, scratch=not mask)
        try:
            if mask:
                feeds[vi.name], drawn[vi.name] = np.ones(shape, dtype), "ones (a mask)"
            elif np.issubdtype(dtype, np.floating):
                feeds[vi.name], drawn[vi.name] = rng.standard_normal(shape).astype(dtype), "N(0, 1)"
            elif dtype == np.bool_:
                feeds[vi.name], drawn[vi.name] = rng.integers(0, 2, shape).astype(bool), "booleans"
            elif np.issubdtype(dtype, np.integer):
                high, table = tables.get(vi.name, (INT_HIGH, None))
                feeds[vi.name] = rng.integers(0, high, shape).astype(dtype)
                drawn[vi.name] = f"integers in [0, {high})" + (f" (indices into {table!r})" if table else "")
            else:
                raise InputError(f"input {vi.name!r} has dtype {dtype}; give it with --inputs")
        except (MemoryError, ValueError) as e:
            raise InputError(f"input {vi.name!r} of shape {list(shape)} ({dtype}, "
                             f"{_size(math.prod(shape) * dtype.itemsize)}) cannot be drawn ({one_line(e)}); "
                             f"{SHAPE_HINT}") from None
    return feeds, drawn


def guessed_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None,
                   given: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """For the report: the inputs whose open dims `draw_inputs` fills, each with its shape and what set its dims."""
    found, why = pins.guess_shapes(model, shapes, given)
    return {k: {"shape": v, "from": why[k]} for k, v in found.items()}


SHAPE_HINT = "give smaller dims with --input-shape (bench: --batch)"


def _room(name: str, shape: list[int], dtype: np.dtype, held: int, scratch: bool) -> int:
    """The bytes an input of `shape` takes; InputError where drawing it (with numpy's float64/int64 `scratch`
    array) on top of the `held` bytes already drawn would not fit in the memory available."""
    count = math.prod(shape)
    size = count * dtype.itemsize
    peak = size + (count * 8 if scratch else 0)
    free = memory_available()
    if free is not None and held + peak > free:
        extra = f", {_size(peak)} while it is drawn" if peak > size else ""
        raise InputError(f"input {name!r} of shape {list(shape)} ({dtype}) takes {_size(size)}{extra}: more than "
                         f"the {_size(max(free - held, 0))} of memory available; {SHAPE_HINT}")
    return size


def memory_available() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, or less under a cgroup v2 limit; else
    the physical memory; None where none of these can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            pass
    return min(found) if found else None


def _size(n: int) -> str:
    """Bytes for a person: `96 TB`; past what a float holds, the power of ten."""
    if n.bit_length() > 1000:
        return f"about 10^{int((n.bit_length() - 1) * math.log10(2))} bytes"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _index_tables(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """Graph input -> (size, name) of the smallest constant table a Gather indexes with it (an embedding)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            dims[n.output[0]] = list(n.attribute[0].t.dims)
    inputs = {i.name for i in _graph_inputs(model)}
    found: dict[str, tuple[int, str]] = {}
    for n in model.graph.node:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        data, indices = n.input[0], n.input[1]
        if indices not in inputs or data not in dims or not dims[data]:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        shape = dims[data]
        if not -len(shape) <= axis < len(shape) or shape[axis] < 1:
            continue
        size = shape[axis]
        if indices not in found or size < found[indices][0]:
            found[indices] = (size, data)
    return found


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, by name; InputError for anything else (a .npy, an empty or cut file)."""
    try:
        with zipfile.ZipFile(path) as z:  # np.load would take a .npy or a pickle as well
            z.testzip()
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"--inputs {path}: not a readable .npz file ({one_line(e)})") from None


def session(model: onnx.ModelProto | Path, providers: list[str] | None = None, threads: int = 0,
            opt_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, source: Path | None = None,
            spinning: bool = True) -> ort.InferenceSession:
    """An ORT session on a model file, or on an in-memory model; models over 2 GB, or that point at
    external data in `source`, go through a temporary folder. `spinning=False` stops idle worker threads
    from spinning, which would steal the cores from the next session when several run in turn."""
    so = ort.SessionOptions()
    so.graph_optimization_level = opt_level
    so.intra_op_num_threads = threads
    so.log_severity_level = 4  # fatal only: errors come back as exceptions, said once by us
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, Path):
        if io.is_utf8(model):
            return ort.InferenceSession(str(model), so, providers=providers)
        # ONNX Runtime takes a path only as UTF-8 text: hand it the file's bytes, and the folder its external
        # data lives in through a link that it can name
        with tempfile.TemporaryDirectory() as d:
            folder = os.path.abspath(model.parent)
            if not io.is_utf8(folder):
                os.symlink(folder, Path(d) / "folder")
                folder = str(Path(d) / "folder")
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            return ort.InferenceSession(model.read_bytes(), so, providers=providers)
    if not io.has_external(model) and io.serialized_size(model) <= PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory() as d:
        path = io.save(model, Path(d) / "model.onnx", external_data=True, source=source)
        return ort.InferenceSession(str(path), so, providers=providers)


@dataclass
class OutputError:
    name: str
    max_abs: float
    rel_l2: float
    passed: bool
    # integer and bool outputs (an argmax, a mask) are judged by the share of elements that differ, not by
    # rtol/atol: `mismatch` is that share (inf: the shape changed), None for float outputs
    mismatch: float | None = None
    elements: int = 0
    dtype: str = ""

    def why(self, v: Validation) -> str:
        """Why this output failed, naming the option that would let it pass (if any does)."""
        if self.mismatch is None and math.isinf(self.rel_l2) and math.isinf(self.max_abs):
            return (f"output {self.name!r} changed shape or where it is NaN/inf: no tolerance lets that pass; "
                    f"lower --tol")
        if self.mismatch is None:
            return (f"output {self.name!r} differs by rel L2 {self.rel_l2:.3g} (max |abs| {self.max_abs:.3g}) "
                    f"> rtol {v.rtol:.3g} (and atol {v.atol:.3g}); lower --tol or raise --rtol")
        if math.isinf(self.mismatch):
            return f"{self.dtype} output {self.name!r} changed shape: no option lets that pass; lower --tol"
        return (f"{round(self.mismatch * self.elements)} of {self.elements} elements of {self.dtype} output "
                f"{self.name!r} differ (a share of {self.mismatch:.3g} > --max-mismatch {v.max_mismatch:g}): an "
                f"integer computed from floats flips where they nearly tie (an argmax); allow that share with "
                f"--max-mismatch")


@dataclass
class Validation:
    rtol: float
    atol: float
    outputs: list[OutputError] = field(default_factory=list)
    inputs: dict[str, list[int]] = field(default_factory=dict)  # name -> shape used
    drawn: dict[str, str] = field(default_factory=dict)  # name -> what its values are (see draw_inputs)
    # inputs with open dims that no shape or data was given for: name -> {"shape", "from": what set its dims}
    guessed: dict[str, dict] = field(default_factory=dict)
    # how the models ran: "as stored" (their own dtypes), or "float32" (float16/bfloat16 models that the CPU
    # provider cannot run, both cast to float32 for the comparison); `precision_note` says why
    precision: str = "as stored"
    precision_note: str = ""
    max_mismatch: float = 0.0  # largest share of an integer/bool output's elements that may differ

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failure(self) -> str:
        """The error line of a failed validation: the worst outputs first, each with the option that helps."""
        bad = sorted((o for o in self.outputs if not o.passed), key=lambda o: -o.rel_l2)
        more = [f"and {len(bad) - 3} more output(s)"] if len(bad) > 3 else []
        return "validation failed: " + "; ".join([o.why(self) for o in bad[:3]] + more)

    def to_dict(self) -> dict:
        return {"rtol": self.rtol, "atol": self.atol, "max_mismatch": self.max_mismatch, "passed": self.passed,
                "inputs": self.inputs,
                "drawn": self.drawn, "guessed": self.guessed,
                "precision": self.precision, "precision_note": self.precision_note,
                "outputs": [asdict(o) for o in self.outputs]}


def _half(model: onnx.ModelProto) -> bool:
    return any(o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
               for o in model.graph.output)


def default_rtol(model: onnx.ModelProto, rewrites: list) -> float:
    """1e-4 for float32/64 outputs (1e-2 for float16, which rounds differently once two layers are one), or
    the largest |1 - slope| a rewrite took as the identity if larger (such a block's error is
    W_B·(α−1)·min(0, h): about that fraction of its output), but never above 1e-2: what was rewritten sets
    the bound, not --tol, which a user may set far too wide."""
    return min(RTOL_CAP, max(1e-2 if _half(model) else 1e-4, taken_offset(rewrites)))


def taken_offset(rewrites: list) -> float:
    """The largest |1 - slope| a rewrite took as the identity (0 where every rewrite was exact)."""
    return max((max(abs(1 - lo), abs(1 - hi)) for r in rewrites
                if r.error_coefficient > 0 and r.slope_range for lo, hi in [r.slope_range]), default=0.0)


def default_atol(model: onnx.ModelProto) -> float:
    """An output whose every element is this close passes even when its relative error does not: outputs
    near zero (cancellation) have large relative error at the dtype's rounding level."""
    return 1e-3 if _half(model) else 1e-5


def _errors(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    if ref.shape != got.shape:
        return float("inf"), float("inf")
    if not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.integer) or ref.dtype == np.bool_):
        same = np.array_equal(ref, got)
        return (0.0, 0.0) if same else (float("inf"), float("inf"))
    r, g = ref.astype(np.float64), got.astype(np.float64)
    if not np.array_equal(np.isnan(r), np.isnan(g)) or not np.array_equal(np.isinf(r), np.isinf(g)):
        return float("inf"), float("inf")
    finite = np.isfinite(r)
    if finite.any() and not np.array_equal(r[~finite], g[~finite]):
        return float("inf"), float("inf")
    diff = (g - r)[finite]
    if diff.size == 0:
        return 0.0, 0.0
    max_abs = float(np.abs(diff).max())
    norm = float(np.linalg.norm(r[finite]))
    rel = float(np.linalg.norm(diff)) / norm if norm > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel


def _mismatch(ref: np.ndarray, got: np.ndarray) -> float:
    """The share of elements that differ (inf where the shapes do)."""
    if ref.shape != got.shape:
        return float("inf")
    return float(np.count_nonzero(np.asarray(ref != got))) / ref.size if ref.size else 0.0


def return_freed_memory() -> None:
    """glibc keeps freed blocks (a dropped model's protobuf arenas, a closed session's tensors) in the heap
    below live ones, so the next session's weights would stack on top: hand those pages back first."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


class _OriginalFailed(Exception):
    """ONNX Runtime could not load or run the original model (the message is the InputError's)."""


def compare(original: onnx.ModelProto | Path, optimized: onnx.ModelProto, feeds: dict[str, np.ndarray],
            rtol: float, atol: float, source: Path | None = None, release: bool = False,
            max_mismatch: float = 0.0, reference: list[tuple[str, np.ndarray]] | None = None) -> Validation:
    """Max |abs| and relative L2 error of every output; a float output passes when rel L2 ≤ rtol or max |abs|
    ≤ atol, an integer or bool output when at most the share `max_mismatch` of its elements differ (an argmax
    flips where float rounding reorders two near-equal values, whatever rtol says). The two sessions run one
    after the other, so only one model's weights are in ONNX Runtime at a time; with `release` (large models)
    the first session's memory is handed back before the second.

    A float16/bfloat16 model that ONNX Runtime's CPU provider cannot run (a kernel it lacks, as for most ops in
    bfloat16) is compared in float32 instead: both models are cast (`to_float32`: every half-precision weight,
    Constant, Cast target and declared type; the values are exact in float32, so the fused weights are compared
    as rounded to the model's dtype, with float32 arithmetic), the inputs too. `precision` says which was done.

    `reference`: the original's outputs (name, value) from an earlier comparison in its own dtype (the result's
    `reference`), so that a caller comparing several candidates runs the original once."""
    if reference is not None:
        return _judge(reference, _run_optimized(optimized, source, feeds), feeds, rtol, atol, max_mismatch)
    try:
        return _compare(original, optimized, feeds, rtol, atol, source, release, max_mismatch)
    except _OriginalFailed as e:
        if not uses_half(optimized):
            raise InputError(str(e)) from None
        why = str(e)
    try:
        wide = to_float32(original if isinstance(original, onnx.ModelProto) else io.read(original, False)[0], source)
        if release:
            return_freed_memory()
        result = _compare(wide, to_float32(optimized, source), _wide_feeds(feeds), rtol, atol, source, release,
                          max_mismatch)
    except _OriginalFailed:  # not a precision problem after all: say what the first try said
        raise InputError(why) from None
    result.precision = "float32"
    result.precision_note = (f"both models cast to float32: ONNX Runtime's CPU provider cannot run them in their "
                             f"own dtype ({why.split(' (', 1)[-1].rstrip(')')[:200]})")
    return result


def _compare(original: onnx.ModelProto | Path, optimized: onnx.ModelProto, feeds: dict[str, np.ndarray],
             rtol: float, atol: float, source: Path | None, release: bool, max_mismatch: float = 0.0) -> Validation:
    check_share("--max-mismatch", max_mismatch)
    try:
        sess = session(original, source=source)
    except Exception as e:  # ORT's errors are of many kinds; all mean the same thing here
        raise _OriginalFailed(f"ONNX Runtime cannot run the original model, so it cannot be validated "
                              f"({one_line(e)}); use --no-validate to skip") from None
    names = [o.name for o in sess.get_outputs()]
    try:
        ref = list(zip(names, sess.run(None, feeds), strict=True))
    except Exception as e:
        raise _OriginalFailed(f"ONNX Runtime failed on the original model with the validation inputs "
                              f"({one_line(e)}); give shapes with --input-shape or data with --inputs") from None
    del sess
    if release:
        return_freed_memory()
    got = _run_optimized(optimized, source, feeds)
    if release:
        return_freed_memory()
    return _judge(ref, got, feeds, rtol, atol, max_mismatch)


def _run_optimized(optimized: onnx.ModelProto, source: Path | None, feeds: dict[str, np.ndarray]) -> list:
    """The optimized model's outputs on `feeds`; its session is gone when this returns."""
    try:
        return session(optimized, source=source).run(None, feeds)
    except Exception as e:
        raise ValidationError(f"ONNX Runtime cannot run the optimized model ({one_line(e)})") from e


def _judge(ref: list[tuple[str, np.ndarray]], got: list, feeds: dict[str, np.ndarray], rtol: float, atol: float,
           max_mismatch: float) -> Validation:
    """The optimized model's outputs `got` judged against the original's `ref` (name, value)."""
    result = Validation(rtol=rtol, atol=atol, inputs={k: list(v.shape) for k, v in feeds.items()},
                        max_mismatch=max_mismatch)
    result.reference = ref  # not a field: for the next candidate's comparison (`compare(reference=...)`)
    for (name, r), g in zip(ref, got, strict=True):
        r, g = np.asarray(r), np.asarray(g)
        max_abs, rel = _errors(r, g)
        if np.issubdtype(r.dtype, np.floating):
            result.outputs.append(OutputError(name, max_abs, rel, rel <= rtol or max_abs <= atol))
        else:
            share = _mismatch(r, g)
            result.outputs.append(OutputError(name, max_abs, rel, share <= max_mismatch, share, int(r.size),
                                              str(r.dtype)))
    return result


def check_share(option: str, value: float) -> None:
    """InputError unless `value` is a share: a number from 0 to 1."""
    if not 0 <= value <= 1:
        raise InputError(f"{option} {value}: must be a share from 0 to 1")


HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _value_infos(g: onnx.GraphProto):
    yield from g.input
    yield from g.output
    yield from g.value_info


def _nodes_everywhere(model: onnx.ModelProto):
    """Every node of the model: its graphs and subgraphs, and its local functions."""
    from lc_onnx.shapes import graphs

    for g in graphs(model.graph):
        yield from g.node
    for f in model.functions:
        yield from f.node


def uses_half(model: onnx.ModelProto) -> bool:
    """Whether any weight, declared type or Cast of the model is float16 or bfloat16."""
    from lc_onnx.shapes import graphs

    for g in graphs(model.graph):
        if any(t.data_type in HALF for t in g.initializer):
            return True
        if any(vi.type.tensor_type.elem_type in HALF for vi in _value_infos(g)):
            return True
    return any(n.op_type == "Cast" and any(a.name == "to" and a.i in HALF for a in n.attribute)
               for n in _nodes_everywhere(model))


def _wide_tensor(t: onnx.TensorProto, source: Path | None) -> None:
    """`t`, in place, as float32 (its data read from `source` when external)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        if source is None:
            raise InputError(f"tensor {t.name!r} is external data, but the model's folder is not known")
        values = io.external_array(t, source)
    else:
        values = onnx.numpy_helper.to_array(t)
    wide = onnx.numpy_helper.from_array(values.astype(np.float32), t.name)
    t.CopyFrom(wide)


def to_float32(model: onnx.ModelProto, source: Path | None = None) -> onnx.ModelProto:
    """A copy of `model` in which float16 and bfloat16 are float32: weights (initializers, Constant and
    ConstantOfShape values, external ones read from `source`), graph inputs, outputs and value infos, and the
    targets of Cast and of ops with a `dtype` attribute. Every half value is exact in float32. Weights of other
    dtypes that are external data stay on disk."""
    from lc_onnx.shapes import graphs

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in graphs(out.graph):
        for t in g.initializer:
            if t.data_type in HALF:
                _wide_tensor(t, source)
        for vi in _value_infos(g):
            if vi.type.tensor_type.elem_type in HALF:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for n in _nodes_everywhere(out):
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in HALF:
                _wide_tensor(a.t, source)
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i in HALF:
                a.i = onnx.TensorProto.FLOAT
    return out


def _wide_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if v.dtype in (np.float16,) or v.dtype.name == "bfloat16" else v
            for k, v in feeds.items()}

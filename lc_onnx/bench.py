"""Interleaved latency in ONNX Runtime, or in OpenVINO's CPU plugin (`runtime="openvino"`, imported only then):
models run in turn (A B, B A, ...) so machine drift hits all alike."""

from __future__ import annotations

import functools
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from lc_onnx import io, pins
from lc_onnx import shapes as inference
from lc_onnx.api import node_label, read_stamp
from lc_onnx.errors import InputError, one_line
from lc_onnx.validate import check_seed, draw_inputs, session
from passes.cost import fan_out_cost, split_cost
from passes.match import const_value

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}  # OrtValue device of each provider
RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}  # --runtime: its name in messages
# OpenVINO's CPU plugin runs float32 models in bf16 where the CPU has it (its default hint): benchmarks ask for f32
OV_PRECISIONS = ("f32", "bf16", "f16")
OV_EXTRA = "pip install 'lc-onnx[openvino]'"


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    samples_ms: list[float] = field(default_factory=list)  # every timed run, in the order run


def interleaved(
    models: list[onnx.ModelProto | Path],
    feeds: dict[str, np.ndarray],
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    providers: list | None = None,
    progress: Callable[[int], None] | None = None,
    io_binding: bool = False,
    given: Collection[str] = (),
    names: list[str] | None = None,
    runtime: str = "onnxruntime",
    ov_precision: str = "f32",
) -> list[Latency]:
    """Median, p10 and p90 latency of each model, same session options (ORT_ENABLE_ALL, no spinning
    worker threads, which would take the cores from the model that runs next) for all. `providers` as ONNX
    Runtime takes them (names, or (name, options) pairs). With `io_binding` the inputs are copied to the
    provider's device once and every run writes into the same output buffers there (ORT IOBinding): a run is
    device work, not host copies (what CUDA graphs need too). `names` label the models in errors. With
    `runtime="openvino"` each model is compiled for OpenVINO's CPU plugin instead (`ov_compile`: `threads`, at
    `ov_precision`) and a run is one `infer` of its request on the same feeds; `providers` and `io_binding` are
    ONNX Runtime's and do not apply."""
    names = names or [_name(m) for m in models]
    want = _provider_name(providers[0]) if providers else None
    sessions = []
    steps: list[Callable[[], object]] = []
    for m, name in zip(models, names, strict=True):
        if runtime == "openvino":
            steps.append(_ov_step(ov_compile(m, name, threads, ov_precision), feeds))
            continue
        try:
            sessions.append(session(m, providers, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=False))
        except Exception as e:  # ORT's errors are of many kinds; all mean it cannot load this model
            hint = "; some nodes stay outside CUDA even with the inputs' shapes fixed: bench without --cuda-graph" \
                if "graph capture" in str(e) else ""
            raise InputError(f"ONNX Runtime cannot load {name} ({one_line(e)}){hint}") from None
    if want:
        for s in sessions:
            if s.get_providers()[0] != want:  # ORT falls back to the CPU when a provider fails to load
                raise InputError(f"ONNX Runtime could not start {want} (it fell back to "
                                 f"{s.get_providers()[0]}); no CPU numbers are given in its place")
    times: list[list[float]] = [[] for _ in models]
    j = 0
    try:
        device = DEVICES.get(want or "CPUExecutionProvider", "cpu")
        for j in range(len(sessions)):
            steps.append(_Bound(sessions[j], feeds, device) if io_binding
                         else functools.partial(sessions[j].run, None, feeds))
        for _ in range(warmup):
            for j in range(len(steps)):
                steps[j]()
        for i in range(runs):
            # the order turns each round (A B C, B C A, C A B, ...): the model that runs right after a large
            # one finds the caches cold, and no model should always be that one
            for k in range(len(steps)):
                j = (i + k) % len(steps)
                start = time.perf_counter()
                steps[j]()
                times[j].append((time.perf_counter() - start) * 1e3)
            if progress:
                progress(i + 1)
    except Exception as e:  # random inputs can send a model down a branch it cannot take (a sample rate)
        drawn = [k for k in feeds if k not in given]
        where = ("the random inputs" if len(drawn) == len(feeds) else "the inputs given with --inputs" if not drawn
                 else f"the inputs given with --inputs and random ones for {', '.join(drawn)}")
        hint = "pass real data with --inputs" if not given else "give all of them with --inputs" if drawn else \
            "check the data in --inputs"
        raise InputError(f"{RUNTIMES.get(runtime, runtime)} failed running {names[j]} on {where} ({one_line(e)}); "
                         f"{hint}") from None
    return [
        Latency(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), runs, t)
        for t in times
    ]


def _provider_name(p) -> str:
    return p if isinstance(p, str) else p[0]


class _Bound:
    """A run of `sess` through an IOBinding: inputs copied to `device` once; the first run (here) lets ONNX
    Runtime allocate the outputs there, and every later run writes into those same buffers (fixed addresses,
    as a captured CUDA graph needs). A call waits for the device before it returns."""

    def __init__(self, sess: ort.InferenceSession, feeds: dict[str, np.ndarray], device: str):
        self.sess, self.binding = sess, sess.io_binding()
        self.inputs = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), device, 0) for a in feeds.values()]
        for name, value in zip(feeds, self.inputs, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            self.binding.bind_output(name, device)
        sess.run_with_iobinding(self.binding)
        self.outputs = self.binding.get_outputs()  # held here, so the device buffers live as long as the run
        self.binding.clear_binding_outputs()
        for name, value in zip(names, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(name, value)

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()


def openvino():
    """The openvino module, imported only when asked for (it takes ~0.4 s); InputError naming the extra where it
    cannot be imported."""
    try:
        import openvino as ov
    except ImportError as e:
        raise InputError(f"--runtime openvino needs OpenVINO, which cannot be imported ({one_line(e)}): "
                         f"{OV_EXTRA}") from None
    return ov


def ov_config(threads: int = 0, precision: str = "f32") -> dict[str, str | int]:
    """What bench asks of OpenVINO's CPU plugin: `precision` for float math (f32 by default: the plugin's own
    default is bf16 where the CPU has it, 5e-2 off on the demo), latency mode (one stream), and `threads` (0: its
    choice)."""
    config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


@functools.cache
def _ov_core():
    return openvino().Core()


def ov_compile(model: onnx.ModelProto | Path, name: str, threads: int = 0, precision: str = "f32"):
    """`model` compiled for OpenVINO's CPU plugin with `ov_config`, its open dims left open as ONNX Runtime
    leaves them. InputError where OpenVINO cannot load it, or runs it at another precision than asked (the plugin
    falls back silently where the CPU lacks one: f16 on most x86)."""
    core = _ov_core()
    try:
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        compiled = core.compile_model(core.read_model(source), "CPU", ov_config(threads, precision))
    except Exception as e:  # OpenVINO raises RuntimeError and its own kinds; all mean it cannot load this model
        raise InputError(f"OpenVINO cannot load {name} ({one_line(e)})") from None
    got = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if got != precision:
        caps = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        raise InputError(f"OpenVINO's CPU plugin runs {name} in {got}, not the {precision} asked for with "
                         f"--ov-precision: this CPU lacks it (it has {caps})")
    return compiled


def _ov_step(compiled, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One inference of `compiled` on `feeds` through its own request: the inputs shared, not copied (as ONNX
    Runtime's `run` wraps numpy arrays), the outputs copied out to numpy (as `run` returns them)."""
    request = compiled.create_infer_request()
    names = {n for port in compiled.inputs for n in port.get_names()}
    return functools.partial(request.infer, {k: v for k, v in feeds.items() if k in names}, share_inputs=True)


def run_once(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], runtime: str = "onnxruntime",
             threads: int = 0, ov_precision: str = "f32") -> list[np.ndarray]:
    """The outputs of one inference of `model` on `feeds` as bench runs it in `runtime` (ONNX Runtime's CPU
    provider at ORT_ENABLE_ALL, or OpenVINO's CPU plugin at `ov_precision`), in the graph's output order: to
    check that what is timed in one runtime computes what it does in the other."""
    if runtime == "openvino":
        compiled = ov_compile(model, _name(model), threads, ov_precision)
        result = _ov_step(compiled, feeds)()
        return [np.asarray(result[port]) for port in compiled.outputs]
    sess = session(model, None, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=False)
    return list(sess.run(None, feeds))


def _name(model: onnx.ModelProto | Path) -> str:
    return str(model) if isinstance(model, Path) else "the model"


def provider(name: str) -> str:
    """The ORT provider for `cpu`/`cuda`; InputError when this onnxruntime does not have it."""
    full = PROVIDERS[name]
    if full not in ort.get_available_providers():
        raise InputError(f"{full} is not available in this onnxruntime "
                         f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA")
    return full


def feed_shapes(model: onnx.ModelProto, batch: int | None, shapes: dict[str, list[int]] | None = None,
                given: dict[str, np.ndarray] | None = None) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """The shape of every input with open dims that bench draws: `shapes` (--input-shape) as given; with `batch`,
    every other input's open first dim set to it (and only that dim); the open dims left as the graph pins them
    (`pins.guess_shapes`: a Conv's channels, a ViT's image, dims named alike), else 2. Also, per input that has
    open dims, where they came from: `batch` (its first dim set by --batch), `alike` (dims named like one of an
    input the caller sized: {index: that input}), `guessed` (the indices of the other dims) and `why` (how, from
    the guess). Inputs in `given` (--inputs) are not drawn and not listed. `model` is left as it was."""
    shapes, given = dict(shapes or {}), given or {}
    held = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in held]
    pinned: list[tuple[onnx.TensorShapeProto.Dimension, onnx.TensorShapeProto.Dimension]] = []  # (dim, as it was)
    batched: dict[str, list[int]] = {}
    try:  # the batch is set on the declared dims (and put back below), so that the guess sees it as fixed
        for vi in inputs if batch is not None else []:
            dims = vi.type.tensor_type.shape.dim
            if vi.name in shapes or vi.name in given or not dims:
                continue
            if dims[0].HasField("dim_value"):
                if dims[0].dim_value != batch:
                    raise InputError(f"input {vi.name!r} has a fixed first dim {dims[0].dim_value}; --batch {batch} "
                                     f"cannot apply (export with a dynamic batch axis, or use --input-shape)")
                continue
            was = onnx.TensorShapeProto.Dimension()
            was.CopyFrom(dims[0])
            pinned.append((dims[0], was))
            dims[0].dim_value = batch
            batched[vi.name] = [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else []
        guessed, why = pins.guess_shapes(model, shapes, given)
    finally:
        for dim, was in pinned:
            dim.CopyFrom(was)
    full = {**shapes, **{k: v for k, v in batched.items() if v}, **guessed}
    named: dict[str, str] = {}  # dim names -> the input the caller sized that names it: a dim named so is no guess
    for vi in inputs:
        dims, size = vi.type.tensor_type.shape.dim, shapes.get(vi.name, np.shape(given.get(vi.name, ())))
        if (vi.name in shapes or vi.name in given) and len(dims) == len(size):
            for d in dims:
                if d.dim_param:
                    named.setdefault(d.dim_param, vi.name)
    where: dict[str, dict] = {}
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in given or vi.name in shapes or not any(not d.HasField("dim_value") for d in dims):
            continue
        open_dims = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if vi.name in batched:
            open_dims.remove(0)
        alike = {i: named[dims[i].dim_param] for i in open_dims if dims[i].dim_param in named}
        where[vi.name] = {"batch": vi.name in batched, "guessed": [i for i in open_dims if i not in alike],
                          "alike": alike, "why": why.get(vi.name, ""), "dim_names": [d.dim_param or None for d in dims]}
    return full, where


LINEAR_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class MacShare:
    """Analytic multiply-accumulates of the first model at the benchmark's input shapes: MatMul, Gemm and Conv
    nodes of the main graph and of its subgraphs (an If's costlier branch, a Loop or Scan body once: per
    iteration), and the part held by the chains and blocks `inspect` says a rule would rewrite (a run
    of chains that share a layer counts once). `after` is the total once they are rewritten (per row: a collapsed
    chain costs d_in·d_out, a bottleneck whose activation is only dropped what it did, a fan-out d_in·Σd_i for its
    folded layers, a split d_in·d_out + n·(d_in+d_out) for its direct map and the narrow MLP of its n other
    units); `mac_ratio = total / after` is the speedup if time followed MACs. It is a yardstick, not a bound: the
    collapse also removes the PRelu nodes and the h-wide intermediate tensors, so on the CPU the measured speedup
    of a prepared model exceeds it (ViT-T/16: 2.3-2.8x measured, MAC ratio 1.95x), while on a GPU at small batch
    launches and attention keep it well below."""

    total: int
    by_op: dict[str, int]
    chains: int  # MACs of the linear layers of the chains and blocks a rule would rewrite
    chain_count: int  # runs of chains (chains that share a layer are one); a fan-out or split block is one
    after: int
    unknown: list[str] = field(default_factory=list)  # linear nodes whose shapes inference could not tell
    unsaved: int = 0  # fan-out/split runs whose saving is not told (see `mac_share`): in the share, saving 0
    left_for_budget: int = 0  # blocks lc-onnx optimize left in this model (its stamp): they count as collapsible

    @property
    def share(self) -> float:
        return self.chains / self.total if self.total else 0.0

    @property
    def mac_ratio(self) -> float:
        return self.total / self.after if self.after else 1.0

    def line(self, model: str = "the first model") -> str:
        if not self.total:
            return f"MACs of {model}: no MatMul/Gemm/Conv with known shapes"
        ops = ", ".join(f"{k} {_count(v)}" for k, v in self.by_op.items() if v)
        text = (f"MACs of {model}: {_count(self.total)} ({ops}); the {self.chain_count} collapsible chain(s) "
                f"hold {100 * self.share:.1f}%; folded: {_count(self.total)} -> {_count(self.after)} MACs "
                f"({self.mac_ratio:.2f}x fewer)")
        if self.unknown:
            text += f" ({len(self.unknown)} linear node(s) of unknown shape left out)"
        if self.unsaved:
            text += f" ({self.unsaved} fan-out/split run(s) counted with no saving)"
        if self.left_for_budget:
            text += (f" (lc-onnx optimize left {self.left_for_budget} block(s) of this model for the accuracy "
                     f"budget: folding them moved an output past its --rtol)")
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "share": self.share, "mac_ratio": self.mac_ratio}


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def node_macs(model: onnx.ModelProto, inputs: dict[str, list[int]], feeds: dict[str, np.ndarray] | None = None,
              source: Path | None = None) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """MACs of every MatMul, Gemm and Conv node of the main graph, by `api.node_label` (op, MACs), with the graph
    inputs at `inputs` shapes; and the names of those whose shapes could not be told. MACs = output elements ×
    the reduced length: K of a MatMul or Gemm, C_in/group × kernel size of a Conv. Shapes come from ONNX shape
    inference; where it cannot tell (Reshape targets computed at run time), and `feeds` are given, from one run
    of the model on the CPU with those nodes' tensors as extra outputs (`source`: its external data's folder)."""
    return _node_macs(model, inputs, feeds, source)[:2]


def _node_macs(model: onnx.ModelProto, inputs: dict[str, list[int]], feeds: dict[str, np.ndarray] | None,
               source: Path | None) -> tuple[dict[str, tuple[str, int]], list[str], Callable]:
    """`node_macs`, and a `dims(name)` for subgraphs' tensors (inference walks them): there a symbolic dim that a
    main-graph input names, a Loop body's batch `N` say, is read at the value `inputs` give that input."""
    named = {d.dim_param: v for vi in model.graph.input if vi.name in inputs
             for d, v in zip(vi.type.tensor_type.shape.dim, inputs[vi.name], strict=False) if d.dim_param}
    light = inference.weightless(model)
    for vi in light.graph.input:
        if vi.name in inputs:
            _declare(vi, inputs[vi.name])
    known = {name: dims for name, (_, dims) in inference.infer(light).items()}
    for g in inference.graphs(light.graph):
        for t in g.initializer:
            known[t.name] = list(t.dims)
    for vi in light.graph.input:
        known.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None
                                   for d in vi.type.tensor_type.shape.dim])

    def dims(name: str, bind: bool = False) -> list[int] | None:
        d = known.get(name)
        d = [named.get(x, x) if isinstance(x, str) else x for x in d] if d is not None and bind else d
        return d if d is not None and all(isinstance(x, int) and x > 0 for x in d) else None

    linear = _linear_nodes(model.graph)
    missing = [n for _, n in linear if any(dims(t) is None for t in (n.output[0], n.input[0], n.input[1]))]
    if missing and feeds is not None:
        known.update(_probe(model, {t for n in missing for t in (n.output[0], n.input[0], n.input[1])}, feeds, source))
    return *_graph_macs(model.graph, dims), functools.partial(dims, bind=True)


def _linear_nodes(graph: onnx.GraphProto) -> list[tuple[str, onnx.NodeProto]]:
    return [(node_label(n.name, i), n) for i, n in enumerate(graph.node)
            if n.op_type in LINEAR_OPS and n.domain in ("", "ai.onnx") and len(n.input) > 1]


def _graph_macs(graph: onnx.GraphProto, dims: Callable) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """`node_macs` of the nodes of one graph (the main graph or a subgraph), from shapes `dims` gives."""
    found, unknown = {}, []
    for name, n in _linear_nodes(graph):
        out, a, b = dims(n.output[0]), dims(n.input[0]), dims(n.input[1])
        if out is None or a is None or b is None:
            unknown.append(name)
            continue
        if n.op_type == "MatMul":
            reduced = a[-1]
        elif n.op_type == "Gemm":
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            reduced = a[0] if trans_a else a[-1]
        else:  # Conv: the weight is [C_out, C_in/group, k1, k2, ...]
            reduced = math.prod(b[1:])
        found[name] = (n.op_type, math.prod(out) * reduced)
    return found, unknown


def _probe(model: onnx.ModelProto, names: set[str], feeds: dict[str, np.ndarray],
           source: Path | None) -> dict[str, list[int]]:
    """The shapes of tensors `names` in one CPU run of `model` on `feeds` ({} where the run fails)."""
    listed = {o.name for o in model.graph.output}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    extra = sorted(names - listed - {t.name for t in model.graph.initializer})
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
    try:
        sess = session(probe, source=source)
        values = sess.run(None, feeds)
    except Exception:  # the share is a help beside the timing: left unknown, said so in the line
        return {}
    return {o.name: list(np.shape(v)) for o, v in zip(sess.get_outputs(), values, strict=True)}


def mac_share(model: onnx.ModelProto, inputs: dict[str, list[int]], candidates: list,
              feeds: dict[str, np.ndarray] | None = None, source: Path | None = None) -> MacShare:
    """The MAC share of the chains and blocks among `candidates` (from `lc_onnx.inspect`) that a rule would
    rewrite (`feeds`, `source`: see `node_macs`). Chains that share a layer (A→B→C gives A·B and B·C) are one run,
    counted once; a run of collapse_linear_chain folds to one d_in·d_out layer, the first layer's d_in to the
    last's d_out (or stays as it is, if that costs more). A collapse_fan_out or split_linear_units block costs
    what its rule's cost model says it leaves. Counted with no saving (`unsaved`): a block that shares a layer
    with other chains (what the run leaves depends on the order the rules fire in), and a split whose PRelu cannot
    be told by its name (names repeat) or read. Subgraphs count as `_graph_share` says: an If its costlier
    branch, a Loop or Scan body one iteration; a subgraph whose name repeats is counted, its chains not (inspect
    tells candidates' graphs by name)."""
    per_node, unknown, dims = _node_macs(model, inputs, feeds, source)
    names = Counter(g.name or "subgraph" for g in list(inference.graphs(model.graph))[1:])
    repeated = {name for name, k in names.items() if k > 1}
    part = _graph_share(model.graph, "", per_node, unknown, candidates, _LinearUnits(model, source), dims, repeated)
    return MacShare(part.total, part.by_op, part.chains, part.count, part.total - part.saved, part.unknown,
                    part.unsaved, _left_for_budget(model))


def _left_for_budget(model: onnx.ModelProto) -> int:
    """How many blocks lc-onnx optimize left for the accuracy budget, from the stamp it wrote (0 without one)."""
    try:
        return int((read_stamp(model) or {}).get("left_for_budget", 0))
    except (ValueError, TypeError):
        return 0


@dataclass
class _Part:
    """What one graph, with the subgraphs it runs, adds to a MacShare."""

    by_op: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINEAR_OPS, 0))
    chains: int = 0
    count: int = 0
    saved: int = 0
    unsaved: int = 0
    unknown: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, other: _Part) -> None:
        for op, m in other.by_op.items():
            self.by_op[op] += m
        self.chains, self.count = self.chains + other.chains, self.count + other.count
        self.saved, self.unsaved = self.saved + other.saved, self.unsaved + other.unsaved
        self.unknown += other.unknown


def _graph_share(graph: onnx.GraphProto, gname: str, per_node: dict[str, tuple[str, int]], unknown: list[str],
                 candidates: list, units: _LinearUnits, dims: Callable, repeated: set[str]) -> _Part:
    """The share of one graph (`gname` as inspect names it, "" for the main graph): its own linear nodes and
    chains, and each control-flow node's subgraphs: an If adds its costlier branch (one of them runs), a Loop or
    Scan its body once (per iteration: the trip count is not known). Unknown nodes are listed from every branch."""
    part = _chains_share(per_node, unknown, [c for c in candidates if c.graph == gname], units)
    if gname:
        part.unknown = [f"{gname}/{u}" for u in part.unknown]
    for node in graph.node:
        subs = []
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                name = g.name or "subgraph"
                found, left = _graph_macs(g, dims)
                subs.append(_graph_share(g, name, found, left, [] if name in repeated else candidates, units, dims,
                                         repeated))
        if node.op_type == "If" and subs:
            costlier = max(subs, key=lambda p: p.total)
            part.unknown += [u for p in subs if p is not costlier for u in p.unknown]
            subs = [costlier]
        for sub in subs:
            part.add(sub)
    return part


def _chains_share(per_node: dict[str, tuple[str, int]], unknown: list[str], candidates: list,
                  units: _LinearUnits) -> _Part:
    """The MACs of one graph's linear nodes `per_node`, and of the chains and blocks among its `candidates`."""
    part = _Part(unknown=list(unknown))
    for op, m in per_node.values():
        part.by_op[op] += m
    linear = set(per_node) | set(unknown)
    counted = [c for c in candidates if c.kind == "chain" and c.rule in CHAIN_RULES + BLOCK_RULES]
    for run in _runs([(c, [n for n in c.names if n in linear]) for c in counted]):
        layers = {k for _, keys in run for k in keys}
        macs = sum(per_node[k][1] for k in layers if k in per_node)
        if not macs:
            continue
        part.count += 1
        part.chains += macs
        if not layers <= set(per_node):
            continue
        if any(c.rule in BLOCK_RULES for c, _ in run):
            after = _block_after(run[0], per_node, units) if len(run) == 1 else None
            if after is None:
                part.unsaved += 1
            else:
                part.saved += macs - after
        elif all(c.rule == "collapse_linear_chain" and c.shape and len(keys) == 2 for c, keys in run):
            part.saved += max(0, macs - _chain_run_after(run, per_node))
    return part


CHAIN_RULES = ("collapse_linear_chain", "drop_unit_activation")
BLOCK_RULES = ("collapse_fan_out", "split_linear_units")


def _runs(chains: list[tuple]) -> list[list[tuple]]:
    """(candidate, its linear layers' node keys) grouped into runs: chains that share a layer, transitively."""
    runs: list[list[tuple]] = []
    for chain in chains:
        apart = [r for r in runs if not any(set(chain[1]) & set(keys) for _, keys in r)]
        runs = apart + [[chain] + [c for r in runs if not any(r is a for a in apart) for c in r]]
    return runs


def _rows(first: str, d_in: int, d_out: int, per_node: dict[str, tuple[str, int]]) -> float:
    """Input rows of a d_in→d_out layer, from its MACs."""
    return per_node[first][1] / (d_in * d_out)


def _chain_run_after(run: list[tuple], per_node: dict[str, tuple[str, int]]) -> int:
    """MACs of the one d_in·d_out layer a run of collapse_linear_chain pairs folds to."""
    dims = {}  # layer -> (d_in, d_out)
    for c, (first, second) in run:
        dims[first], dims[second] = c.shape[:2], c.shape[1:]
    seconds = {keys[1] for _, keys in run}
    firsts = {keys[0] for _, keys in run}
    head = next(k for k in firsts if k not in seconds)
    tail = next(k for k in seconds if k not in firsts)
    return round(_rows(head, *dims[head], per_node) * dims[head][0] * dims[tail][1])


def _block_after(block: tuple, per_node: dict[str, tuple[str, int]], units: _LinearUnits) -> int | None:
    """MACs a fan-out or split block leaves, from its rule's cost per row (params play no part here) times the
    rows its first layer (its first linear node) computes; None where a split's linear units cannot be told."""
    c, keys = block
    d_in, hidden, d_out = c.shape
    if c.rule == "collapse_fan_out":  # shape's d_out is the heads' Σd_i
        per_row = fan_out_cost(d_in, hidden, [d_out], 0, 0, 0).macs_after
    else:
        linear = units.count(c.names, c.slope_range, c.graph)
        if linear is None:
            return None
        per_row = split_cost(d_in, hidden, d_out, hidden - linear, 0, 0, bias_in=False, bias_out=False).macs_after
    return round(_rows(keys[0], d_in, hidden, per_node) * per_row)


def row_macs(candidates: list, model: onnx.ModelProto, source: Path | None = None) -> list[tuple[int, int] | None]:
    """Per chain among `candidates` (`lc_onnx.inspect`; node rules' single nodes are not chains), its MACs per input
    row before and after the rule that would fire (a chain left as it is: unchanged), as the rules' cost models
    count them; None where its shape is not known, or a split whose linear units cannot be told. `source`: the
    folder of the model's external data."""
    units, out = _LinearUnits(model, source), []
    for c in candidates:
        if c.kind != "chain":
            continue
        if c.shape is None:
            out.append(None)
            continue
        d_in, hidden, d_out = c.shape
        before = hidden * (d_in + d_out)
        if c.rule in ("collapse_linear_chain", "collapse_fan_out"):  # a fan-out's d_out is its heads' sum
            out.append((before, d_in * d_out))
        elif c.rule == "split_linear_units":
            linear = units.count(c.names, c.slope_range, c.graph)
            out.append(None if linear is None else
                       (before, split_cost(d_in, hidden, d_out, hidden - linear, 0, 0, bias_in=False,
                                           bias_out=False).macs_after))
        else:  # left, or drop_unit_activation: the two layers stay
            out.append((before, before))
    return out


class _LinearUnits:
    """How many units of a split block's PRelu the split takes as linear. The candidate gives only their slope
    range (lo, hi): a unit is linear exactly when its slope lies in it, since both ends are within tol of 1 and
    every linear unit's slope is between them. The slopes are read as the chain match reads them (flat, float64,
    through Identity, Cast, Transpose of a constant); the model is imported once, at the first split."""

    def __init__(self, model: onnx.ModelProto, source: Path | None):
        self.model, self.source, self.nodes = model, source, None

    def count(self, names: list[str], slope_range: tuple[float, float], graph: str = "") -> int | None:
        """The linear units of the split block of nodes `names` in `graph` (its name as inspect gives it, "" for
        the main graph); None where its PRelu or slopes cannot be had."""
        if self.nodes is None:
            self.nodes = self._by_label()
        acts = [self.nodes[graph, n] for n in names if (graph, n) in self.nodes and self.nodes[graph, n].op == "PRelu"]
        value = const_value(acts[0].inputs[1]) if len(acts) == 1 else None
        if value is None:
            return None
        slopes = np.asarray(value, np.float64).reshape(-1)
        lo, hi = slope_range
        return int(np.count_nonzero((lo <= slopes) & (slopes <= hi)))

    def _by_label(self) -> dict[tuple[str, str], gs.Node]:
        """The nodes of the model's graphs by (graph name as inspect gives it, `node_label`), but for those that
        repeat (names may: legal ONNX)."""
        graph = gs.import_onnx(self.model)
        if self.source is not None:
            io.attach_external(graph, self.source)
        keys = [("" if g is graph else g.name or "subgraph", node_label(n.name, i), n)
                for g in [graph, *graph.subgraphs(recursive=True)] for i, n in enumerate(g.nodes)]
        seen = Counter((gname, label) for gname, label, _ in keys)
        return {(gname, label): n for gname, label, n in keys if seen[gname, label] == 1}


@dataclass
class BenchResult:
    provider: str
    threads: int
    runs: int
    warmup: int
    inputs: dict[str, list[int]]
    models: list[dict] = field(default_factory=list)  # path, median/p10/p90 ms, samples, speedup vs the first
    io_binding: bool = False
    cuda_graph: bool = False
    macs: MacShare | None = None  # of the first model
    # per input: shape, dtype, how drawn, whether --batch set its first dim, the dims guessed and how
    input_details: dict[str, dict] = field(default_factory=dict)
    model_macs: list[MacShare | str | None] = field(default_factory=list)  # per model: its share, or why none
    ort_provider: str = ""  # the provider's name in ONNX Runtime
    versions: dict[str, str] = field(default_factory=dict)
    timestamp: str = ""  # when the timing started, ISO 8601 in UTC
    runtime: str = "onnxruntime"  # or "openvino" (its CPU plugin)
    runtime_version: str = ""
    runtime_options: dict = field(default_factory=dict)  # what the runtime was asked for (OpenVINO: `ov_config`)

    def table(self) -> str:
        first = self.models[0]["median_ms"]
        rows = [("model", "median ms", "p10 ms", "p90 ms", "speedup vs first")]
        rows += [(m["path"], f"{m['median_ms']:.3f}", f"{m['p10_ms']:.3f}", f"{m['p90_ms']:.3f}",
                  f"{first / m['median_ms']:.2f}x") for m in self.models]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
                 for r in rows]
        binding = ", inputs and outputs bound on the device (IOBinding)" if self.io_binding else ""
        binding += ", CUDA graph" if self.cuda_graph else ""
        where = f"{self.provider}{binding}"
        if self.runtime == "openvino":
            where = (f"OpenVINO {self.runtime_version.split('-')[0]} CPU plugin, "
                     f"{self.runtime_options.get('INFERENCE_PRECISION_HINT', 'f32')} inference precision")
        lines.append(f"{where}, {self.threads or 'default'} thread(s), {self.runs} interleaved "
                     f"runs after {self.warmup} warm-up")
        lines += [_input_line(k, self.input_details.get(k, {"shape": v})) for k, v in self.inputs.items()]
        shares = self.model_macs or ([self.macs] if self.macs is not None else [])
        for m, share in zip(self.models, shares, strict=False):
            if isinstance(share, MacShare):
                lines.append(share.line(m["path"]))
            elif share:
                lines.append(f"MACs of {m['path']}: not computed ({share})")
        lines += [f"warning: {w}" for w in self.warnings()]
        return "\n".join(lines)

    def guessed(self) -> list[str]:
        """The warning that bench guessed input dims (none where it guessed none)."""
        guessed = [f"{k} {_dim_label(d, i)} = {self.inputs[k][i]}" for k, d in self.input_details.items()
                   for i in d.get("guessed", [])]
        if not guessed:
            return []
        first = any(0 in d.get("guessed", []) for d in self.input_details.values())
        return [f"open dims guessed, so the latency is at sizes lc-onnx chose: {', '.join(guessed)}; set them "
                f"with --input-shape NAME:D1,D2,.." + (" (or the first dim with --batch N)" if first else "")]

    def warnings(self) -> list[str]:
        """What the numbers do not show: input dims bench guessed, and speedups within the models' spread."""
        out = self.guessed()
        ref = self.models[0] if self.models else None
        for m in self.models[1:]:
            apart = abs(ref["median_ms"] - m["median_ms"])
            spread = [ref["p90_ms"] - ref["p10_ms"], m["p90_ms"] - m["p10_ms"]]
            if max(spread) > apart:
                out.append(f"the speedup of {m['path']} ({ref['median_ms'] / m['median_ms']:.2f}x) is not resolved: "
                           f"the medians are {apart:.3f} ms apart, less than the p10-p90 spread ({spread[0]:.3f} ms "
                           f"of {ref['path']}, {spread[1]:.3f} ms of {m['path']}); time on a quieter machine, or "
                           f"look at the distributions (--plot)")
        return out

    def to_json(self) -> str:
        data = asdict(self)
        data["macs"] = self.macs.to_dict() if self.macs is not None else None
        del data["model_macs"]
        for entry, share in zip(data["models"], self.model_macs, strict=False):
            entry["macs"] = share.to_dict() if isinstance(share, MacShare) else None
            if isinstance(share, str):
                entry["macs_error"] = share
        data["warnings"] = self.warnings()
        return json.dumps(data, indent=2) + "\n"


def _dim_label(details: dict, i: int) -> str:
    """`dim 1 (sequence)`: a dim by its place, and its declared name where it has one."""
    names = details.get("dim_names") or []
    return f"dim {i}" + (f" ({names[i]})" if i < len(names) and names[i] else "")


def _input_line(name: str, d: dict) -> str:
    """One input as bench fed it: `input x: [4, 3, 8] float32, N(0, 1); dim 0 = 4 from --batch; ...`."""
    drawn = "given with --inputs" if d.get("drawn") == "given" else d.get("drawn", "")
    text = f"input {name}: {list(d['shape'])}" + "".join(f" {x}" for x in [d.get("dtype")] if x) + \
        (f", {drawn}" if drawn else "")
    if d.get("batch"):
        text += f"; {_dim_label(d, 0)} = {d['shape'][0]} from --batch"
    by_source: dict[str, list[str]] = {}  # "alike": {dim: the input the caller sized whose dim has the same name}
    for i, src in d.get("alike", {}).items():
        by_source.setdefault(src, []).append(f"{_dim_label(d, int(i))} = {d['shape'][int(i)]}")
    text += "".join(f"; {', '.join(dims)} from {src} (same dim name)" for src, dims in by_source.items())
    if d.get("guessed"):
        dims = ", ".join(f"{_dim_label(d, i)} = {d['shape'][i]}" for i in d["guessed"])
        text += f"; guessed {dims} ({d.get('why') or 'open dims ' + str(pins.DEFAULT)})"
    return text


def pinned(path: Path, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The model at `path` with its inputs' dims fixed to `shapes`. A captured CUDA graph replays fixed shapes
    anyway; fixed, ONNX Runtime folds the Shape -> Gather -> Concat subgraphs that compute reshape targets from
    open dims. Left open, those run on the CPU and feed CUDA nodes through Memcpy, and ORT refuses to capture."""
    model, _ = io.read(path)
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        ttype, want = vi.type.tensor_type, shapes[vi.name]
        if ttype.HasField("shape") and len(ttype.shape.dim) != len(want):
            raise InputError(f"{path}: input {vi.name!r} has rank {len(ttype.shape.dim)}, not the {len(want)} of "
                             f"the shape it is fed {want}")
        _declare(vi, want)
    return model


def _declare(vi: onnx.ValueInfoProto, dims: list[int]) -> None:
    """The tensor's declared shape set to `dims`, also where none was declared (rank unknown)."""
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


def check_options(provider_name: str = "cpu", threads: int = 0, batch: int | None = None, runs: int = 50,
                  warmup: int = 10, seed: int = 0, cuda_graph: bool = False, runtime: str = "onnxruntime",
                  io_binding: bool = False, ov_precision: str | None = None) -> None:
    """InputError for options `bench_files` cannot take; the CLI asks before any work (reading the models). With
    `runtime="openvino"`, also where OpenVINO cannot be imported."""
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime}: one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        onnxruntime_only = [name for name, on in (("--provider cuda", provider_name == "cuda"),
                                                  ("--io-binding", io_binding), ("--cuda-graph", cuda_graph)) if on]
        if onnxruntime_only:
            raise InputError(f"{', '.join(onnxruntime_only)}: ONNX Runtime's, not OpenVINO's (--runtime openvino "
                             f"times OpenVINO's CPU plugin); leave {'it' if len(onnxruntime_only) == 1 else 'them'} "
                             f"out, or use --runtime onnxruntime")
        if ov_precision is not None and ov_precision not in OV_PRECISIONS:
            raise InputError(f"--ov-precision {ov_precision}: one of {', '.join(OV_PRECISIONS)}")
    elif ov_precision is not None:
        raise InputError("--ov-precision is OpenVINO's inference precision: it needs --runtime openvino")
    if runs < 1 or warmup < 0:
        raise InputError("--runs must be at least 1 and --warmup at least 0")
    if batch is not None and batch < 1:
        raise InputError(f"--batch {batch}: must be at least 1")
    if threads < 0:
        raise InputError(f"--threads {threads}: must be at least 0")
    check_seed(seed)
    if cuda_graph and provider_name != "cuda":
        raise InputError(f"--cuda-graph needs --provider cuda (ONNX Runtime captures CUDA graphs only there), "
                         f"not {provider_name}")
    if runtime == "openvino":
        openvino()  # installed: said before any model is read or timed


def bench_files(
    paths: list[Path],
    provider_name: str = "cpu",
    threads: int = 0,
    batch: int | None = None,
    runs: int = 50,
    warmup: int = 10,
    shapes: dict[str, list[int]] | None = None,
    given: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    io_binding: bool = False,
    cuda_graph: bool = False,
    candidates: list | None = None,
    model_candidates: list[list | str] | None = None,
    runtime: str = "onnxruntime",
    ov_precision: str | None = None,
) -> BenchResult:
    """Latency of model files on the same inputs, interleaved; the first model is the reference. With
    `cuda_graph` (CUDA only; implies `io_binding`) ONNX Runtime captures each model's run as a CUDA graph and
    replays it. With `candidates` (`lc_onnx.inspect` of the first model) the result carries its MAC share; with
    `model_candidates` (per model: its `lc_onnx.inspect`, or a string saying why there is none) every model's.
    With `runtime="openvino"` the models run in OpenVINO's CPU plugin at `ov_precision` (default f32)."""
    check_options(provider_name, threads, batch, runs, warmup, seed, cuda_graph, runtime, io_binding, ov_precision)
    full = provider(provider_name) if runtime == "onnxruntime" else ""
    precision = ov_precision or "f32"
    heads = [io.read(p, load_weights=False)[0] for p in paths]
    names = [sorted(i.name for i in h.graph.input if i.name not in {t.name for t in h.graph.initializer})
             for h in heads]
    for p, n in zip(paths[1:], names[1:], strict=True):
        if n != names[0]:
            raise InputError(f"{p} has inputs {n}, {paths[0]} has {names[0]}: they cannot share inputs")
    wanted, where = feed_shapes(heads[0], batch, shapes, given)
    feeds, drawn = draw_inputs(heads[0], wanted, given, seed)
    shapes_used = {k: list(v.shape) for k, v in feeds.items()}
    details = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "drawn": drawn.get(k, ""),
                   **where.get(k, {"batch": False, "guessed": [], "alike": {}, "why": "", "dim_names": []})}
               for k, v in feeds.items()}
    if model_candidates is None:
        model_candidates = [] if candidates is None else [candidates]
    shares: list[MacShare | str | None] = []
    for p, head, found in zip(paths, heads, model_candidates, strict=False):
        if isinstance(found, str) or found is None:
            shares.append(found)
            continue
        folder = Path(p).parent.resolve() if io.has_external(head) else None
        shares.append(mac_share(head, shapes_used, found, feeds, folder))
    del heads
    entry = (full, {"enable_cuda_graph": "1"}) if cuda_graph else full
    models = [pinned(p, shapes_used) for p in paths] if cuda_graph else list(paths)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lat = interleaved(models, feeds, runs, warmup, threads, [entry] if full else None, progress,
                      io_binding or cuda_graph, given=[k for k, what in drawn.items() if what == "given"],
                      names=[str(p) for p in paths], runtime=runtime, ov_precision=precision)
    stack = versions(runtime)
    result = BenchResult(provider_name, threads, runs, warmup, shapes_used, io_binding=io_binding or cuda_graph,
                         cuda_graph=cuda_graph, macs=shares[0] if shares and isinstance(shares[0], MacShare) else None,
                         input_details=details, model_macs=shares, ort_provider=full, versions=stack,
                         timestamp=started, runtime=runtime, runtime_version=stack[runtime],
                         runtime_options=ov_config(threads, precision) if runtime == "openvino" else {})
    for p, latency in zip(paths, lat, strict=True):
        entry = {"path": str(p), **asdict(latency)}
        entry["speedup_vs_first"] = lat[0].median_ms / latency.median_ms
        result.models.append(entry)
    return result


def versions(runtime: str = "onnxruntime") -> dict[str, str]:
    """The versions a benchmark's numbers depend on, as its JSON records them (OpenVINO's where it timed)."""
    import lc_onnx

    found = {"lc-onnx": lc_onnx.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
             "numpy": np.__version__, "python": platform.python_version()}
    if runtime == "openvino":
        found["openvino"] = openvino().__version__
    return found

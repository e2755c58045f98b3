"""A weightless copy of the model, for checking and shape inference at any size, and the ranks it gives."""

from __future__ import annotations

import math

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

SMALL = 64  # initializers up to this many elements are kept: Reshape targets and the like


def _weightless(graph: onnx.GraphProto) -> onnx.GraphProto:
    """The graph with large initializers turned into inputs of the same type and shape."""
    light = onnx.GraphProto(name=graph.name)
    light.node.extend(graph.node)
    light.input.extend(graph.input)
    light.output.extend(graph.output)
    light.value_info.extend(graph.value_info)
    known = {i.name for i in graph.input}
    for t in graph.initializer:
        if math.prod(t.dims) <= SMALL and t.data_location != onnx.TensorProto.EXTERNAL:
            light.initializer.append(t)
        elif t.name not in known:
            light.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def graphs(graph: onnx.GraphProto):
    """The graph and every subgraph of its control-flow nodes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                yield from graphs(g)


def _collect(graph: onnx.GraphProto) -> dict[str, tuple[int, list]]:
    found = {}
    for g in graphs(graph):
        for vi in list(g.value_info) + list(g.output) + list(g.input):
            dims = _dims(vi)
            if dims is not None:
                found[vi.name] = (vi.type.tensor_type.elem_type, dims)
    return found


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights: cheap to check and to run shape inference on, at any size."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.CopyFrom(_weightless(model.graph))
    return light


def infer(light: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """name -> (ONNX elem type, dims) for every tensor shape inference can tell; {} when it fails. ONNX's own
    inference first; where it leaves a layer's or an activation's input without a rank (it skips the com.microsoft
    ops of ONNX Runtime's transformers optimizer: Attention, SkipLayerNormalization, ...), ONNX Runtime's symbolic
    inference fills the gaps. Plain models never reach it, so they pay nothing for it."""
    try:
        found = _collect(onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True).graph)
    except Exception:  # inference is a help, not a requirement: rewrites then need ranks the graph states
        found = {}
    if unranked(light, found):
        found = merge(found, infer_ort(light))
    return found


ORT_PASSES = 16  # passes of ONNX Runtime's symbolic inference at most (it repeats one after merging dims)
RANKED_OPS = ("Gemm", "MatMul", "Conv", "PRelu", "LeakyRelu")  # whose first input's rank a rule needs


def unranked(light: onnx.ModelProto, found: dict[str, tuple[int, list]]) -> list[str]:
    """The inputs of layers and activations (in any graph) whose rank neither the model nor `found` states."""
    missing = []
    for g in graphs(light.graph):
        stated = {t.name for t in g.initializer} | {vi.name for vi in g.input if _dims(vi) is not None}
        for node in g.node:
            if node.op_type in RANKED_OPS and node.input and node.input[0] not in found and node.input[0] not in stated:
                missing.append(node.input[0])
    return missing


def infer_ort(light: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """What ONNX Runtime's symbolic shape inference (which knows its contrib ops) tells, as far as it gets; {} when
    onnxruntime is not installed or the inference fails. Its loop is run here rather than through `infer_shapes`,
    which saves the model to the working directory when it stops early."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank
        inference._preprocess(_sliced_shapes(light))
        for _ in range(ORT_PASSES):  # it passes again after merging symbolic dims; where it stops at a node it
            if not inference.run_:  # cannot tell, what it found before that node still holds
                break
            inference._infer_impl()
        return _collect(inference.out_mp_.graph)
    except Exception:  # ImportError (no onnxruntime, no sympy), or any failure of the inference itself
        return {}


def _sliced_shapes(light: onnx.ModelProto) -> onnx.ModelProto:
    """`light`, or a copy with each `Shape(start, end)` written as `Slice(Shape(x))`: ONNX Runtime's symbolic
    inference read such a Shape as the whole shape up to some version (1.32 reads it right; the project allows 1.17,
    see microsoft/onnxruntime#28075), which gives a Reshape target built from it, and the Reshape's rank, wrongly."""
    def partial(n: onnx.NodeProto) -> bool:
        return n.op_type == "Shape" and n.domain in ("", "ai.onnx") and any(
            a.name == "end" or (a.name == "start" and a.i != 0) for a in n.attribute)

    if not any(partial(n) for g in graphs(light.graph) for n in g.node):
        return light
    model = onnx.ModelProto()
    model.CopyFrom(light)
    for g in graphs(model.graph):
        nodes = []
        for n in g.node:
            if not partial(n):
                nodes.append(n)
                continue
            attrs = {a.name: a.i for a in n.attribute}
            full, out = n.output[0] + "__whole_shape", n.output[0]
            ends = (("start", attrs.get("start", 0)), ("end", attrs.get("end", 2**62)))
            bounds = [(f"{out}__{k}", v) for k, v in ends]
            nodes += [helper.make_node("Shape", [n.input[0]], [full])]
            nodes += [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64,
                                                                                       [1], [v])) for name, v in bounds]
            nodes += [helper.make_node("Slice", [full, bounds[0][0], bounds[1][0]], [out])]
        g.ClearField("node")
        g.node.extend(nodes)
    return model


def merge(first: dict[str, tuple[int, list]], then: dict[str, tuple[int, list]]) -> dict[str, tuple[int, list]]:
    """`first`, with `then` filling its gaps: tensors it lacks, and dims it leaves open where both agree on rank."""
    merged = dict(then)
    for name, (elem, dims) in first.items():
        other = then.get(name)
        if other is not None and len(other[1]) == len(dims):
            dims = [d if d is not None else o for d, o in zip(dims, other[1], strict=True)]
        merged[name] = (elem or (other[0] if other else 0), dims)
    return merged


def annotate(graph: gs.Graph, shapes: dict[str, tuple[int, list]]) -> list[tuple[gs.Variable, object]]:
    """Give each intermediate tensor whose shape the graph leaves open the inferred one (graph inputs and
    outputs keep what the model declares). Returns (tensor, its dtype before) for `unannotate`."""
    changed = []
    for g in [graph, *graph.subgraphs(recursive=True)]:
        interface = {t.name for t in g.inputs + g.outputs}
        for tensor in g.tensors().values():
            if (isinstance(tensor, gs.Variable) and tensor.shape is None and tensor.name in shapes
                    and tensor.name not in interface):
                changed.append((tensor, tensor.dtype))
                elem, dims = shapes[tensor.name]
                tensor.shape = dims
                if tensor.dtype is None and elem:
                    tensor.dtype = helper.tensor_dtype_to_np_dtype(elem)
    return changed


def unannotate(changed: list[tuple[gs.Variable, object]]) -> None:
    """Take the inferred shapes off again before export: value_info the model did not have changes which
    fusions ONNX Runtime applies (a shape-aware fusion can pick a slower kernel), so the output keeps the
    input's own shape information."""
    for tensor, dtype in changed:
        tensor.shape, tensor.dtype = None, dtype

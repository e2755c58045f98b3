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
    """name -> (ONNX elem type, dims) for every tensor shape inference can tell; {} when it fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, not a requirement: rewrites then need ranks the graph states
        return {}
    return _collect(inferred.graph)


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

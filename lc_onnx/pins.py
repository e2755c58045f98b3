"""The sizes a graph pins for its open input dims, so that default validation inputs run: a Conv's input channels,
the image a ViT's position table fits, an attention mask over past and new tokens, dims named alike."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFAULT = 2  # an open dim nothing pins
SMALL = 64  # values up to this many elements are evaluated (shape tensors)
BUDGET = 64  # nodes evaluated at most for one shape
STANDARD = ("", "ai.onnx")
# elementwise ops a pixel input passes through before its first Conv (dtype cast, mean/std normalisation)
NORMALISE = ("Cast", "Identity", "Sub", "Div", "Mul", "Add")
# ops a Conv's patches pass through on their way to the position table
TO_TOKENS = ("Reshape", "Flatten", "Transpose", "Concat", "Identity", "Cast", "Squeeze", "Unsqueeze")
EXTRA_TOKENS = 4  # tokens besides the patches a position table may cover (cls, distillation, registers)
PAST = re.compile(r"past_key_values\.\d+\.(key|value)")  # optimum's decoder-only names (not .encoder./.decoder.)


def _declared(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


class _Graph:
    """The main graph's nodes by the tensors they write and read, its constants, and its inputs."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in STANDARD and n.attribute and n.attribute[0].name == "value":
                self.inits[n.output[0]] = n.attribute[0].t
        held = {t.name for t in g.initializer}
        self.inputs = {vi.name: vi for vi in g.input if vi.name not in held}

    def dims(self, name: str) -> list[int] | None:
        t = self.inits.get(name)
        return None if t is None else list(t.dims)

    def value(self, name: str) -> np.ndarray | None:
        """A small constant's value (not one held in external data)."""
        t = self.inits.get(name)
        if t is None or math.prod(t.dims) > SMALL or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)


class _Static:
    """Shapes and small values of tensors once the inputs' shapes are set, where constants decide them: ONNX's own
    shape inference one node at a time (with the shape tensors it reads evaluated, which ONNX's data propagation
    does not do through Where or Equal), and only for the nodes asked about."""

    def __init__(self, graph: _Graph, shapes: dict[str, list[int]]):
        self.g, self.shapes = graph, shapes
        self.known: dict[str, tuple[int, list[int]] | None] = {}
        self.values: dict[str, np.ndarray | None] = {}
        self.budget = BUDGET

    def info(self, name: str) -> tuple[int, list[int]] | None:
        """(elem type, dims) of tensor `name`, or None where not every dim is decided."""
        if name not in self.known:
            self.known[name] = None  # a cycle (no valid graph has one) ends here
            self.known[name] = self._info(name)
        return self.known[name]

    def _info(self, name: str) -> tuple[int, list[int]] | None:
        if name in self.g.inits:
            return self.g.inits[name].data_type, self.g.dims(name)
        if name in self.g.inputs:
            vi = self.g.inputs[name]
            return (vi.type.tensor_type.elem_type, list(self.shapes[name])) if name in self.shapes else None
        node = self.g.producer.get(name)
        if node is None or node.domain not in STANDARD or self.budget <= 0:
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        self.budget -= 1
        ins, inits = [], []
        for i in node.input:
            if not i:
                continue
            info = self.info(i)
            if info is None:
                return None
            v = self.value(i)
            if v is not None:
                inits.append(numpy_helper.from_array(v, i))
            else:
                ins.append(helper.make_tensor_value_info(i, *info))
        outs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
        one = helper.make_model(helper.make_graph([node], "one", ins, outs, inits),
                                opset_imports=self.g.model.opset_import, ir_version=self.g.model.ir_version)
        try:
            done = onnx.shape_inference.infer_shapes(one, strict_mode=True)
        except Exception:  # a node inference rejects pins nothing
            return None
        for vi in list(done.graph.output) + list(done.graph.value_info):
            if vi.name == name:
                dims = _declared(vi)
                if dims is not None and all(isinstance(d, int) for d in dims):
                    return vi.type.tensor_type.elem_type, dims
        return None

    def value(self, name: str) -> np.ndarray | None:
        """The value of a small tensor that constants and the inputs' shapes decide (a Reshape or Expand target)."""
        if name not in self.values:
            self.values[name] = None
            self.values[name] = self._value(name)
        return self.values[name]

    def _value(self, name: str) -> np.ndarray | None:
        if name in self.g.inits:
            return self.g.value(name)
        node = self.g.producer.get(name)
        if node is None or node.domain not in STANDARD or len(node.output) != 1:
            return None
        if node.op_type == "Shape":
            info = self.info(node.input[0])
            if info is None:
                return None
            attrs = {a.name: a.i for a in node.attribute}
            return np.array(info[1], np.int64)[attrs.get("start", 0):attrs.get("end", len(info[1]))]
        if node.op_type not in ("Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape", "ConstantOfShape",
                                "Mul", "Add", "Sub", "Div", "Equal", "Where", "Cast", "Identity", "Range", "Expand",
                                "Neg", "Abs", "Max", "Min", "Floor", "Ceil", "ReduceProd"):
            return None
        info = self.info(name)
        feeds = {i: self.value(i) for i in node.input if i}
        if info is None or math.prod(info[1]) > SMALL or any(v is None for v in feeds.values()):
            return None
        from onnx.reference import ReferenceEvaluator

        ins = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
               for i, v in feeds.items()]
        one = helper.make_model(helper.make_graph([node], "one", ins, [helper.make_tensor_value_info(name, *info)]),
                                opset_imports=self.g.model.opset_import, ir_version=self.g.model.ir_version)
        try:
            return np.asarray(ReferenceEvaluator(one).run(None, feeds)[0])
        except Exception:
            return None


def _first_conv(g: _Graph, name: str) -> onnx.NodeProto | None:
    """The Conv that reads input `name` as its data, directly or through normalisation (Cast, Sub/Div by
    constants); None where there is none, or more than one."""
    found, todo, seen = [], [name], set()
    while todo and len(seen) < 16:
        t = todo.pop()
        for n in g.readers.get(t, []):
            if id(n) in seen or n.domain not in STANDARD:
                continue
            seen.add(id(n))
            if n.op_type in ("Conv", "ConvTranspose") and n.input[0] == t:
                found.append(n)
            elif n.op_type in NORMALISE and all(i == t or i in g.inits for i in n.input):
                todo.append(n.output[0])
    return found[0] if len(found) == 1 and found[0].op_type == "Conv" else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _channels(g: _Graph, conv: onnx.NodeProto, name: str, draft: dict[str, list[int]], open_: list[bool]) -> str | None:
    """Set the channels (dim 1) of a Conv's input from its weight: dim 1 × group."""
    shape = draft[name]
    w = g.dims(conv.input[1]) if len(conv.input) > 1 else None
    if not w or len(w) != len(shape) or len(shape) < 3 or not open_[1]:
        return None
    shape[1], open_[1] = w[1] * int(_attr(conv, "group", 1)), False
    return f"{shape[1]} channels from the weight of Conv {conv.name!r}"


def _patch_grid(g: _Graph, conv: onnx.NodeProto, name: str, draft: dict[str, list[int]],
                open_: list[bool]) -> str | None:
    """Set the image size a position table fixes (ViT): a Conv with kernel = stride = P whose patches reach an Add
    of a constant table; H = W = P·s where the table's rows are s² patches (and up to a few more tokens), proven
    by the shapes: at P·s the Add's operands fit each other and at P·(s + 1) they do not."""
    shape = draft[name]
    spatial = len(shape) - 2
    w = g.dims(conv.input[1]) if len(conv.input) > 1 else None
    if spatial < 1 or not all(open_[2:]) or not w or len(w) != len(shape):
        return None
    kernel = list(_attr(conv, "kernel_shape", w[2:]))
    if (list(_attr(conv, "strides", [1] * spatial)) != kernel or any(_attr(conv, "pads", [0] * 2 * spatial))
            or any(d != 1 for d in _attr(conv, "dilations", [1] * spatial))
            or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")):
        return None
    found = _table_add(g, conv.output[0])
    if found is None:
        return None
    add, x, table = found
    rows = g.dims(table)

    def tokens(side: int) -> list[int] | bool | None:
        """The Add operand's shape at image side P·side, aligned to the table's rank, where it fits the table (as
        the table is: the operand may broadcast, the table may not); False where it does not; None: not known."""
        got = _Static(g, {**draft, name: shape[:2] + [p * side for p in kernel]}).info(x)
        if got is None:
            return None
        if len(got[1]) > len(rows):
            return False
        have = [1] * (len(rows) - len(got[1])) + got[1]
        return have if all(a == b or b == 1 for a, b in zip(have, rows, strict=True)) else False

    tried = set()
    for extra in range(EXTRA_TOKENS + 1):
        for r in rows:
            side = math.isqrt(max(r - extra, 0))
            if side < 1 or side ** spatial != r - extra or side in tried:
                continue
            tried.add(side)
            fit = tokens(side)
            if not fit or tokens(side + 1) is not False:
                continue
            shape[2:] = [p * side for p in kernel]
            open_[2:] = [False] * spatial
            axis = next((i for i, (a, b) in enumerate(zip(fit, rows, strict=True)) if a == b > 1), None)
            more = rows[axis] - side ** spatial if axis is not None else 0
            size, patch = "x".join(map(str, shape[2:])), "x".join(map(str, kernel))
            return (f"{size} from position table {table!r} of Add {add.name!r}: {side ** spatial} patches of "
                    f"{patch}" + (f" + {more} token(s)" if more else "")
                    + (f" fill its {rows[axis]} rows" if axis is not None else ""))
    return None


def _table_add(g: _Graph, start: str) -> tuple[onnx.NodeProto, str, str] | None:
    """The first Add that the Conv output `start` reaches through token reshaping, with its other operand a
    constant table of rank ≥ 2: (the Add, its operand from `start`, the table)."""
    t = start
    for _ in range(8):
        readers = [n for n in g.readers.get(t, []) if n.op_type != "Shape"]  # Shape: a Reshape's target
        if len(readers) != 1 or readers[0].domain not in STANDARD:
            return None
        n = readers[0]
        if n.op_type == "Add" and len(n.input) == 2:
            other = n.input[1] if n.input[0] == t else n.input[0]
            dims = g.dims(other)
            return (n, t, other) if dims and len(dims) >= 2 else None
        if n.op_type not in TO_TOKENS:
            return None
        t = n.output[0]
    return None


def _mask(g: _Graph, draft: dict[str, list[int]], opened: dict[str, list[bool]]) -> str | None:
    """An `attention_mask` beside `past_key_values.N.key/value` (optimum's names for a decoder with past) covers the
    past and the new tokens: its length is the past length plus input_ids' length. The past axis is the one a
    Concat of the past with the new keys joins along (read from the graph), else the dim named like past."""
    mask, ids = "attention_mask", "input_ids"
    if mask not in opened or len(opened[mask]) != 2 or not opened[mask][1] or len(draft.get(ids, [])) != 2:
        return None
    for name in sorted(n for n in draft if PAST.fullmatch(n) and n in g.inputs):
        rank = len(draft[name])
        axes = [int(_attr(n, "axis", 0)) % rank for n in g.readers.get(name, [])
                if n.op_type == "Concat" and n.domain in STANDARD and n.input and n.input[0] == name]
        how = "the axis a Concat of it with the new tokens joins along"
        if not axes:
            named = [i for i, d in enumerate(_declared(g.inputs[name]) or []) if isinstance(d, str) and "past" in d]
            axes, how = named, "its dim named like past"
        if len(set(axes)) != 1:
            continue
        past, new = draft[name][axes[0]], draft[ids][1]
        draft[mask][1], opened[mask][1] = past + new, False
        return (f"length {past + new}: {name}'s past length {past} ({how}, axis {axes[0]}) + {ids}' "
                f"length {new}")
    return None


def guess_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None,
                 given: dict[str, np.ndarray] | None = None) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The shape of every input with open dims that neither `shapes` nor `given` sets, and where its dims came
    from: a dim named like one that `shapes` or `given` sets takes that value; a Conv's input gets the weight's
    channels (dim 1 × group) and, for a ViT's patch Conv, the image its position table fits; `attention_mask`
    beside `past_key_values` covers past and new tokens; any other open dim is 2."""
    shapes, given = shapes or {}, given or {}
    g = _Graph(model)
    draft = {**{k: list(v) for k, v in shapes.items()}, **{k: list(np.shape(v)) for k, v in given.items()}}
    named: dict[str, int] = {}  # dim names -> the sizes the caller set for them
    for name in [n for n in g.inputs if n in draft]:  # in graph order: the first input naming a dim sets it
        dims = _declared(g.inputs[name]) or []
        if len(dims) == len(draft[name]):
            for d, v in zip(dims, draft[name], strict=True):
                if isinstance(d, str):
                    named.setdefault(d, v)
    why: dict[str, list[str]] = {}
    opened: dict[str, list[bool]] = {}  # dims still at the default
    for name, vi in g.inputs.items():
        dims = _declared(vi)
        if name in draft or dims is None or all(isinstance(d, int) for d in dims):
            continue
        draft[name] = [d if isinstance(d, int) else named.get(d, DEFAULT) for d in dims]
        opened[name] = [not isinstance(d, int) and d not in named for d in dims]
        why[name] = [f"{d} = {named[d]} as given" for d in dict.fromkeys(dims) if isinstance(d, str) and d in named]
    for name in list(opened):
        conv = _first_conv(g, name)
        if conv is not None:
            why[name] += [w for rule in (_channels, _patch_grid) if (w := rule(g, conv, name, draft, opened[name]))]
    line = _mask(g, draft, opened)
    if line:
        why["attention_mask"].append(line)
    for name, still in opened.items():
        if any(still):
            why[name].append(f"{'other ' if why[name] else ''}open dims {DEFAULT}")
    return {k: draft[k] for k in opened}, {k: "; ".join(v) for k, v in why.items()}


def guess_line(shapes: dict[str, list[int]], why: dict[str, str]) -> str:
    """One line naming the shapes drawn for inputs with open dims, as Polygraphy prints them."""
    return ("validation inputs with open dims drawn as " + ", ".join(f"{k} {v} ({why[k]})" for k, v in shapes.items())
            + "; set others with --input-shape or give data with --inputs")

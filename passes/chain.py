"""Match `linear → (Identity|Dropout|Reshape)* → [PRelu|LeakyRelu] → (…)* → linear` ending at a node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes import budget
from passes.cost import ChainCost, chain_cost
from passes.linear import LinearLayer, fold_input_batchnorm, read_linear_ending_at, read_linear_starting_at
from passes.match import (
    channel_slope_problem,
    const_value,
    inference_batchnorm,
    is_const,
    is_default,
    is_explicit_shape,
    is_inference_dropout,
    is_op,
    only_feeds,
    producer,
    rank_of,
    redirect_readers,
    reshape_last_dim,
    slope_problem,
    why_default,
)

LAYER_OPS = ("Gemm", "MatMul", "Conv")
MAX_WALK = 16  # nodes between two layers; real exports have at most a handful
# elementwise ops an exported activation is written with (Gelu's erf and tanh forms, x·Sigmoid(x) for Swish)
ELEMENTWISE = ("Relu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish", "Tanh", "Erf", "Softplus", "Mish",
               "Elu", "Selu", "Celu", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt")
NOT_LINEAR = "activation {} is not linear; fine-tune with lc_onnx.train to make it collapsible"


@dataclass
class Chain:
    """Two linear layers joined by nodes that are (nearly) the identity."""

    first: LinearLayer
    second: LinearLayer
    between: list[gs.Node]  # in graph order, activation included
    activation: gs.Node | None
    slopes: np.ndarray | None  # float64 slope values of the activation
    # Shape nodes outside the chain that read a chain tensor, with a surviving tensor holding that shape
    shape_readers: list[tuple[gs.Node, gs.Tensor]] = field(default_factory=list)
    folded: tuple[np.ndarray, np.ndarray | None] | None = None  # the fused weight and bias, once computed
    # the mixed layout (ONNX Runtime's GPT-2: a 3-D MatMul+Add, then Reshape(-1, h) and a Gemm): that Reshape, and a
    # tensor, made only when the chain is rewritten, holding the hidden tensor's shape before it for Shape readers
    flatten: gs.Node | None = None
    hidden_shape: gs.Variable | None = None

    @property
    def names(self) -> list[str]:
        return self.first.names + [n.name for n in self.between] + self.second.names

    @property
    def nodes(self) -> list[gs.Node]:
        return self.first.nodes + self.between + self.second.nodes

    def load(self) -> str | None:
        """Read both weights (a rule is about to use them); why they cannot be used, or None."""
        return self.first.load() or self.second.load()

    def rewire_shape_readers(self, graph: gs.Graph | None = None, names=None) -> None:
        """Point the Shape readers at their surviving tensors, so the chain's nodes can die. In the mixed layout
        a reader of the hidden tensor before the flatten gets `Concat(Shape(x)[:-1], [h])`, written into `graph`."""
        for reader, shape in self.shape_readers:
            if shape is self.hidden_shape and not shape.inputs:
                write_hidden_shape(graph, names, self.first, shape)
            for out in reader.outputs:
                redirect_readers(out, shape)

    @property
    def slope_range(self) -> tuple[float, float] | None:
        return None if self.slopes is None else (float(self.slopes.min()), float(self.slopes.max()))

    @property
    def cost(self) -> ChainCost:
        has_bias = self.first.bias is not None or self.second.bias is not None
        params = self.first.params + self.second.params
        return chain_cost(self.first.d_in, self.first.d_out, self.second.d_out, params, has_bias)

    @property
    def error_coefficient(self) -> float:
        """c with ‖error per row‖ ≤ c·‖min(0, h)‖, from `W_B·(α−1)·min(0, h)` (Frobenius ≥ spectral norm)."""
        if self.slopes is None:
            return 0.0
        return float(np.abs(1.0 - self.slopes).max() * self.second.frobenius)


@dataclass
class Reject:
    """A candidate chain that may not be collapsed, and why."""

    nodes: list[gs.Node]
    reason: str
    slope_range: tuple[float, float] | None = None
    shape: tuple[int, int, int] | None = None  # d_in, hidden, d_out where both layers could be read
    # a block whose only obstacle is its activation (non-linear, or a slope outside tol): (the node reading the
    # activation's output, that output, the activation's input) — what `what_if` rewires to see it at slope 1
    linearize: tuple[gs.Node, gs.Tensor, gs.Tensor] | None = None

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _passes_through(node: gs.Node, graph_outputs: set[str]) -> bool:
    """A node a chain sees through between its layers (besides its one activation)."""
    return is_op(node, "Identity", "Reshape") or is_inference_dropout(node, graph_outputs)


def _slopes(act: gs.Node) -> np.ndarray | str:
    """The slope values, flat, in float64."""
    if is_op(act, "LeakyRelu"):
        return np.array([float(act.attrs.get("alpha", 0.01))])
    if is_default(act.inputs[1]):
        return f"slope of {act.name} {why_default(act.inputs[1])}"
    value = const_value(act.inputs[1])
    if value is None:
        return f"slope of {act.name} is not a constant"
    return value.astype(np.float64).reshape(-1) if value.size else np.array([np.nan])


def find_chain(node: gs.Node, graph_outputs: set[str], tol: float) -> Chain | Reject | None:
    """The chain whose second layer starts at `node`; None when `node` starts no candidate chain."""
    if not is_op(node, *LAYER_OPS):
        return None
    between: list[gs.Node] = []
    activation = bn = None
    tensor = node.inputs[0]
    for _ in range(MAX_WALK):
        p = producer(tensor)
        if p is None:
            return None
        if _passes_through(p, graph_outputs):
            pass
        elif is_op(p, "PRelu", "LeakyRelu") and activation is None:
            activation = p
        elif is_op(p, "BatchNormalization") and activation is None and bn is None and p.outputs[0] is tensor:
            bn, at_bn = p, (tensor, list(between))  # after the activation: the second layer's, if one comes
        else:
            break
        between.insert(0, p)
        tensor = p.inputs[0]
    else:
        return None
    if bn is not None and activation is None:  # no activation before it: the first layer's own (or no chain)
        bn, (tensor, between) = None, at_bn

    first = read_linear_ending_at(tensor, graph_outputs)
    if first is None:
        return _nonlinear_block(tensor, between, node, graph_outputs)
    if isinstance(first, str) and activation is None:
        return None
    if isinstance(first, str):
        return Reject(between + [node], first)
    second = read_linear_starting_at(node, graph_outputs)
    if isinstance(second, str) and activation is None and is_op(node, "Conv"):
        return None  # a Conv that is no linear layer (3x3, strided) right after a layer: no candidate
    if isinstance(second, str):
        return Reject(first.nodes + between + [node], second)
    nodes = first.nodes + between + second.nodes
    shape = (first.d_in, first.d_out, second.d_out)

    slopes = None
    if activation is not None:
        slopes = _slopes(activation)
        if isinstance(slopes, str):
            return Reject(nodes, slopes, None, shape)
        if is_op(activation, "PRelu") and first.conv_rank:
            bad_shape = channel_slope_problem(activation, first.d_out, first.conv_rank)
            if bad_shape:
                return Reject(nodes, bad_shape, None, shape)
        elif is_op(activation, "PRelu"):
            reshaped = first.reshape is not None or any(is_op(n, "Reshape")
                                                        for n in between[: between.index(activation)])
            bad_shape = slope_problem(activation, first.d_out, None if reshaped else first.x_rank)
            if bad_shape:
                return Reject(nodes, bad_shape, None, shape)
        srange = (float(np.nanmin(slopes)), float(np.nanmax(slopes))) if np.isfinite(slopes).any() else None
        if not np.isfinite(slopes).all():
            return Reject(nodes, f"slope of {activation.name} holds NaN or inf", srange, shape)
        off = float(np.abs(slopes - 1.0).max())
        if off > budget.tolerance(activation, tol):
            lo, hi = srange
            shown = f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
            after = between[between.index(activation) + 1:] + [node]  # what reads the activation in the chain
            why = budget.REASON if off <= tol else f"slope {shown} is {off:.3g} from 1, outside tolerance {tol:g}"
            return Reject(nodes, why, srange, shape, (after[0], activation.outputs[0], activation.inputs[0]))

    srange = None if slopes is None else (float(slopes.min()), float(slopes.max()))
    flatten = flattening(first, between, second)
    reason = flatten if isinstance(flatten, str) else shape_problem(first, between, second, flatten)
    if bn is not None and not reason:
        reason = _input_batchnorm(bn, first, between, second)
    hidden = gs.Variable("hidden_shape", dtype=np.int64) if isinstance(flatten, gs.Node) else None  # no node yet
    readers = reason or _outside_readers(first, between, second, graph_outputs, flatten, hidden)
    if isinstance(readers, str):
        return Reject(nodes, readers, srange, shape)
    return Chain(first, second, between, activation, slopes, readers, flatten=flatten, hidden_shape=hidden)


def next_layer_node(layer: LinearLayer, graph_outputs: set[str]) -> gs.Node | None:
    """The Gemm/MatMul that `layer` feeds through nodes `find_chain` walks (Shape readers aside); None
    when its output goes anywhere else."""
    tensor = layer.y
    for _ in range(MAX_WALK + 1):
        users = [u for u in tensor.outputs if not is_op(u, "Shape")]
        if tensor.name in graph_outputs or len(users) != 1:
            return None
        user = users[0]
        if is_op(user, *LAYER_OPS):
            return user
        if not (_passes_through(user, graph_outputs) or is_op(user, "PRelu", "LeakyRelu", "BatchNormalization")):
            return None
        tensor = user.outputs[0]
    return None


def shape_problem(first: LinearLayer, between: list[gs.Node], second: LinearLayer,
                  flatten: gs.Node | None = None) -> str | None:
    """Why the layers' shapes may not chain, or None. (PRelu's slope broadcasts one way, to the input's
    shape, so the activation never changes a shape.) `flatten` is the mixed layout's Reshape (`flattening`)."""
    if first.d_out != second.d_in:
        return f"shapes do not chain: {first.d_in}x{first.d_out} then {second.d_in}x{second.d_out}"
    if first.dtype != second.dtype:
        return f"dtypes differ: {first.dtype} then {second.dtype}"
    if first.conv_rank != second.conv_rank:
        kinds = [f"a {layer.conv_rank - 2}-D pointwise Conv" if layer.conv_rank else "a matrix product"
                 for layer in (first, second)]
        return f"{kinds[0]} then {kinds[1]}: the layers map different axes"
    reshaped = any(is_op(n, "Reshape") for n in between) or first.reshape or second.reshape
    if reshaped and first.conv_rank:
        return "a Reshape between two convolutions"
    if reshaped and not (first.x_rank == 2 and second.x_rank == 2) and flatten is None:
        return "a Reshape between the layers, and the layers' inputs are not both known to be 2-D"
    return None


def flattening(first: LinearLayer, between: list[gs.Node], second: LinearLayer) -> gs.Node | str | None:
    """The mixed layout ONNX Runtime's transformers optimizer leaves in GPT-2 (c_fc a 3-D MatMul+Add, c_proj
    `Reshape(-1, h) → Gemm`): the one Reshape between a MatMul layer whose input is not known to be 2-D and a 2-D
    second layer. It flattens only the leading dims: its input is `[..., h]` and its output `[rows, h]` (a
    row-major reshape to that keeps every row), h stated by its target or by shape inference, and where neither
    states it, by the second layer itself (a Gemm's input, or a 2-D MatMul's, is `[rows, d_in]`, d_in = h: the
    model runs only so). None where the layout is another; why not where a stated shape says otherwise."""
    reshapes = [n for n in between if is_op(n, "Reshape")]
    if (len(reshapes) != 1 or first.reshape or second.reshape or first.conv_rank or second.conv_rank
            or first.x_rank == 2 or second.x_rank != 2):
        return None
    node = reshapes[0]
    out = node.outputs[0].shape
    last = reshape_last_dim(node)
    if last is None and out is not None and len(out) == 2 and isinstance(out[-1], int):
        last = out[-1]
    if rank_of(node.outputs[0]) not in (None, 2) or last not in (None, first.d_out):
        rank = f"a {first.x_rank}-D" if first.x_rank else "a rank-unknown"
        return (f"{node.name} between {rank} and a 2-D layer does not flatten its input to [rows, {first.d_out}] "
                f"(its output's shape is stated as {out})")
    return node


def _input_batchnorm(bn: gs.Node, first: LinearLayer, between: list[gs.Node], second: LinearLayer) -> str | None:
    """Fold the BatchNormalization between the activation and the second layer into the second layer's input
    side, or say why it cannot be: it must be in inference form and normalize the features (a Conv's channels,
    a 2-D layer's columns). Exact only because the activation is (within tolerance) the identity."""
    found = inference_batchnorm(bn)
    if isinstance(found, str):
        return found
    reshaped = any(is_op(n, "Reshape") for n in between) or first.reshape or second.reshape
    over_features = second.conv_rank or (first.x_rank == 2 and second.x_rank == 2 and not reshaped)
    if not over_features:
        return f"{bn.name} normalizes axis 1, and the layers' features are not known to lie on it"
    if found[0].size != second.d_in:
        return f"{bn.name} has {found[0].size} channels, the layer after it {second.d_in} input features"
    fold_input_batchnorm(second, *found)
    return None


def _outside_readers(
    first: LinearLayer, between: list[gs.Node], second: LinearLayer, graph_outputs: set[str],
    flatten: gs.Node | None = None, hidden: gs.Variable | None = None,
) -> list[tuple[gs.Node, gs.Tensor]] | str:
    """Nodes outside the chain that read its inner tensors: none may, but a Shape may read one whose shape
    another tensor states (HF GPT-2 takes Reshape targets from Shape(activation)). Returns those Shape
    readers with that tensor, or why the chain's nodes cannot be removed. In the mixed layout the tensors before
    `flatten` have the shape `x.shape[:-1] + [h]`, which `hidden` will hold once written."""
    kept = ancestors(second.reshape.inputs[1]) if second.reshape is not None else set()  # the fused layer keeps
    # the second layer's Reshape target: a Shape that computes it must be rewired, it does not die
    inner = first.internal + [first.y] + [n.outputs[0] for n in between] + second.internal
    before = set()
    if flatten is not None:
        before = {id(t) for t in first.internal + [first.y]}
        before |= {id(n.outputs[0]) for n in between[: between.index(flatten)]}
    return shape_readers(inner, first.nodes + between + second.nodes, first, between, kept, graph_outputs,
                         once=True, unstated=lambda t: hidden if id(t) in before else None)


def shape_readers(inner: list[gs.Tensor], nodes: list[gs.Node], first: LinearLayer, between: list[gs.Node],
                  kept: set[int], graph_outputs: set[str], once: bool,
                  unstated: Callable[[gs.Tensor], gs.Tensor | None] = lambda t: None,
                  ) -> list[tuple[gs.Node, gs.Tensor]] | str:
    """The readers of the `inner` tensors outside `nodes` (a chain, or a block of several heads): none may, but
    a Shape that feeds only `nodes` (and computes no Reshape target in `kept`) dies with them, and one reading a
    tensor whose shape another tensor states (`stated_shape`) is returned with that tensor, to be rewired. Else
    why the nodes cannot be removed; with `once`, also where a tensor feeds `nodes` more than once. `unstated(t)`
    gives a tensor for `t`'s shape where no Reshape target states it (the chain rule's mixed layout)."""
    inside = {id(n) for n in nodes}
    readers = []
    for tensor in inner:
        if tensor.name in graph_outputs:
            return f"{tensor.name} is a graph output"
        users = [c for c in tensor.outputs if id(c) not in inside]
        for user in users:
            if (is_op(user, "Shape") and id(user) not in kept
                    and all(only_feeds(o, nodes, graph_outputs) for o in user.outputs)):
                continue  # computes a target for a Reshape of the nodes: dies with them
            whole = is_op(user, "Shape") and whole_shape(user)
            same = stated_shape(tensor, first, between) if whole else None
            same = unstated(tensor) if whole and same is None else same
            if same is None:
                return f"{tensor.name} also feeds {user.name} ({user.op})"
            readers.append((user, same))
        if once and len(tensor.outputs) - len(users) != 1:
            return f"{tensor.name} feeds the chain more than once"
    return readers


def whole_shape(node: gs.Node) -> bool:
    """A Shape node that gives its input's whole shape (no `start` past 0, no `end`; ONNX Runtime's optimizer
    writes `start=0`)."""
    return int(node.attrs.get("start", 0)) == 0 and "end" not in node.attrs


def write_hidden_shape(graph: gs.Graph, names, first: LinearLayer, out: gs.Variable) -> None:
    """Make `out` hold the shape of `first`'s output, `Concat(Shape(x)[:-1], [h])` (a MatMul keeps the leading
    dims of its input; the bias and the activation change no shape)."""
    base = first.nodes[0].name + "_shape"
    full = gs.Variable(names(f"{base}.input"), dtype=np.int64)  # no shapes: the output states what the input did
    lead = gs.Variable(names(f"{base}.lead"), dtype=np.int64)
    out.name = names(base)

    def const(name: str, value: list[int]) -> gs.Constant:
        return gs.Constant(names(f"{base}.{name}"), np.array(value, dtype=np.int64))

    graph.nodes.extend([
        gs.Node("Shape", names(f"{base}.shape"), inputs=[first.x], outputs=[full]),
        gs.Node("Slice", names(f"{base}.slice"), inputs=[full, const("starts", [0]), const("ends", [-1]),
                                                         const("axes", [0])], outputs=[lead]),
        gs.Node("Concat", names(f"{base}.concat"), attrs={"axis": 0}, inputs=[lead, const("h", [first.d_out])],
                outputs=[out]),
    ])


def ancestors(tensor: gs.Tensor, limit: int = 64) -> set[int]:
    """The ids of the nodes `tensor` is computed from (at most `limit` of them)."""
    found: set[int] = set()
    todo = [tensor]
    while todo and len(found) < limit:
        p = producer(todo.pop())
        if p is not None and id(p) not in found:
            found.add(id(p))
            todo += list(p.inputs)
    return found


def stated_shape(tensor: gs.Tensor, first: LinearLayer, between: list[gs.Node]) -> gs.Tensor | None:
    """A tensor outside the chain holding `tensor`'s shape: the target of the last Reshape before it, when
    that target spells out every dim (nodes after the Reshape are elementwise). That Reshape may be the first
    layer's own (tf2onnx: `MatMul → Reshape → Add`, then the activation)."""
    at = next((i for i, n in enumerate(first.nodes) if n is first.reshape), None)
    after = first.nodes[at:] if at is not None else []
    nodes = after + between
    producers = [n for n in nodes if any(o is tensor for o in n.outputs)]
    if not producers:
        return None
    for node in reversed(nodes[: nodes.index(producers[0]) + 1]):
        if is_op(node, "Reshape"):
            return node.inputs[1] if is_explicit_shape(node.inputs[1]) else None
    return None


def _nonlinear_block(tensor: gs.Tensor, between: list[gs.Node], node: gs.Node,
                     graph_outputs: set[str]) -> Reject | None:
    """`linear → activation → linear` where the activation (Gelu, Swish, Relu, ...) is not linear: not a chain
    any rule takes, but listed with the reason, so a model of such blocks is not reported as having none.
    The activation is the elementwise nodes computing `tensor` from one layer's output (and constants)."""
    nodes, sources, todo = [], [], [tensor]
    while todo:
        t = todo.pop()
        p = producer(t)
        if is_const(t) or any(t is s for s in sources):
            continue
        if p is None or not is_op(p, *ELEMENTWISE) or read_linear_ending_at(t, graph_outputs) is not None:
            sources.append(t)
        elif not any(p is n for n in nodes):
            nodes.append(p)
            todo += list(p.inputs)
        if len(sources) > 1 or len(nodes) > MAX_WALK:
            return None
    if not (nodes and sources):
        return None
    source, before = sources[0], []  # GPT-2's Conv1D exports a Reshape back from its Gemm before the activation
    while (p := producer(source)) is not None and _passes_through(p, graph_outputs) and len(before) < MAX_WALK:
        before.insert(0, p)
        source = p.inputs[0]
    first = read_linear_ending_at(source, graph_outputs)
    second = read_linear_starting_at(node, graph_outputs)
    if not isinstance(first, LinearLayer) or not isinstance(second, LinearLayer):
        return None
    nodes.reverse()  # in graph order, roughly: the walk went back from the second layer
    return Reject(first.nodes + before + nodes + between + second.nodes, NOT_LINEAR.format(_activation_name(nodes)),
                  None, (first.d_in, first.d_out, second.d_out), ((between or [node])[0], tensor, sources[0]))


def _activation_name(nodes: list[gs.Node]) -> str:
    ops = {n.op for n in nodes}
    if len(ops) == 1:
        return nodes[0].op
    if "Erf" in ops or {"Tanh", "Pow"} <= ops or ({"Tanh", "Mul", "Add"} <= ops and "Softplus" not in ops):
        return "Gelu"  # x·0.5·(1 + erf(x/√2)), or its tanh approximation (x³ as Pow or as x·x·x)
    if {"Softplus", "Tanh"} <= ops:
        return "Mish"
    if ops == {"Sigmoid", "Mul"}:
        return "Swish"
    if ops == {"HardSigmoid", "Mul"}:
        return "HardSwish"
    return "+".join(sorted(ops))

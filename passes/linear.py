"""A linear layer `y = x·W + b` read from `Gemm` or `MatMul(+Add)`, and written back.

The weight stays where it is stored until a rule that fires needs it (`load`): matching reads only its shape
and dtype, so a chain that is left never reads its weights, and one that folds reads each once. It is kept
in its own dtype (a transposed view for Gemm's transB); `weight` makes a float64 copy on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from passes.match import const_value, constant, is_const, is_default, is_empty, is_op, producer, rank_of, read

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class LinearLayer:
    """One fully connected layer in ONNX's x·W orientation; `nodes` are the ONNX nodes it spans."""

    nodes: list[gs.Node]
    x: gs.Tensor
    y: gs.Tensor
    source: gs.Constant  # the stored weight, not read until `load`; the layer's weight is scale·w
    transposed: bool  # stored as (d_out, d_in): Gemm's transB
    bias: np.ndarray | None  # float64, (d_out,)
    dtype: np.dtype
    x_rank: int | None
    internal: list[gs.Tensor] = field(default_factory=list)  # tensors between its nodes
    bias_first: bool = False  # Add(bias, x), as torch's legacy exporter writes it
    scale: float = 1.0  # Gemm's alpha
    _w: np.ndarray | None = field(default=None, repr=False)

    def load(self) -> str | None:
        """Read the weight (once for this layer) and say why it cannot be used, or None."""
        if self._w is None:
            value = read(self.source, keep=False)
            self._w = value.T if self.transposed else value
        if not np.isfinite(self._w).all():
            return f"weight of {self.nodes[0].name} holds NaN or inf"
        return None

    @property
    def w(self) -> np.ndarray:
        """The weight as stored, (d_in, d_out); read on first use."""
        if self._w is None:
            self.load()
        return self._w

    @property
    def weight(self) -> np.ndarray:
        """scale·w in float64 (a new array each time)."""
        return self.w.astype(np.float64) * self.scale

    @property
    def frobenius(self) -> float:
        """‖scale·w‖_F, accumulated in at least float32 (float16 would overflow)."""
        w = self.w if self.w.dtype.itemsize >= 4 else self.w.astype(np.float32)
        return float(abs(self.scale) * np.linalg.norm(w))

    @property
    def d_in(self) -> int:
        return self.source.shape[1 if self.transposed else 0]

    @property
    def d_out(self) -> int:
        return self.source.shape[0 if self.transposed else 1]

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (0 if self.bias is None else self.bias.size)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _weight(tensor: gs.Tensor, owner: gs.Node) -> gs.Constant | str:
    """The weight's constant, checked by its shape and dtype only (its values are read when it is folded)."""
    if is_default(tensor):
        return f"weight of {owner.name} is a graph input with a default (the caller may override it)"
    c = constant(tensor)
    if c is None:
        return f"weight of {owner.name} is not a constant (graph input or computed)"
    if len(c.shape) != 2:
        return f"weight of {owner.name} has rank {len(c.shape)}, not 2"
    if _dtype(c) not in FLOAT_DTYPES:
        return f"weight of {owner.name} has dtype {c.dtype}, not float16/32/64"
    return c


def _dtype(c: gs.Constant) -> np.dtype | None:
    try:
        return np.dtype(c.dtype)
    except TypeError:  # an ONNX type numpy has no name for (bfloat16, float8)
        return None


def _bias(tensor: gs.Tensor, d_out: int, out_rank: int | None, owner: gs.Node) -> np.ndarray | str:
    """A bias that adds the same vector to every row and does not raise the output's rank."""
    if is_default(tensor):
        return f"bias of {owner.name} is a graph input with a default (the caller may override it)"
    value = const_value(tensor)
    if value is None:
        return f"bias of {owner.name} is not a constant"
    if not np.isfinite(value).all():
        return f"bias of {owner.name} holds NaN or inf"
    per_row = value.size == 1 or (value.size == d_out and value.shape[-1] == d_out)
    if not per_row:
        return f"bias of {owner.name} has shape {list(value.shape)}, not one value per output feature"
    if value.ndim > (out_rank if out_rank is not None else 1):
        return f"bias of {owner.name} has rank {value.ndim}, which would broadcast the output to a higher rank"
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (d_out,)).copy()


def read_gemm(node: gs.Node) -> LinearLayer | str:
    if node.attrs.get("transA", 0):
        return f"{node.name} is a Gemm with transA=1"
    w = _weight(node.inputs[1], node)
    if isinstance(w, str):
        return w
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    trans = bool(node.attrs.get("transB", 0))
    bias = None
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        bias = _bias(node.inputs[2], w.shape[0 if trans else 1], 2, node)
        if isinstance(bias, str):
            return bias
        bias = beta * bias
    return LinearLayer([node], node.inputs[0], node.outputs[0], w, trans, bias, _dtype(w), 2, scale=alpha)


def _bias_add(tensor: gs.Tensor, graph_outputs: set[str]) -> tuple[gs.Node, gs.Tensor] | None:
    """The `Add` that is the sole consumer of `tensor` and adds a constant to it, with that constant."""
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    add = tensor.outputs[0]
    if not is_op(add, "Add") or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
    return (add, other) if is_const(other) else None


def read_matmul(node: gs.Node, graph_outputs: set[str], with_bias: bool = True) -> LinearLayer | str:
    """`MatMul(x, W)` with a constant 2-D W, and the bias `Add` after it when there is one."""
    w = _weight(node.inputs[1], node)
    if isinstance(w, str):
        return w
    x, y = node.inputs[0], node.outputs[0]
    layer = LinearLayer([node], x, y, w, False, None, _dtype(w), rank_of(x))
    found = _bias_add(y, graph_outputs) if with_bias else None
    if found is not None:
        add, b = found
        bias = _bias(b, layer.d_out, layer.x_rank, add)
        if isinstance(bias, str):
            return layer  # not a bias: the layer ends at the MatMul and the Add stays
        layer.nodes.append(add)
        layer.internal.append(y)
        layer.y, layer.bias, layer.bias_first = add.outputs[0], bias, add.inputs[0] is not y
    return layer


def read_linear_starting_at(node: gs.Node, graph_outputs: set[str]) -> LinearLayer | str | None:
    """The layer whose first node is `node`; None when `node` is no Gemm/MatMul."""
    if is_op(node, "Gemm"):
        return read_gemm(node)
    if is_op(node, "MatMul"):
        return read_matmul(node, graph_outputs)
    return None


def read_linear_ending_at(tensor: gs.Tensor, graph_outputs: set[str]) -> LinearLayer | str | None:
    """The layer whose output is `tensor`; None when its producer is no linear layer."""
    node = producer(tensor)
    if node is None:
        return None
    if is_op(node, "Gemm"):
        return read_gemm(node)
    if is_op(node, "MatMul"):
        return read_matmul(node, graph_outputs, with_bias=False)
    if is_op(node, "Add") and len(node.inputs) == 2:
        for data, other in (node.inputs, node.inputs[::-1]):
            mm = producer(data)
            if mm is not None and is_op(mm, "MatMul") and is_default(other):
                return f"bias of {node.name} is a graph input with a default (the caller may override it)"
            if mm is not None and is_op(mm, "MatMul") and is_const(other):
                layer = read_matmul(mm, graph_outputs)
                if isinstance(layer, str) or layer.y is tensor:
                    return layer
    return None


class Names:
    """Fresh, deterministic node and tensor names that collide with nothing in the model."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        for g in [graph, *graph.subgraphs(recursive=True)]:
            self.taken.update(g.tensors().keys())
            self.taken.update(n.name for n in g.nodes)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def write_linear(
    graph: gs.Graph,
    names: Names,
    base: str,
    x: gs.Tensor,
    y: gs.Tensor,
    weight: np.ndarray,
    bias: np.ndarray | None,
    dtype: np.dtype,
    gemm: bool,
    bias_first: bool = False,
) -> list[gs.Node]:
    """Make `y` the output of one new layer on `x`: a Gemm for 2-D inputs, else MatMul(+Add), the Add's
    operands in the order the replaced layer had (ONNX Runtime's fusions look at that order, so the new
    layer meets the same fusions the old one did)."""
    y.inputs.clear()  # detach y from its old producer; the old nodes die in cleanup
    w = gs.Constant(names(f"{base}.weight"), np.ascontiguousarray(weight, dtype=dtype))
    b = None if bias is None else gs.Constant(names(f"{base}.bias"), bias.astype(dtype))
    if gemm:
        inputs = [x, w] if b is None else [x, w, b]
        nodes = [gs.Node("Gemm", names(base), inputs=inputs, outputs=[y])]
    elif b is None:
        nodes = [gs.Node("MatMul", names(base), inputs=[x, w], outputs=[y])]
    else:
        mid = gs.Variable(names(f"{base}.matmul_out"), dtype=dtype)
        nodes = [
            gs.Node("MatMul", names(f"{base}.matmul"), inputs=[x, w], outputs=[mid]),
            gs.Node("Add", names(f"{base}.add"), inputs=[b, mid] if bias_first else [mid, b], outputs=[y]),
        ]
    graph.nodes.extend(nodes)
    return nodes

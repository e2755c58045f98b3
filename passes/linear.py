"""A linear layer `y = x·W + b` read from `Gemm`, `MatMul(+Add)` (also tf2onnx's `MatMul → Reshape → Add`), or a
pointwise `Conv` (a linear map over the channel axis), with an inference `BatchNormalization` after it folded in,
and written back.

The weight stays where it is stored until a rule that fires needs it (`load`): matching reads only its shape
and dtype, so a chain that is left never reads its weights, and one that folds reads each once. It is kept
in its own dtype (a transposed view for Gemm's transB); `weight` makes a float64 copy on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.match import (
    ConstView,
    const_value,
    constant,
    gs_dtype,
    inference_batchnorm,
    is_const,
    is_default,
    is_empty,
    is_op,
    producer,
    rank_of,
    read,
    reshape_last_dim,
    why_default,
)

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class LinearLayer:
    """One fully connected layer in ONNX's x·W orientation; `nodes` are the ONNX nodes it spans."""

    nodes: list[gs.Node]
    x: gs.Tensor
    y: gs.Tensor
    source: gs.Constant | ConstView  # the stored weight, not read until `load`; the layer's weight is scale·w
    transposed: bool  # stored as (d_out, d_in): Gemm's transB, a Conv's (C_out, C_in, 1, 1)
    bias: np.ndarray | None  # float64, (d_out,)
    dtype: np.dtype
    x_rank: int | None
    internal: list[gs.Tensor] = field(default_factory=list)  # tensors between its nodes
    bias_first: bool = False  # Add(bias, x), as torch's legacy exporter writes it
    scale: float = 1.0  # Gemm's alpha
    conv_rank: int | None = None  # a pointwise Conv: its weight's rank (4 for Conv2d); the features are axis 1
    reshape: gs.Node | None = None  # tf2onnx's Reshape between the MatMul and the bias Add (keeps the last dim)
    col_scale: np.ndarray | None = None  # a BatchNormalization's per-feature scale, folded into w (float64)
    # a BatchNormalization before the layer (after a unit activation), folded into w's rows and the bias
    row_scale: np.ndarray | None = None
    row_shift: np.ndarray | None = None
    extra_params: int = 0  # the folded BatchNormalizations' stored parameters (scale, B, mean, var: 4 per feature)
    bias_stored: bool = False  # the bias is a stored tensor (not only one folded from a BatchNormalization)
    _w: np.ndarray | None = field(default=None, repr=False)

    def load(self) -> str | None:
        """Read the weight (once for this layer) and say why it cannot be used, or None."""
        if self._w is None:
            value = read(self.source, keep=False)
            if value.ndim > 2:  # a pointwise Conv's (C_out, C_in, 1, ..., 1)
                value = value.reshape(value.shape[:2])
            value = value.T if self.transposed else value
            self._w = value if self.col_scale is None else value.astype(np.float64) * self.col_scale
            if self.row_scale is not None:  # BN(x)·W = x·(diag(s)·W) + t·W, t·W with the output BN's scale
                with np.errstate(all="ignore"):  # NaN/inf in w: reported below
                    self.bias = self.bias + self.scale * (self.row_shift @ self._w.astype(np.float64))
                    self._w = self._w.astype(np.float64) * self.row_scale[:, None]
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
        """What the layer stores: the weight, the bias where one is stored, and the folded BatchNormalizations'
        parameters (a bias computed from those is stored nowhere, so it is not counted twice)."""
        return self.d_in * self.d_out + (self.d_out if self.bias_stored else 0) + self.extra_params

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _unread_cast(tensor: gs.Tensor) -> str | None:
    """Why a weight computed by Identity/Transpose/Cast from a constant is not read: a Cast to or from a type
    other than float16/32/64 (float to int truncates: values change). None where that is not the case."""
    for _ in range(16):
        node = producer(tensor)
        if node is None or not is_op(node, "Identity", "Transpose", "Cast") or not node.inputs:
            return None
        if is_op(node, "Cast") and constant(node.inputs[0]) is not None:
            return f"a Cast ({node.name}) to {gs_dtype(node.attrs.get('to'))} of a constant of another type"
        tensor = node.inputs[0]
    return None


def _weight(tensor: gs.Tensor, owner: gs.Node, conv: bool = False) -> gs.Constant | ConstView | str:
    """The weight's constant, checked by its shape and dtype only (its values are read when it is folded).
    A Conv's must be pointwise: (C_out, C_in, 1, ..., 1)."""
    if is_default(tensor):
        return f"weight of {owner.name} {why_default(tensor)}"
    c = constant(tensor)
    if c is None:
        cast = _unread_cast(tensor)
        if cast:
            return f"weight of {owner.name} is {cast}; only casts between float16/32/64 are read"
        return f"weight of {owner.name} is not a constant (graph input or computed)"
    if conv and (len(c.shape) < 3 or any(d != 1 for d in c.shape[2:])):
        return f"{owner.name} is a Conv with kernel {list(c.shape[2:])}, not 1x1"
    if not conv and len(c.shape) != 2:
        return f"weight of {owner.name} has rank {len(c.shape)}, not 2"
    dtype = _dtype(c)
    if dtype is None or dtype not in FLOAT_DTYPES:  # not `None in ...`: numpy takes None for float64
        name = onnx.helper.tensor_dtype_to_string(c.dtype) if isinstance(c.dtype, int) else c.dtype
        return f"weight of {owner.name} has dtype {name}, not float16/32/64"
    return c


def _dtype(c: gs.Constant | ConstView) -> np.dtype | None:
    try:
        return np.dtype(c.dtype)
    except TypeError:  # an ONNX type numpy has no name for (bfloat16, float8)
        return None


def _bias(tensor: gs.Tensor, d_out: int, out_rank: int | None, owner: gs.Node) -> np.ndarray | str:
    """A bias that adds the same vector to every row and does not raise the output's rank."""
    if is_default(tensor):
        return f"bias of {owner.name} {why_default(tensor)}"
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


def read_gemm(node: gs.Node, graph_outputs: set[str] = frozenset(), until: gs.Tensor | None = None
              ) -> LinearLayer | str:
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
    layer = LinearLayer([node], node.inputs[0], node.outputs[0], w, trans, bias, _dtype(w), 2, scale=alpha,
                        bias_stored=bias is not None)
    return _with_batchnorm(layer, graph_outputs, until)


def _sole_user(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _bias_add(tensor: gs.Tensor, graph_outputs: set[str], d_out: int | None = None
              ) -> tuple[gs.Node, gs.Tensor, gs.Node | None] | None:
    """The `Add` that is the sole consumer of `tensor` and adds a constant to it, with that constant; also
    behind a Reshape that keeps the last dim `d_out` (tf2onnx's dense: `MatMul → Reshape → Add`), returned third."""
    add = _sole_user(tensor, graph_outputs)
    reshape = None
    if add is not None and is_op(add, "Reshape") and add.inputs[0] is tensor and d_out is not None:
        if reshape_last_dim(add) != d_out:
            return None
        reshape, tensor = add, add.outputs[0]
        add = _sole_user(tensor, graph_outputs)
    if add is None or not is_op(add, "Add") or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
    return (add, other, reshape) if is_const(other) else None


def _with_batchnorm(layer: LinearLayer, graph_outputs: set[str], until: gs.Tensor | None) -> LinearLayer:
    """The layer extended by the inference BatchNormalization it alone feeds, over its features (a Conv's
    channels, a 2-D layer's columns): BN(x·W + b) = x·(W·s) + (b·s + t)."""
    bn = None if layer.y is until else _sole_user(layer.y, graph_outputs)
    over_features = layer.conv_rank or layer.x_rank == 2 and layer.reshape is None  # BN normalizes axis 1
    if bn is None or not over_features or bn.inputs[0] is not layer.y:
        return layer
    found = inference_batchnorm(bn)
    if not isinstance(found, tuple) or found[0].size != layer.d_out or len(bn.outputs) < 1:
        return layer
    s, t = found
    bias = t if layer.bias is None else layer.bias * s + t
    layer.col_scale = s if layer.col_scale is None else layer.col_scale * s
    layer.nodes.append(bn)
    layer.internal.append(layer.y)
    layer.y, layer.bias = bn.outputs[0], bias
    layer.extra_params += 4 * s.size
    return layer


def fold_input_batchnorm(layer: LinearLayer, scale: np.ndarray, shift: np.ndarray) -> None:
    """Fold an inference BatchNormalization on the layer's input features, `y = (s·x + t)·W + b`, into the layer:
    W' = diag(s)·W, b' = t·W + b (applied to the weight when it is read; the bias is a zero vector until then, so
    the layer counts as biased)."""
    layer.row_scale, layer.row_shift = scale, shift
    if layer.bias is None:
        layer.bias = np.zeros(layer.d_out)
    layer.extra_params += 4 * scale.size


def read_matmul(node: gs.Node, graph_outputs: set[str], with_bias: bool = True,
                until: gs.Tensor | None = None) -> LinearLayer | str:
    """`MatMul(x, W)` with a constant 2-D W, and the bias `Add` after it when there is one (behind a Reshape
    that keeps the last dim, in tf2onnx's layout)."""
    w = _weight(node.inputs[1], node)
    if isinstance(w, str):
        return w
    x, y = node.inputs[0], node.outputs[0]
    layer = LinearLayer([node], x, y, w, False, None, _dtype(w), rank_of(x))
    found = _bias_add(y, graph_outputs, layer.d_out) if with_bias and y is not until else None
    if found is not None:
        add, b, reshape = found
        out_rank = layer.x_rank if reshape is None else rank_of(reshape.outputs[0])
        bias = _bias(b, layer.d_out, out_rank, add)
        if isinstance(bias, str):
            return layer  # not a bias: the layer ends at the MatMul and the Add stays
        if reshape is not None:
            layer.nodes.append(reshape)
            layer.internal.append(y)
            layer.reshape, y = reshape, reshape.outputs[0]
        layer.nodes.append(add)
        layer.internal.append(y)
        layer.y, layer.bias, layer.bias_first = add.outputs[0], bias, add.inputs[0] is not y
        layer.bias_stored = True
    return _with_batchnorm(layer, graph_outputs, until)


def _ints(node: gs.Node, attr: str) -> list[int]:
    return [int(v) for v in node.attrs.get(attr, [])]


def pointwise_problem(node: gs.Node) -> str | None:
    """Why a Conv is not a linear layer over its channels (1x1 kernel, stride 1, no padding, one group), or None.
    Dilations do not matter for a 1x1 kernel, nor does auto_pad: SAME pads nothing at kernel 1, stride 1."""
    if len(node.inputs) < 2:
        return f"{node.name} is a Conv without a weight"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        return f"{node.name} is a Conv with {group} groups, not one"
    if any(s != 1 for s in _ints(node, "strides")):
        return f"{node.name} is a Conv with strides {_ints(node, 'strides')}, not 1"
    if any(p != 0 for p in _ints(node, "pads")):
        return f"{node.name} is a Conv with pads {_ints(node, 'pads')}, not 0"
    if any(k != 1 for k in _ints(node, "kernel_shape")):
        return f"{node.name} is a Conv with kernel {_ints(node, 'kernel_shape')}, not 1x1"
    return None


def read_conv(node: gs.Node, graph_outputs: set[str], until: gs.Tensor | None = None) -> LinearLayer | str:
    """A pointwise `Conv(x, W, B)`: `y[:, o] = Σ_c W[o, c]·x[:, c] + B[o]` at every position, a linear layer
    over axis 1, with the BatchNormalization after it when there is one."""
    why = pointwise_problem(node)
    if why:
        return why
    w = _weight(node.inputs[1], node, conv=True)
    if isinstance(w, str):
        return w
    layer = LinearLayer([node], node.inputs[0], node.outputs[0], w, True, None, _dtype(w), len(w.shape),
                        conv_rank=len(w.shape))
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        bias = _bias(node.inputs[2], layer.d_out, 1, node)
        if isinstance(bias, str):
            return bias
        layer.bias, layer.bias_stored = bias, True
    return _with_batchnorm(layer, graph_outputs, until)


def read_linear_starting_at(node: gs.Node, graph_outputs: set[str], until: gs.Tensor | None = None
                            ) -> LinearLayer | str | None:
    """The layer whose first node is `node` (ending at `until` at the latest); None when `node` is no
    Gemm/MatMul/Conv."""
    if is_op(node, "Gemm"):
        return read_gemm(node, graph_outputs, until)
    if is_op(node, "MatMul"):
        return read_matmul(node, graph_outputs, until=until)
    if is_op(node, "Conv"):
        return read_conv(node, graph_outputs, until)
    return None


def read_linear_ending_at(tensor: gs.Tensor, graph_outputs: set[str]) -> LinearLayer | str | None:
    """The layer whose output is `tensor`; None when its producer is no linear layer. Walks back over the
    nodes a layer may end with (BatchNormalization, bias Add, tf2onnx's Reshape) to its Gemm/MatMul/Conv."""
    t, why = tensor, None
    for _ in range(4):
        node = producer(t)
        if node is None:
            return None
        if is_op(node, "Gemm", "MatMul", "Conv"):
            layer = read_linear_starting_at(node, graph_outputs, until=tensor)
            if layer is None or isinstance(layer, str) or layer.y is tensor:
                return layer
            return why
        if is_op(node, "BatchNormalization") and node.outputs[0] is t:
            found = inference_batchnorm(node)
            why = why or (found if isinstance(found, str) else None)
            t = node.inputs[0]
        elif is_op(node, "Add") and len(node.inputs) == 2:
            data = [i for i in node.inputs if not is_const(i) and not is_default(i)]
            bias = [i for i in node.inputs if i is not (data[0] if data else None)]
            if len(data) != 1:
                return None
            mm = producer(data[0])
            if mm is not None and is_op(mm, "MatMul") and is_default(bias[0]):
                return f"bias of {node.name} {why_default(bias[0])}"
            t = data[0]
        elif is_op(node, "Reshape") and len(node.inputs) == 2:
            mm = producer(node.inputs[0])
            if mm is not None and is_op(mm, "MatMul") and len(mm.inputs) == 2 and is_const(mm.inputs[1]):
                d_out = constant(mm.inputs[1]).shape[-1]
                if reshape_last_dim(node) != d_out:
                    why = why or (f"{node.name} between {mm.name} and its bias Add does not keep the last dim "
                                  f"{d_out} (or its target does not say so)")
            t = node.inputs[0]
        else:
            return None
    return None


class Names:
    """Fresh, deterministic node and tensor names that collide with nothing in the model: `base`, else the first
    free `base_i`. Names are only ever added, so each base's search resumes where its last one stopped (O(1) per
    name where thousands of unnamed nodes all ask for `_collapsed`)."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        self.next: dict[str, int] = {}  # base -> the suffix its next search starts at (0: the base itself)
        for g in [graph, *graph.subgraphs(recursive=True)]:
            self.taken.update(g.tensors().keys())
            self.taken.update(n.name for n in g.nodes)

    def __call__(self, base: str) -> str:
        i = self.next.get(base, 0)
        name = f"{base}_{i}" if i else base
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.next[base] = i + 1
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


def write_fused(graph: gs.Graph, names: Names, base: str, a: LinearLayer, b: LinearLayer, weight: np.ndarray,
                bias: np.ndarray | None, flatten: bool = False) -> list[gs.Node]:
    """Make `b.y` the output of one layer on `a.x` computing `x·weight + bias`, in the second layer's layout: a
    pointwise Conv for convolutions, `MatMul → Reshape(b's target) → Add` for tf2onnx's dense, `Reshape(x, [-1,
    d_in]) → Gemm` where b's 2-D input was a's output flattened (`flatten`: the chain rule's mixed layout), else
    `write_linear`."""
    if b.conv_rank:
        return [write_conv(graph, names, base, a.x, b.y, weight, bias, b.dtype, b.conv_rank)]
    if b.reshape is not None:
        mid = gs.Variable(names(f"{base}.flat"), dtype=b.dtype)
        nodes = write_linear(graph, names, base, a.x, mid, weight, None, b.dtype, gemm=False)
        return nodes + write_reshaped_bias(graph, names, base, b, mid, bias)
    if flatten:  # b's input was a's output flattened to (rows, h): a's input flattened the same way keeps the rows
        flat = gs.Variable(names(f"{base}.flat"), dtype=b.dtype)
        target = gs.Constant(names(f"{base}.flat_shape"), np.array([-1, a.d_in], dtype=np.int64))
        reshape = gs.Node("Reshape", names(f"{base}.flatten"), inputs=[a.x, target], outputs=[flat])
        graph.nodes.append(reshape)
        return [reshape, *write_linear(graph, names, base, flat, b.y, weight, bias, b.dtype, gemm=True)]
    return write_linear(graph, names, base, a.x, b.y, weight, bias, b.dtype, gemm=a.x_rank == 2,
                        bias_first=b.bias_first)


def write_reshaped_bias(graph: gs.Graph, names: Names, base: str, b: LinearLayer, flat: gs.Tensor,
                        bias: np.ndarray | None) -> list[gs.Node]:
    """The tail of tf2onnx's dense `b` on a new 2-D product `flat`: `b.y = Reshape(flat, b's target) (+ bias)`,
    the Add's operands in b's order. The target is b's own, so `b.y` keeps its shape whatever it is."""
    out = b.y if bias is None else gs.Variable(names(f"{base}.reshaped"), dtype=b.dtype)
    b.y.inputs.clear()
    attrs = {k: v for k, v in b.reshape.attrs.items() if k == "allowzero"}
    nodes = [gs.Node("Reshape", names(f"{base}.reshape"), attrs=attrs, inputs=[flat, b.reshape.inputs[1]],
                     outputs=[out])]
    if bias is not None:
        c = gs.Constant(names(f"{base}.bias"), bias.astype(b.dtype))
        nodes.append(gs.Node("Add", names(f"{base}.add"), inputs=[c, out] if b.bias_first else [out, c],
                             outputs=[b.y]))
    graph.nodes.extend(nodes)
    return nodes


def write_conv(graph: gs.Graph, names: Names, base: str, x: gs.Tensor, y: gs.Tensor, weight: np.ndarray,
               bias: np.ndarray | None, dtype: np.dtype, conv_rank: int) -> gs.Node:
    """Make `y` the output of one pointwise Conv on `x` computing `x·weight + bias` over the channels: its weight
    (C_out, C_in, 1, ..., 1) of rank `conv_rank`, no stride, padding or groups."""
    y.inputs.clear()
    w = weight.T.reshape(weight.shape[1], weight.shape[0], *([1] * (conv_rank - 2)))
    inputs = [x, gs.Constant(names(f"{base}.weight"), np.ascontiguousarray(w, dtype=dtype))]
    if bias is not None:
        inputs.append(gs.Constant(names(f"{base}.bias"), bias.astype(dtype)))
    node = gs.Node("Conv", names(base), attrs={"kernel_shape": [1] * (conv_rank - 2)}, inputs=inputs, outputs=[y])
    graph.nodes.append(node)
    return node


def write_layer(graph: gs.Graph, names: Names, base: str, like: LinearLayer, x: gs.Tensor, y: gs.Tensor,
                weight: np.ndarray, bias: np.ndarray | None, bias_first: bool = False) -> list[gs.Node]:
    """Make `y` the output of one new layer on `x` (a tensor laid out as `like`'s input) computing
    `x·weight + bias`, in `like`'s layout and dtype: a pointwise Conv of its rank for a convolution, else a Gemm
    for 2-D inputs and MatMul(+Add) otherwise. Not tf2onnx's Reshape layout: a caller checks `like.reshape`."""
    if like.conv_rank:
        return [write_conv(graph, names, base, x, y, weight, bias, like.dtype, like.conv_rank)]
    return write_linear(graph, names, base, x, y, weight, bias, like.dtype, gemm=like.x_rank == 2,
                        bias_first=bias_first)

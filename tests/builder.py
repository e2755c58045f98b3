"""Small ONNX models for rule tests, built node by node with seeded random weights."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Builder:
    def __init__(self, dtype=np.float32, seed: int = 0):
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def const(self, value, name: str | None = None, dtype=None) -> str:
        name = name or self.fresh("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def weights(self, *shape) -> np.ndarray:
        fan_in = shape[0] if len(shape) > 1 else 1
        return self.rng.standard_normal(shape) / np.sqrt(fan_in)

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"{op}_"), domain=domain, **attrs))
        return outs

    def linear(self, x: str, d_in: int, d_out: int, kind: str = "matmul", bias: bool = True,
               bias_first: bool = False, trans_b: bool = False, alpha: float = 1.0, beta: float = 1.0,
               c_shape: tuple[int, ...] | None = None, weight: str | None = None) -> str:
        """A fully connected layer: MatMul(+Add, bias first or second) or Gemm with its attributes."""
        w = weight or self.const(self.weights(d_out, d_in) if trans_b else self.weights(d_in, d_out))
        if kind == "gemm":
            inputs = [x, w]
            if bias:
                shape = c_shape if c_shape is not None else (d_out,)
                inputs.append(self.const(self.rng.standard_normal(shape) * 0.1))
            return self.node("Gemm", inputs, transB=int(trans_b), alpha=alpha, beta=beta)[0]
        (y,) = self.node("MatMul", [x, w])
        if not bias:
            return y
        b = self.const(self.rng.standard_normal(c_shape or (d_out,)) * 0.1)
        return self.node("Add", [b, y] if bias_first else [y, b])[0]

    def conv(self, x: str, c_in: int, c_out: int, spatial: int = 2, bias: bool = True, kernel: int = 1,
             weight: str | None = None, **attrs) -> str:
        """A Conv of rank spatial + 2, weight (c_out, c_in / group, k, ..., k); pointwise at the defaults."""
        group = attrs.get("group", 1)
        w = weight or self.const(self.weights(c_out, c_in // group, *([kernel] * spatial)) * np.sqrt(c_out / c_in))
        inputs = [x, w] + ([self.const(self.rng.standard_normal(c_out) * 0.1)] if bias else [])
        return self.node("Conv", inputs, **attrs)[0]

    def batchnorm(self, x: str, c: int) -> str:
        """An inference BatchNormalization over axis 1 with random (valid) parameters."""
        params = [self.rng.uniform(0.5, 2, c), self.rng.uniform(-1, 1, c), self.rng.uniform(-1, 1, c),
                  self.rng.uniform(0.5, 2, c)]
        return self.node("BatchNormalization", [x] + [self.const(p) for p in params])[0]

    def prelu(self, x: str, slope, shape=(1,)) -> str:
        value = np.broadcast_to(np.asarray(slope, dtype=self.dtype), shape)
        return self.node("PRelu", [x, self.const(value)])[0]

    def model(self, inputs: list[tuple[str, list]], outputs: list[tuple[str, list | None]], opset: int = 17,
              elem: int | None = None) -> onnx.ModelProto:
        elem = elem or self.elem
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
            [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
            self.inits,
        )
        ir = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}.get(opset, 8)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def mlp(d_in=8, hidden=32, d_out=8, rank=3, slope=1.0, slope_shape=(1,), kind="matmul", dtype=np.float32,
        opset=17, bias=True, **linear_kw) -> onnx.ModelProto:
    """x → linear → PRelu(slope) → linear → y on an input of the given rank (leading dims open)."""
    b = Builder(dtype)
    lead = ["N"] if rank == 2 else ["N"] + [3] * (rank - 2)
    h = b.linear("x", d_in, hidden, kind, bias, **linear_kw)
    if slope is not None:
        h = b.prelu(h, slope, slope_shape)
    y = b.linear(h, hidden, d_out, kind, bias, **linear_kw)
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    return b.model([("x", lead + [d_in])], [("y", lead + [d_out])], opset)


def conv_mlp(c_in=8, hidden=32, c_out=8, spatial=2, slope=1.0, slope_shape=None, dtype=np.float32, opset=17,
             bias=True, size=(4, 5, 3), bn=None, first=None, second=None) -> onnx.ModelProto:
    """x → Conv1x1 → PRelu(slope) → Conv1x1 → y on NCHW-style input of `spatial` dims (sizes from `size`), the
    slope per channel ((hidden, 1, ..., 1)) unless `slope_shape` says otherwise; `bn` "before" or "after" the
    activation adds an inference BatchNormalization there; `first`/`second`: the Convs' extra attributes
    (kernel, strides, pads, group, dilations)."""
    b = Builder(dtype)
    dims = list(size[:spatial])
    h = b.conv("x", c_in, hidden, spatial, bias, **(first or {}))
    if bn == "before":
        h = b.batchnorm(h, hidden)
    if slope is not None:
        shape = slope_shape or (hidden,) + (1,) * spatial
        value = np.asarray(slope)
        h = b.prelu(h, value.reshape(shape) if value.size == math.prod(shape) else value, shape)
    if bn == "after":
        h = b.batchnorm(h, hidden)
    y = b.conv(h, hidden, c_out, spatial, bias, **(second or {}))
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    out = ["N", c_out] + ([None] * spatial if first or second else dims)
    return b.model([("x", ["N", c_in] + dims)], [("y", out)], opset)


I64 = np.int64


def tf_dense(b: Builder, x: str, d_in: int, d_out: int, tokens: int = 3, target: str = "const", bias: bool = True,
             bias_first: bool = False, back: list[int] | None = None) -> str:
    """Keras Dense on a rank-3 input as tf2onnx writes it: Reshape(x, [-1, d_in]) → MatMul → Reshape(back) →
    Add(bias). `target` "const" is [-1, tokens, d_out] (or `back`); "shape" is Concat(Shape(x)[:2], [d_out]), with
    x the dense's rank-3 input (tf2onnx's form for open dims); "computed" takes the last dim from the MatMul's
    own shape too, so no constant states it."""
    (flat,) = b.node("Reshape", [x, b.const([-1, d_in], dtype=I64)])
    (mm,) = b.node("MatMul", [flat, b.const(b.weights(d_in, d_out))])
    if target == "const":
        shape = b.const(back or [-1, tokens, d_out], dtype=I64)
    else:
        (s,) = b.node("Shape", [x])
        (lead,) = b.node("Slice", [s, b.const([0], dtype=I64), b.const([2], dtype=I64)])
        last = b.const([d_out], dtype=I64)
        if target == "computed":
            (last,) = b.node("Shape", [mm], start=1)
        (shape,) = b.node("Concat", [lead, last], axis=0)
    (y,) = b.node("Reshape", [mm, shape])
    if not bias:
        return y
    c = b.const(b.rng.standard_normal(d_out) * 0.1)
    return b.node("Add", [c, y] if bias_first else [y, c])[0]

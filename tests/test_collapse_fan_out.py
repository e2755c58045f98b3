"""collapse_fan_out: a layer whose unit-slope output feeds several linear layers folds into each of them
where that is cheaper; else the activation alone goes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lc_onnx
from tests.builder import Builder
from tests.harness import count_ops, optimized


def heads(d_in=8, hidden=32, d_outs=(8, 4), slope=1.0, kind="matmul", rank=3, act="prelu", bias=True):
    """x → linear d_in→h → act → k linear heads h→d_i, each a graph output."""
    b = Builder()
    lead = ["N"] if rank == 2 else ["N"] + [3] * (rank - 2)
    h = b.linear("x", d_in, hidden, kind, bias)
    if act == "prelu":
        h = b.prelu(h, slope)
    elif act == "leaky":
        (h,) = b.node("LeakyRelu", [h], alpha=slope)
    elif act == "dropout":
        (h,) = b.node("Dropout", [b.prelu(h, slope)])
    ys = [b.linear(h, hidden, d, kind, bias, trans_b=kind == "gemm" and i % 2 == 1) for i, d in enumerate(d_outs)]
    return b.model([("x", lead + [d_in])], [(y, lead + [d]) for y, d in zip(ys, d_outs, strict=True)])


def rules(result) -> list[str]:
    return [r.rule for r in result.report.rewrites]


@pytest.mark.parametrize("kind,rank", [("matmul", 3), ("matmul", 2), ("gemm", 2)])
@pytest.mark.parametrize("act", ["prelu", "leaky", "none", "dropout"])
def test_two_heads_fold(kind, rank, act):
    result = optimized(heads(kind=kind, rank=rank, act=act), rewrites=1, seeds=(0, 1, 2))
    (r,) = result.report.rewrites
    assert r.rule == "collapse_fan_out" and r.shape == (8, 32, 12)
    assert r.macs_after == 8 * 12 < r.macs_before == 32 * (8 + 12)
    assert count_ops(result.model, "PRelu") + count_ops(result.model, "LeakyRelu") == 0
    assert count_ops(result.model, "MatMul") + count_ops(result.model, "Gemm") == 2


def test_three_heads_without_biases():
    result = optimized(heads(d_outs=(8, 4, 2), bias=False), rewrites=1)
    assert count_ops(result.model, "Add") == 0 and count_ops(result.model, "MatMul") == 3


def test_slope_within_tol_states_its_error():
    (r,) = optimized(heads(slope=0.9995), rewrites=1, rtol=1e-2, atol=1e-2).report.rewrites
    assert r.rule == "collapse_fan_out" and r.error_coefficient > 0


def test_a_head_then_chains_on():
    """A head that feeds another unit-slope layer: after the fan-out fold, the chain rule takes that one."""
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    y1 = b.linear(b.prelu(b.linear(h, 32, 32), 1.0), 32, 4)
    y2 = b.linear(h, 32, 8)
    result = optimized(b.model([("x", ["N", 8])], [(y1, ["N", 4]), (y2, ["N", 8])]), rewrites=2)
    assert sorted(rules(result)) == ["collapse_fan_out", "collapse_linear_chain"]
    assert count_ops(result.model, "MatMul") + count_ops(result.model, "Gemm") == 2


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtypes(dtype):
    b = Builder(dtype)
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    ys = [b.linear(h, 32, 8), b.linear(h, 32, 4)]
    model = b.model([("x", ["N", 8])], [(ys[0], ["N", 8]), (ys[1], ["N", 4])])
    optimized(model, rewrites=1, rtol=3e-2 if dtype == np.float16 else 1e-9, atol=3e-2 if dtype == np.float16 else 1e-9)


# --- must not fire --------------------------------------------------------------------------------------


def test_fan_out_into_a_non_linear_node_only_drops_the_activation():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    y = b.linear(h, 32, 8)
    (side,) = b.node("Relu", [h])
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8]), (side, ["N", 32])]), rewrites=0)
    assert rules(result) == ["eliminate_unit_activation"]
    assert count_ops(result.model, "MatMul") == 2


def test_wide_heads_cost_more_folded():
    # 8 -> 4 -> (32, 32): two fused 8x32 layers (512 MACs/row) cost more than 4*(8+64) = 288
    result = optimized(heads(d_in=8, hidden=4, d_outs=(32, 32)), rewrites=0)
    assert rules(result) == ["eliminate_unit_activation"]
    reasons = [c.reason for c in result.report.skipped]
    assert any(r.startswith("collapse_fan_out: fan-out into 2 layers: the fused layers (512 MACs/row) cost more")
               for r in reasons), reasons


def test_slope_outside_tolerance():
    result = optimized(heads(slope=0.5), rewrites=0, skip=("prelu_to_leaky_relu",))
    assert result.model.SerializeToString() == heads(slope=0.5).SerializeToString()
    assert any("outside tolerance" in c.reason and c.reason.startswith("collapse_fan_out")
               for c in result.report.skipped)


def test_hidden_is_a_graph_output():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    ys = [b.linear(h, 32, 8), b.linear(h, 32, 4)]
    model = b.model([("x", ["N", 8])], [(ys[0], ["N", 8]), (ys[1], ["N", 4]), (h, ["N", 32])])
    assert "collapse_fan_out" not in rules(optimized(model, rewrites=0))


def test_a_head_reading_the_hidden_as_its_weight():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 8), 1.0)
    y = b.linear(h, 8, 8)
    (z,) = b.node("MatMul", [b.const(b.weights(8, 8)), h])  # reads h as its second operand: no layer on h
    model = b.model([("x", [8, 8])], [(y, [8, 8]), (z, [8, 8])])
    assert "collapse_fan_out" not in rules(optimized(model, rewrites=0))


def test_shared_first_layer_that_would_grow_the_model():
    """The first layer's weight is also read elsewhere: it stays, so the fused heads are new parameters."""
    b = Builder()
    w = b.const(b.weights(24, 16))  # 24 -> 16 -> (16, 16): 768 MACs/row folded against 896, but 800 params
    h = b.prelu(b.linear("x", 24, 16, weight=w), 1.0)  # against the 560 that die (the heads, all biases)
    ys = [b.linear(h, 16, 16), b.linear(h, 16, 16)]
    (other,) = b.node("MatMul", ["x", w])
    model = b.model([("x", ["N", 24])], [(ys[0], ["N", 16]), (ys[1], ["N", 16]), (other, ["N", 16])])
    result = optimized(model, rewrites=0)
    assert any("grow the model" in c.reason and "--allow-growth" in c.reason for c in result.report.skipped)
    (r,) = [r for r in optimized(model, rewrites=1, allow_growth=True).report.rewrites if r.rule == "collapse_fan_out"]
    assert "allowed by --allow-growth" in r.note


def test_inspect_lists_the_fan_out():
    found = lc_onnx.inspect(heads())
    assert [c.rule for c in found if c.kind == "chain"] == ["collapse_fan_out"]  # the heads' "also feeds" merged


def test_heads_inside_a_subgraph_are_not_folded_from_outside():
    from onnx import TensorProto, helper

    b = Builder()
    h = b.prelu(b.linear("x", 8, 8), 1.0)
    w1, w2 = b.const(b.weights(8, 8)), b.const(b.weights(8, 4))
    branch = []
    for name in ("then", "else"):
        nodes = [helper.make_node("MatMul", [h, w1], [f"{name}1"], name=f"{name}_m1"),
                 helper.make_node("MatMul", [h, w2], [f"{name}2"], name=f"{name}_m2"),
                 helper.make_node("ReduceSum", [f"{name}1"], [f"{name}1s"], name=f"{name}_r1", keepdims=0),
                 helper.make_node("ReduceSum", [f"{name}2"], [f"{name}2s"], name=f"{name}_r2", keepdims=0),
                 helper.make_node("Add", [f"{name}1s", f"{name}2s"], [f"{name}o"], name=f"{name}_a")]
        branch.append(helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}o", TensorProto.FLOAT,
                                                                                         [])]))
    b.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch[0], else_branch=branch[1]))
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
        result = optimized(model, feeds=feeds, rewrites=0)
        assert rules(result) == ["eliminate_unit_activation"]


def test_fan_out_in_a_subgraph_reading_a_weight_through_an_outer_node():
    """The then-branch's layer reads its weight through a Transpose of the outer graph: once folded, that Transpose
    is unread but is the outer graph's to clean up (it was unhooked and left there, no inputs, no outputs)."""
    from tests.test_eliminate_unit_activation import if_feeds, if_model, then_branch

    b = Builder()
    (wt,) = b.node("Transpose", [b.const(b.weights(32, 8))])
    at = len(b.nodes)
    h = b.prelu(b.linear("x", 8, 32, weight=wt), 1.0)
    (y,) = b.node("Add", [b.linear(h, 32, 8), b.linear(h, 32, 8)])
    model = if_model(b, at, y)
    for cond in (True, False):
        result = optimized(model, rewrites=1, feeds=if_feeds(cond))
        assert rules(result) == ["collapse_fan_out"]
    assert count_ops(result.model, "Transpose") == 0  # the outer graph is cleaned up too
    assert [n.op_type for n in then_branch(result.model).node] == ["Gemm", "Gemm", "Add"]


# --- pointwise convolutions ----------------------------------------------------------------------------


def conv_heads(spatial=2, d_outs=(8, 4), slope=1.0, slope_shape=None, act="prelu", bias=True, bn=False,
               head_bn=False, dtype=np.float32, opset=17, head=None, first=None, hidden_out=False):
    """x → Conv1x1 8→32 [→ BN] → act → k Conv1x1 heads 32→d_i [→ BN], each a graph output; `head`/`first`: extra
    attributes of the first head / the first layer (kernel, strides, group)."""
    b = Builder(dtype)
    dims = [4, 5, 3][:spatial]
    h = b.conv("x", 8, 32, spatial, bias, **(first or {}))
    h = b.batchnorm(h, 32) if bn else h
    if act == "prelu":
        h = b.prelu(h, slope, slope_shape or (32,) + (1,) * spatial)
    elif act == "leaky":
        (h,) = b.node("LeakyRelu", [h], alpha=slope)
    ys = []
    for i, d in enumerate(d_outs):
        y = b.conv(h, 32, d, spatial, bias, **(head or {} if i == 0 else {}))
        ys.append(b.batchnorm(y, d) if head_bn else y)
    open_dims = [None] * spatial if head or first else dims
    outputs = [(y, ["N", d] + open_dims) for y, d in zip(ys, d_outs, strict=True)]
    if hidden_out:
        outputs.append((h, ["N", 32] + open_dims))
    return b.model([("x", ["N", 8] + dims)], outputs, opset)


@pytest.mark.parametrize("spatial,act,bias,bn,head_bn,opset", [
    (2, "prelu", True, False, False, 17), (2, "prelu", False, True, False, 13), (2, "leaky", True, False, True, 21),
    (1, "none", True, True, True, 17), (3, "prelu", False, False, False, 18), (1, "prelu", True, False, False, 13),
])
def test_conv_heads_fold(spatial, act, bias, bn, head_bn, opset):
    model = conv_heads(spatial, act=act, bias=bias, bn=bn, head_bn=head_bn, opset=opset)
    result = optimized(model, rewrites=1, seeds=(0, 1, 2), rtol=1e-4)
    (r,) = result.report.rewrites
    assert r.rule == "collapse_fan_out" and r.shape == (8, 32, 12)
    assert r.macs_after == 8 * 12 < r.macs_before == 32 * (8 + 12)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]


@pytest.mark.parametrize("slope_shape", [(1,), (1, 32, 1, 1)])
def test_conv_heads_slope_shapes_and_within_tol(slope_shape):
    (r,) = optimized(conv_heads(slope=0.9995, slope_shape=slope_shape), rewrites=1, rtol=1e-2,
                     atol=1e-2).report.rewrites
    assert r.rule == "collapse_fan_out" and r.error_coefficient > 0


def test_conv_heads_float16():
    optimized(conv_heads(dtype=np.float16), rewrites=1, rtol=3e-2, atol=3e-2)
    optimized(conv_heads(dtype=np.float16, bn=True, opset=13), rewrites=1, rtol=3e-2, atol=3e-2)


def test_inspect_lists_the_conv_fan_out():
    found = lc_onnx.inspect(conv_heads(bn=True))
    assert [c.rule for c in found if c.kind == "chain"] == ["collapse_fan_out"]


def test_mac_share_of_a_conv_fan_out(tmp_path):
    import onnx

    from lc_onnx import bench

    path = tmp_path / "m.onnx"
    onnx.save(conv_heads(), path)
    shapes = {"x": [2, 8, 4, 5]}
    share = bench.mac_share(onnx.load(path), shapes, lc_onnx.inspect(path))
    found, _ = bench.node_macs(lc_onnx.optimize(path).model, shapes)
    assert share.after == 40 * 8 * 12 == sum(m for _, m in found.values()) and share.unsaved == 0


@pytest.mark.parametrize("form", [
    dict(head={"kernel": 3}), dict(head={"strides": [2, 2]}), dict(head={"pads": [1, 1, 1, 1]}),
    dict(head={"group": 2}), dict(head={"kernel": 3, "dilations": [1, 2]}), dict(first={"group": 2}),
    dict(first={"kernel": 3}), dict(hidden_out=True), dict(slope=0.5),
])
def test_conv_fan_out_near_misses_are_left(form):
    result = optimized(conv_heads(**form), skip=("prelu_to_leaky_relu",))
    assert "collapse_fan_out" not in rules(result)


def test_conv_head_beside_a_matmul_head_is_left():
    b = Builder()
    h = b.prelu(b.conv("x", 8, 8), 1.0)
    ys = [b.conv(h, 8, 4), b.linear(h, 8, 4)]  # the MatMul maps the last axis (W), not the channels
    model = b.model([("x", ["N", 8, 4, 8])], [(ys[0], ["N", 4, 4, 8]), (ys[1], ["N", 8, 4, 4])])
    assert "collapse_fan_out" not in rules(optimized(model))


def test_conv_fan_out_with_a_weight_that_is_a_graph_input_is_left():
    from onnx import TensorProto, helper

    b = Builder()
    h = b.prelu(b.node("Conv", ["x", "w"])[0], 1.0)
    ys = [b.conv(h, 32, 8), b.conv(h, 32, 4)]
    model = b.model([("x", ["N", 8, 4, 5])], [(ys[0], ["N", 8, 4, 5]), (ys[1], ["N", 4, 4, 5])])
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [32, 8, 1, 1]))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 8, 4, 5)).astype(np.float32),
             "w": rng.standard_normal((32, 8, 1, 1)).astype(np.float32)}
    assert "collapse_fan_out" not in rules(optimized(model, feeds=feeds))


# --- tf2onnx / Keras dense: Reshape(x, [-1, d]) → MatMul → Reshape(back) → Add ---------------------------------


def tf_heads(target="const", slope=1.0, dtype=np.float32, opset=17, bias=True, merged=False, hidden_out=False,
             reader=False, slope_shape=(1,), head_back=None):
    """A tf2onnx dense 8→32, a PRelu, then two dense heads 32→8 and 32→4 on (N, 3, ·). `merged`: one flatten
    Reshape the heads share (tf2onnx merges duplicate nodes); `reader`: a Shape of the hidden as a graph output;
    `head_back`: the first head's flatten target."""
    from tests.builder import tf_dense

    b = Builder(dtype)
    h = b.prelu(tf_dense(b, "x", 8, 32, target=target, bias=bias), slope, slope_shape)
    if merged:
        (flat,) = b.node("Reshape", [h, b.const([-1, 32], dtype=np.int64)])
        ys = [b.node("MatMul", [flat, b.const(b.weights(32, d))])[0] for d in (8, 4)]
        outs = [(y, ["N", d]) for y, d in zip(ys, (8, 4), strict=True)]
    else:
        ys = [tf_dense(b, h, 32, d, target=target, bias=bias) for d in (8, 4)]
        outs = [(y, ["N", 3, d]) for y, d in zip(ys, (8, 4), strict=True)]
    if head_back is not None:  # a third head, flattened to `head_back`
        (flat,) = b.node("Reshape", [h, b.const(head_back, dtype=np.int64)])
        (mm,) = b.node("MatMul", [flat, b.const(b.weights(32, 2))])
        (y,) = b.node("Reshape", [mm, b.const([-1, 3, 2], dtype=np.int64)])
        outs.append((b.node("Add", [y, b.const(np.ones(2))])[0], ["N", 3, 2]))
    if hidden_out:
        outs.append((h, ["N", 3, 32]))
    if reader:
        outs.append((b.node("Shape", [h])[0], [3]))
    model = b.model([("x", ["N", 3, 8])], outs, opset)
    if reader:
        model.graph.output[-1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    return model


@pytest.mark.parametrize("target", ["const", "shape"])
@pytest.mark.parametrize("opset", [13, 17, 21])
def test_tf2onnx_heads_fold(target, opset):
    """Each head becomes MatMul → its own Reshape → Add on the flattened input; tf2onnx's Shape(hidden) for a
    head's back target is rewired to the first dense's target, so the hidden layer dies whole."""
    result = optimized(tf_heads(target, opset=opset), rewrites=1, seeds=(0, 1, 2))
    (r,) = result.report.rewrites
    assert r.rule == "collapse_fan_out" and r.shape == (8, 32, 12) and r.macs_after == 8 * 12
    assert count_ops(result.model, "MatMul") == 2 and count_ops(result.model, "PRelu") == 0
    assert count_ops(result.model, "Reshape") == 3  # the input's flatten, one per head
    assert all(n.input[0] == "x" for n in result.model.graph.node if n.op_type == "Shape")


@pytest.mark.parametrize("bias", [True, False])
def test_tf2onnx_heads_without_biases_and_merged_flatten(bias):
    optimized(tf_heads(bias=bias), rewrites=1, seeds=(0, 1, 2))
    result = optimized(tf_heads(bias=bias, merged=True), rewrites=1, seeds=(0, 1, 2))
    assert count_ops(result.model, "Gemm") == 2 and count_ops(result.model, "Reshape") == 1  # 2-D heads: Gemm


def test_tf2onnx_heads_float16_and_slope_within_tol():
    optimized(tf_heads(dtype=np.float16), rewrites=1, rtol=2e-2, atol=2e-2)
    (r,) = optimized(tf_heads(slope=0.9995), rewrites=1, rtol=1e-2, atol=1e-2).report.rewrites
    assert r.rule == "collapse_fan_out" and r.error_coefficient > 0


# --- tf2onnx near misses: left, and listed by inspect with the reason ----------------------------------------


def fan_out_reasons(model) -> list[str]:
    result = optimized(model, skip=("prelu_to_leaky_relu",))
    assert "collapse_fan_out" not in rules(result)
    return [c.reason for c in lc_onnx.inspect(model) if c.kind == "chain" and c.rule is None]


def test_tf2onnx_hidden_graph_output_is_listed():
    reasons = fan_out_reasons(tf_heads(hidden_out=True))
    assert any(r.startswith("collapse_fan_out") and "is a graph output" in r for r in reasons), reasons


def test_tf2onnx_shape_reader_of_the_hidden_is_listed():
    """The first dense's target [-1, 3, 32] does not spell the hidden's shape out: Shape(hidden) cannot move."""
    reasons = fan_out_reasons(tf_heads(reader=True))
    assert any(r.startswith("collapse_fan_out") and "also feeds" in r and "Shape" in r for r in reasons), reasons


def test_tf2onnx_head_whose_flatten_is_not_2d_is_listed():
    """A head's flatten to [-1, 3, 32]: the product is not proven to be on 2-D rows."""
    reasons = fan_out_reasons(tf_heads(head_back=[-1, 3, 32]))
    assert any(r.startswith("collapse_fan_out") and "not both known to be 2-D" in r for r in reasons), reasons


def test_tf2onnx_slope_that_raises_the_rank_is_listed():
    """A (1, 1, 1, 32) slope on the (N, 3, 32) hidden: it broadcasts the output to rank 4."""
    reasons = fan_out_reasons(tf_heads(slope=np.ones(32), slope_shape=(1, 1, 1, 32)))
    assert any(r.startswith("collapse_fan_out") and "higher rank" in r for r in reasons), reasons


def test_tf2onnx_back_target_not_a_constant_is_listed():
    """The first dense's back target takes its last dim from Shape(MatMul): the layer is not read as tf2onnx's."""
    reasons = fan_out_reasons(tf_heads(target="computed"))
    assert any("target does not say so" in r for r in reasons), reasons

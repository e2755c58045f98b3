"""collapse_linear_chain on the layouts other exporters write: tf2onnx's dense (`Reshape → MatMul → Reshape →
Add`), pointwise convolutions (with a BatchNormalization folded), weights behind Transpose / Cast / Identity;
and the near misses that must be left, each with its reason."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import lc_onnx
from passes.match import ConstView, _view
from tests.builder import Builder
from tests.harness import count_ops, optimized, run

CHAIN_RULES = ("collapse_linear_chain", "drop_unit_activation")
I64 = np.int64


def chain_rewrites(result) -> list[str]:
    return [r.rule for r in result.report.rewrites if r.rule in CHAIN_RULES]


def left(model, **kw) -> list[str]:
    """No chain rule fires; the model still computes the same. Returns the reasons the candidates were left."""
    result = optimized(model, **kw)
    assert not chain_rewrites(result), result.report.rewrites
    return [c.reason for c in result.report.skipped]


def inspect_reasons(model) -> list[str]:
    found = lc_onnx.inspect(model)
    assert not any(c.rule in CHAIN_RULES for c in found if c.kind == "chain")
    return [c.reason for c in found if c.kind == "chain"]


# --- tf2onnx / Keras dense ------------------------------------------------------------------------------


def tf_dense(b: Builder, x: str, d_in: int, d_out: int, tokens: int, target: str = "const",
             last: int | None = None, bias_first: bool = False) -> str:
    """Keras Dense on a rank-3 input as tf2onnx writes it: Reshape(x, [-1, d_in]) → MatMul → Reshape(back) →
    Add(bias). `target` "const" is [-1, tokens, d_out]; "shape" is Concat(Shape(x)[:2], [d_out])."""
    (flat,) = b.node("Reshape", [x, b.const([-1, d_in], dtype=I64)])
    (mm,) = b.node("MatMul", [flat, b.const(b.weights(d_in, d_out))])
    last = d_out if last is None else last
    if target == "const":
        shape = b.const([-1, tokens, last], dtype=I64)
    else:
        (s,) = b.node("Shape", [x])
        (lead,) = b.node("Slice", [s, b.const([0], dtype=I64), b.const([2], dtype=I64)])
        (shape,) = b.node("Concat", [lead, b.const([last], dtype=I64)], axis=0)
    (back,) = b.node("Reshape", [mm, shape])
    bias = b.const(b.rng.standard_normal(last) * 0.1)
    return b.node("Add", [bias, back] if bias_first else [back, bias])[0]


def tf_mlp(dims=(8, 32, 8), tokens=3, target="const", slope=1.0, dtype=np.float32, opset=17, act="prelu",
           bias_first=False):
    b = Builder(dtype)
    h = "x"
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:], strict=False)):
        if i and act == "prelu":
            h = b.prelu(h, slope)
        elif i and act == "leaky":
            (h,) = b.node("LeakyRelu", [h], alpha=slope)
        h = tf_dense(b, h, d_in, d_out, tokens, target, bias_first=bias_first)
    return b.model([("x", ["N", tokens, dims[0]])], [(h, ["N", tokens, dims[-1]])], opset=opset)


@pytest.mark.parametrize("target", ["const", "shape"])
@pytest.mark.parametrize("opset", [13, 17, 21])
def test_tf2onnx_dense_collapses(target, opset):
    model = tf_mlp(target=target, opset=opset)
    result = optimized(model, rewrites=1, seeds=(0, 1, 2))
    assert chain_rewrites(result) == ["collapse_linear_chain"]
    ops = [n.op_type for n in result.model.graph.node if n.op_type not in ("Shape", "Slice", "Concat")]
    assert ops == ["Reshape", "MatMul", "Reshape", "Add"]  # the first Reshape, then one dense layer
    assert count_ops(result.model, "PRelu") + count_ops(result.model, "LeakyRelu") == 0


@pytest.mark.parametrize("act", ["leaky", "none"])
@pytest.mark.parametrize("bias_first", [False, True])
def test_tf2onnx_dense_other_activations_and_bias_order(act, bias_first):
    optimized(tf_mlp(act=act, bias_first=bias_first), rewrites=1)


def test_tf2onnx_dense_float16():
    optimized(tf_mlp(dtype=np.float16), rewrites=1, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("target", ["const", "shape"])
def test_tf2onnx_three_dense_layers_fold_into_one(target):
    result = optimized(tf_mlp(dims=(8, 32, 32, 6), target=target), rewrites=2)
    assert count_ops(result.model, "MatMul") == 1


def test_tf2onnx_reshape_that_changes_the_feature_dim_is_left():
    """MatMul → Reshape(to last dim 16, not 32) → Add: the Add is no bias of the MatMul's features."""
    b = Builder()
    (flat,) = b.node("Reshape", ["x", b.const([-1, 8], dtype=I64)])
    (mm,) = b.node("MatMul", [flat, b.const(b.weights(8, 32))])
    (back,) = b.node("Reshape", [mm, b.const([-1, 6, 16], dtype=I64)])
    (h,) = b.node("Add", [back, b.const(b.rng.standard_normal(16))])
    h = b.prelu(h, 1.0)
    (flat2,) = b.node("Reshape", [h, b.const([-1, 32], dtype=I64)])
    (y,) = b.node("MatMul", [flat2, b.const(b.weights(32, 8))])
    reasons = left(b.model([("x", ["N", 3, 8])], [(y, ["N", 8])]))
    assert any("does not keep the last dim 32" in r for r in reasons), reasons


def test_tf2onnx_reshape_between_layers_that_changes_the_feature_dim_is_left():
    b = Builder()
    h = b.prelu(tf_dense(b, "x", 8, 32, 3), 1.0)
    (flat,) = b.node("Reshape", [h, b.const([-1, 16], dtype=I64)])
    (y,) = b.node("MatMul", [flat, b.const(b.weights(16, 8))])
    reasons = left(b.model([("x", ["N", 3, 8])], [(y, ["N", 8])]))
    assert any("shapes do not chain" in r for r in reasons), reasons


# --- pointwise convolutions -----------------------------------------------------------------------------


def conv(b: Builder, x: str, c_in: int, c_out: int, spatial: int = 2, bias: bool = True, **attrs) -> str:
    k = attrs.pop("kernel", 1)
    w = b.const(b.weights(c_out, c_in, *([k] * spatial)) * np.sqrt(c_out / c_in))
    inputs = [x, w] + ([b.const(b.rng.standard_normal(c_out) * 0.1)] if bias else [])
    return b.node("Conv", inputs, **attrs)[0]


def batchnorm(b: Builder, x: str, c: int, **attrs) -> str:
    scale, shift = b.rng.uniform(0.5, 2, c), b.rng.uniform(-1, 1, c)
    mean, var = b.rng.uniform(-1, 1, c), b.rng.uniform(0.5, 2, c)
    return b.node("BatchNormalization", [x] + [b.const(v) for v in (scale, shift, mean, var)], **attrs)[0]


def conv_block(c_in=8, hidden=32, c_out=8, spatial=2, bn=True, act="prelu", slope=1.0, slope_shape=(1,),
               dtype=np.float32, opset=17, first=None, second=None, bn_after=False):
    b = Builder(dtype)
    h = conv(b, "x", c_in, hidden, spatial, **(first or {}))
    if bn:
        h = batchnorm(b, h, hidden)
    if act == "prelu":
        h = b.prelu(h, slope, slope_shape)
    elif act == "leaky":
        (h,) = b.node("LeakyRelu", [h], alpha=slope)
    y = conv(b, h, hidden, c_out, spatial, **(second or {}))
    if bn_after:
        y = batchnorm(b, y, c_out)
    dims = [4, 5, 6][:spatial]
    return b.model([("x", ["N", c_in, *dims])], [(y, ["N", c_out, *dims])], opset=opset)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("slope_shape", [(1,), (32, 1, 1), (1, 32, 1, 1), (1, 1, 1)])
def test_pointwise_conv_block_collapses_into_one_conv(bn, slope_shape):
    result = optimized(conv_block(bn=bn, slope_shape=slope_shape), rewrites=1, seeds=(0, 1, 2), rtol=1e-4)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    (w,) = [t for t in result.model.graph.initializer if len(t.dims) == 4]
    assert list(w.dims) == [8, 8, 1, 1]


@pytest.mark.parametrize("opset", [13, 15, 18, 21])
@pytest.mark.parametrize("act", ["leaky", "none"])
def test_pointwise_conv_across_opsets_and_activations(opset, act):
    optimized(conv_block(opset=opset, act=act), rewrites=1, rtol=1e-4)


def test_pointwise_conv_float16():
    optimized(conv_block(dtype=np.float16), rewrites=1, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("spatial", [1, 3])
def test_pointwise_conv_1d_and_3d(spatial):
    slope = (32,) + (1,) * spatial
    result = optimized(conv_block(spatial=spatial, slope_shape=slope), rewrites=1, rtol=1e-4)
    assert count_ops(result.model, "Conv") == 1


@pytest.mark.parametrize("attrs", [{"auto_pad": "VALID"}, {"auto_pad": "SAME_UPPER"}, {"dilations": [2, 2]},
                                   {"pads": [0, 0, 0, 0], "strides": [1, 1], "group": 1, "kernel_shape": [1, 1]}])
def test_pointwise_conv_attributes_that_change_nothing(attrs):
    optimized(conv_block(first=attrs, second=dict(attrs)), rewrites=1, rtol=1e-4)


def test_batchnorm_after_the_second_conv_folds_too_and_no_bias():
    result = optimized(conv_block(bn_after=True, first={"bias": False}, second={"bias": False}), rewrites=1,
                       rtol=1e-4)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


def test_three_pointwise_convs_fold_into_one():
    b = Builder()
    h = conv(b, "x", 8, 32)
    h = conv(b, b.prelu(batchnorm(b, h, 32), 1.0, (32, 1, 1)), 32, 32)
    y = conv(b, b.prelu(h, 1.0), 32, 4)
    result = optimized(b.model([("x", ["N", 8, 5, 5])], [(y, ["N", 4, 5, 5])]), rewrites=2, rtol=1e-4)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


@pytest.mark.parametrize("first,why", [
    ({"pads": [1, 1, 1, 1]}, "pads"),
    ({"strides": [2, 2]}, "strides"),
    ({"kernel": 3}, "kernel"),
])
def test_conv_that_is_not_pointwise_is_left(first, why):
    b = Builder()
    h = b.prelu(conv(b, "x", 8, 32, **first), 1.0)
    w2 = b.const(b.weights(8, 32, 1, 1))
    (y,) = b.node("Conv", [h, w2])
    model = b.model([("x", ["N", 8, 4, 4])], [(y, ["N", 8, None, None])])
    reasons = left(model)
    assert any(why in r for r in reasons), reasons


def test_conv_with_groups_and_fitting_weight_is_left():
    b = Builder()
    h = b.prelu(b.node("Conv", ["x", b.const(b.weights(32, 4, 1, 1))], group=2)[0], 1.0)
    y = conv(b, h, 32, 8)
    reasons = left(b.model([("x", ["N", 8, 4, 4])], [(y, ["N", 8, 4, 4])]))
    assert any("2 groups" in r for r in reasons), reasons


def test_batchnorm_with_running_statistics_outputs_is_not_folded():
    b = Builder()
    h = conv(b, "x", 8, 32)
    b.nodes.append(helper.make_node("BatchNormalization", [h] + [b.const(np.ones(32)) for _ in range(4)],
                                    ["bn_y", "bn_mean", "bn_var"], name="bn", training_mode=1))
    y = conv(b, b.prelu("bn_y", 1.0), 32, 8)
    model = b.model([("x", [2, 8, 4, 4])], [(y, [2, 8, 4, 4])], opset=15)
    assert any("training" in r for r in inspect_reasons(model))


def test_batchnorm_with_a_computed_parameter_is_not_folded():
    b = Builder()
    h = conv(b, "x", 8, 32)
    (scale,) = b.node("Abs", [b.const(b.rng.uniform(0.5, 2, 32))])
    (h,) = b.node("BatchNormalization", [h, scale] + [b.const(v) for v in (np.zeros(32), np.zeros(32),
                                                                             np.ones(32))])
    y = conv(b, b.prelu(h, 1.0), 32, 8)
    reasons = left(b.model([("x", ["N", 8, 4, 4])], [(y, ["N", 8, 4, 4])]))
    assert any("not a constant" in r for r in reasons), reasons


def test_per_channel_slope_along_the_wrong_axis_is_left():
    """A slope of shape (32,) broadcasts along the last axis (W), not the channels: on W = 1 it would grow the
    output (ONNX Runtime broadcasts both ways), so removing it would change a shape."""
    b = Builder()
    h = b.prelu(conv(b, "x", 8, 32), 1.0, (32,))
    y = conv(b, h, 32, 8)
    reasons = inspect_reasons(b.model([("x", ["N", 8, 4, 1])], [(y, ["N", 8, 4, None])]))
    assert any("may not fit" in r for r in reasons), reasons


def test_conv_then_matmul_is_left():
    b = Builder()
    h = b.prelu(conv(b, "x", 8, 8), 1.0)
    y = b.linear(h, 8, 8)  # a MatMul over the last axis (W), not the channels
    reasons = left(b.model([("x", ["N", 8, 4, 8])], [(y, ["N", 8, 4, 8])]))
    assert any("map different axes" in r for r in reasons), reasons


def exported_and_optimized(model, x, path, dynamo: bool):
    """A torch model prepared by lc_onnx.train, exported and optimized (one rewrite, checked in ORT on `x`);
    returns the result and the feeds by the exported input's name."""
    from lc_onnx import train

    train.export(model, (x,), path, dynamo=dynamo)
    exported = onnx.load(path)
    feeds = {exported.graph.input[0].name: x.numpy()}
    return optimized(exported, rewrites=1, feeds=feeds, rtol=1e-4, atol=1e-5), feeds


def test_prepared_torch_conv_block_exports_and_collapses(tmp_path):
    """What lc_onnx.train prepares on the torch side (Conv2d 1x1 → BatchNorm2d → act → Conv2d 1x1) collapses
    here, through both exporters, per-channel slopes included."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from lc_onnx import train

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6)
    for dynamo, per_channel in ((False, True), (True, False)):
        model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.SiLU(), nn.Conv2d(32, 8, 1)).eval()
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
        train.prepare(model, (x,), per_channel=per_channel)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.PReLU):
                    m.weight.fill_(1.0)
            expected = model(x).numpy()
        result, feeds = exported_and_optimized(model, x, tmp_path / f"conv_{dynamo}.onnx", dynamo)
        assert [n.op_type for n in result.model.graph.node] == ["Conv"]
        np.testing.assert_allclose(run(result.model, feeds)[0], expected, rtol=1e-4, atol=1e-5)


# --- weights behind Transpose / Cast / Identity ---------------------------------------------------------


def albert_like(shared_transpose: bool, opset: int = 17, dtype=np.float32):
    """One MLP (d → h → d, PRelu(1)) run twice on its own output, its weights stored (out, in) and read as
    Transpose(initializer), as the dynamo exporter writes a weight two calls share."""
    b = Builder(dtype)
    w1 = b.const(b.weights(32, 8), "fc1.weight")
    w2 = b.const(b.weights(8, 32), "fc2.weight")
    t1, t2 = b.node("Transpose", [w1], perm=[1, 0])[0], b.node("Transpose", [w2], perm=[1, 0])[0]
    h = "x"
    for _ in range(2):
        if not shared_transpose:
            t1, t2 = b.node("Transpose", [w1], perm=[1, 0])[0], b.node("Transpose", [w2])[0]
        h = b.linear(b.prelu(b.linear(h, 8, 32, weight=t1), 1.0), 32, 8, weight=t2)
        (h,) = b.node("Relu", [h])  # between the calls: no chain across
    return b.model([("x", ["N", 3, 8])], [(h, ["N", 3, 8])], opset=opset)


@pytest.mark.parametrize("shared_transpose,opset,dtype", [(True, 17, np.float32), (False, 17, np.float32),
                                                          (True, 13, np.float32), (True, 21, np.float32),
                                                          (True, 18, np.float16)])
def test_weights_behind_transpose_of_a_shared_initializer(shared_transpose, opset, dtype):
    model = albert_like(shared_transpose, opset, dtype)
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    tol = 1e-5 if dtype == np.float32 else 2e-2
    result = optimized(model, rewrites=2, seeds=(0, 1, 2), rtol=tol, atol=tol)
    assert count_ops(result.model, "PRelu") == 0 and count_ops(result.model, "MatMul") == 2
    for t in model.graph.initializer:  # the input's shared initializers are untouched
        np.testing.assert_array_equal(numpy_helper.to_array(t), before[t.name])


def test_identity_transpose_perm_is_read():
    b = Builder()
    (w,) = b.node("Transpose", [b.const(b.weights(8, 32))], perm=[0, 1])
    (w,) = b.node("Identity", [w])
    y = b.linear(b.prelu(b.linear("x", 8, 32, weight=w), 1.0), 32, 8)
    optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1)


@pytest.mark.parametrize("stored", [np.float16, np.float64])
def test_weight_behind_a_float_cast(stored):
    """fp16 storage cast up (or float64 cast down) to the compute dtype: read with the cast's rounding."""
    b = Builder()
    (w,) = b.node("Cast", [b.const(b.weights(32, 8), dtype=stored)], to=TensorProto.FLOAT)
    (w,) = b.node("Transpose", [w])
    (bias,) = b.node("Cast", [b.const(b.rng.standard_normal(32), dtype=stored)], to=TensorProto.FLOAT)
    (h,) = b.node("MatMul", ["x", w])
    (h,) = b.node("Add", [h, bias])
    y = b.linear(b.prelu(h, 1.0), 32, 8)
    result = optimized(b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])]), rewrites=1, rtol=1e-5)
    assert count_ops(result.model, "Cast") == 0


def test_double_cast_keeps_the_inner_rounding():
    """float32 → float16 → float32: the weight the graph uses is the float16-rounded one."""
    b = Builder()
    (w,) = b.node("Cast", [b.const(b.weights(8, 32))], to=TensorProto.FLOAT16)
    (w,) = b.node("Cast", [w], to=TensorProto.FLOAT)
    y = b.linear(b.prelu(b.linear("x", 8, 32, weight=w), 1.0), 32, 8)
    optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1, rtol=1e-6, atol=1e-6)


def test_a_cast_that_overflows_to_inf_is_left_without_a_warning():
    """float32 1e6 → float16 is inf, as in ONNX Runtime: the weight is read (quietly) and the chain left for it."""
    b = Builder()
    (w,) = b.node("Cast", [b.const(np.full((8, 32), 1e6, np.float32))], to=TensorProto.FLOAT16)
    (w,) = b.node("Cast", [w], to=TensorProto.FLOAT)
    y = b.linear(b.prelu(b.linear("x", 8, 32, weight=w), 1.0), 32, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        reasons = left(b.model([("x", ["N", 8])], [(y, ["N", 8])]))
    assert any("inf" in r or "finite" in r for r in reasons), reasons


def test_cast_through_integers_is_left():
    """float → int32 → float truncates the weight: not read as a constant, and the reason says why."""
    b = Builder()
    (w,) = b.node("Cast", [b.const(b.weights(8, 32) * 4)], to=TensorProto.INT32)
    (w,) = b.node("Cast", [w], to=TensorProto.FLOAT)
    y = b.linear(b.prelu(b.linear("x", 8, 32, weight=w), 1.0), 32, 8)
    reasons = left(b.model([("x", ["N", 8])], [(y, ["N", 8])]))
    assert any("only casts between float16/32/64" in r for r in reasons), reasons


def test_transpose_of_a_rank_three_constant_is_left():
    """Transpose with perm (0, 2, 1) of a (1, 8, 32)... → a rank-3 weight: a batched product, not a layer."""
    b = Builder()
    (w,) = b.node("Transpose", [b.const(b.weights(1, 32, 8))], perm=[0, 2, 1])
    (h,) = b.node("MatMul", ["x", w])
    y = b.linear(b.prelu(h, 1.0), 32, 8)
    reasons = left(b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])]))
    assert any("rank 3" in r for r in reasons), reasons


def test_double_to_half_cast_rounds_as_onnx_runtime_does():
    """ONNX Runtime casts float64 to float16 through float32 (two roundings): values just above a half-ulp tie
    round differently than one direct rounding would. The weight read must be the one the graph uses."""
    b = Builder(np.float16)
    w = b.weights(8, 32).astype(np.float16).astype(np.float64)
    w += np.spacing(w.astype(np.float16)).astype(np.float64) / 2 + 1e-12 * np.abs(w)
    (wc,) = b.node("Cast", [b.const(w, dtype=np.float64)], to=TensorProto.FLOAT16)
    y = b.linear(b.prelu(b.linear("x", 8, 32, weight=wc, bias=False), 1.0), 32, 8, bias=False)
    model = b.model([("x", ["N", 8])], [(y, ["N", 8])])
    optimized(model, rewrites=1, rtol=2e-2, atol=2e-2)
    graph = gs.import_onnx(model)
    view = _view(next(n for n in graph.nodes if n.op == "Cast").outputs[0])
    assert isinstance(view, ConstView)
    ref = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16)], "g",
        [helper.make_tensor_value_info("a", TensorProto.DOUBLE, [8, 32])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT16, [8, 32])]), ir_version=8,
        opset_imports=[helper.make_opsetid("", 17)])
    np.testing.assert_array_equal(view.read(), run(ref, {"a": w})[0])


# --- a BatchNormalization after the unit activation, folded into the second layer's input side -----------


def bn_after_act_block(kind="conv", slope=1.0, bn_attrs=None, bn_outputs=1, computed=False, bn_is_output=False,
                       bn_fan_out=False, opset=17):
    """`Conv1x1 → PRelu → BatchNormalization → Conv1x1` (per-channel slopes), or 2-D `Gemm → PRelu → BN → Gemm`."""
    b = Builder()
    conv_ = kind == "conv"
    h = conv(b, "x", 8, 32) if conv_ else b.linear("x", 8, 32, "gemm")
    h = b.prelu(h, slope, (32, 1, 1) if conv_ else (32,))
    params = [b.const(v) for v in (b.rng.uniform(0.5, 2, 32), b.rng.uniform(-1, 1, 32), b.rng.uniform(-1, 1, 32),
                                   b.rng.uniform(0.5, 2, 32))]
    if computed:
        (params[0],) = b.node("Abs", [params[0]])
    outs = b.node("BatchNormalization", [h] + params, n_out=bn_outputs, **(bn_attrs or {}))
    h = outs[0]
    y = conv(b, h, 32, 4) if conv_ else b.linear(h, 32, 4, "gemm", trans_b=True)
    shape = ["N", 8, 4, 5] if conv_ else ["N", 8]
    out_shape = ["N", 4, 4, 5] if conv_ else ["N", 4]
    outputs = [(y, out_shape)]
    hidden = ["N", 32, 4, 5] if conv_ else ["N", 32]
    if bn_is_output:
        outputs.append((h, hidden))
    if bn_fan_out:
        outputs.append((b.node("Relu", [h])[0], hidden))
    return b.model([("x", shape)], outputs, opset=opset)


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_batchnorm_after_the_activation_folds_into_the_second_layer(kind):
    result = optimized(bn_after_act_block(kind), rewrites=1, seeds=(0, 1, 2), rtol=1e-4)
    assert [n.op_type for n in result.model.graph.node] == ["Conv" if kind == "conv" else "Gemm"]


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_batchnorm_after_an_activation_outside_tolerance_is_kept(kind):
    reasons = left(bn_after_act_block(kind, slope=0.7))
    assert any("outside tolerance" in r for r in reasons), reasons


@pytest.mark.parametrize("kind", ["conv", "gemm"])
@pytest.mark.parametrize("form,why", [
    (dict(bn_attrs={"training_mode": 1}, bn_outputs=3), "training"),
    (dict(computed=True), "not a constant"),
])
def test_batchnorm_after_the_activation_in_training_form_or_computed_is_left(kind, form, why):
    model = bn_after_act_block(kind, opset=15, **form)
    reasons = inspect_reasons(model)
    assert any(why in r for r in reasons), reasons
    if not form.get("bn_attrs"):  # ONNX Runtime runs the inference forms only
        assert not chain_rewrites(optimized(model))


@pytest.mark.parametrize("kind", ["conv", "gemm"])
@pytest.mark.parametrize("where", ["bn_is_output", "bn_fan_out"])
def test_batchnorm_after_the_activation_read_elsewhere_is_left(kind, where):
    model = bn_after_act_block(kind, **{where: True})
    result = optimized(model)
    assert count_ops(result.model, "BatchNormalization") == 1
    assert "collapse_linear_chain" not in chain_rewrites(result)


def test_prepared_torch_linear_act_batchnorm1d_linear_exports_and_collapses(tmp_path):
    """`nn.Linear → GELU → nn.BatchNorm1d → nn.Linear`, prepared by lc_onnx.train (BN after the unit activation,
    random running statistics), collapses through both exporters into one layer computing what torch does."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from lc_onnx import train

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for dynamo in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.BatchNorm1d(32), nn.Linear(32, 4)).eval()
        with torch.no_grad():
            model[2].running_mean.uniform_(-1, 1)
            model[2].running_var.uniform_(0.5, 2)
            model[2].weight.uniform_(0.5, 2)
            model[2].bias.uniform_(-1, 1)
        train.prepare(model, (x,), init=1.0)
        model.eval()
        with torch.no_grad():
            expected = model(x).numpy()
        result, feeds = exported_and_optimized(model, x, tmp_path / f"bn1d_{dynamo}.onnx", dynamo)
        assert count_ops(result.model, "BatchNormalization") == 0
        assert sum(n.op_type in ("Gemm", "MatMul") for n in result.model.graph.node) == 1
        got = run(result.model, feeds)[0]
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)

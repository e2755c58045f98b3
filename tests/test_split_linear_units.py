"""split_linear_units: per-unit slopes where only some units are linear split into one direct map for those
units beside a narrower MLP for the rest, where that costs fewer MACs than the block."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lc_onnx
from tests.builder import Builder, conv_mlp, mlp, tf_dense
from tests.harness import count_ops, optimized


def slopes(h=32, off=(3, 17), value=0.25, rng_off=False):
    s = np.ones(h)
    s[list(off)] = np.random.default_rng(0).uniform(-0.5, 0.5, len(off)) if rng_off else value
    return s


def rules(result) -> list[str]:
    return [r.rule for r in result.report.rewrites]


@pytest.mark.parametrize("rank,slope_shape,kind", [
    (3, (32,), "matmul"), (3, (1, 1, 32), "matmul"), (2, (1, 32), "matmul"), (4, (32,), "matmul"),
    (2, (1, 32), "gemm"),  # Gemm is 2-D only
])
def test_splits_and_stays_exact(rank, slope_shape, kind):
    model = mlp(d_in=8, hidden=32, d_out=8, rank=rank, slope=slopes(), slope_shape=slope_shape, kind=kind)
    result = optimized(model, rewrites=1, seeds=(0, 1, 2))
    (r,) = result.report.rewrites
    assert r.rule == "split_linear_units" and r.error_coefficient == 0
    assert (r.macs_before, r.macs_after) == (32 * 16, 8 * 8 + 2 * 16)
    assert "30 of 32 units within tolerance" in r.note
    (prelu,) = [n for n in result.model.graph.node if n.op_type == "PRelu"]
    (left,) = result.report.skipped  # the narrow MLP that stays, with why
    assert "outside tolerance" in left.reason and left.shape == (8, 2, 8)
    assert prelu.name in left.names


def test_one_unit_left():
    """The one unit left is a PRelu of one slope: the same run makes it a LeakyRelu (the new tensors carry
    their shapes, so its rank is known), and a second run changes nothing."""
    result = optimized(mlp(slope=slopes(off=(5,)), slope_shape=(32,)), rewrites=1)
    assert rules(result) == ["split_linear_units", "prelu_to_leaky_relu"]
    assert count_ops(result.model, "LeakyRelu") == 1 and result.report.skipped[0].shape == (8, 1, 8)
    assert not lc_onnx.optimize(result.model).report.rewrites


def test_near_one_units_state_their_error():
    s = slopes() + np.where(slopes() == 1, 4e-4, 0)
    (r, *_) = optimized(mlp(slope=s, slope_shape=(32,)), rewrites=1, rtol=1e-2, atol=1e-2).report.rewrites
    assert r.rule == "split_linear_units" and r.slope_range == pytest.approx((1.0004, 1.0004))
    assert r.error_coefficient > 0


def test_random_off_slopes_no_bias_bias_first():
    model = mlp(slope=slopes(off=range(0, 32, 4), rng_off=True), slope_shape=(32,), bias=False)
    optimized(model, rewrites=1, seeds=(0, 1, 2))
    optimized(mlp(slope=slopes(), slope_shape=(32,), bias_first=True), rewrites=1)


def test_float16():
    optimized(mlp(slope=slopes(), slope_shape=(32,), dtype=np.float16), rewrites=1, rtol=2e-2, atol=2e-2)


# --- must not fire --------------------------------------------------------------------------------------


def test_split_that_would_not_save_macs():
    # 32 -> 32 -> 32: 1024 MACs/row for the direct map + 64 per unit kept; 16 linear units of 32 save nothing
    s = np.ones(32)
    s[:16] = 0.5
    result = optimized(mlp(d_in=32, hidden=32, d_out=32, slope=s, slope_shape=(32,)), rewrites=0)
    (left,) = result.report.skipped
    assert "outside tolerance" in left.reason and "split_linear_units: 16 of 32 units" in left.reason
    assert "would not save" in left.reason and "at least 17 linear units" in left.reason


def test_slopes_outside_tol_on_every_channel():
    result = optimized(mlp(slope=np.full(32, 0.5), slope_shape=(32,)), rewrites=0, skip=("prelu_to_leaky_relu",))
    (left,) = result.report.skipped
    assert "outside tolerance" in left.reason and "split" not in left.reason


def test_scalar_slope_is_no_split():
    assert not optimized(mlp(slope=0.5), rewrites=0, skip=("prelu_to_leaky_relu",)).report.rewrites


def test_slope_per_channel_of_another_axis():
    b = Builder()
    h = b.linear("x", 8, 32)
    (h,) = b.node("PRelu", [h, b.const(np.where(np.arange(3) == 0, 0.5, 1.0).reshape(3, 1))])
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])])
    assert "split_linear_units" not in rules(lc_onnx.optimize(model, validate=False))


def test_hidden_read_elsewhere():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), slopes(), (32,))
    y = b.linear(h, 32, 8)
    (side,) = b.node("Neg", [h])
    model = b.model([("x", ["N", 8])], [(y, ["N", 8]), (side, ["N", 32])])
    assert not optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",)).report.rewrites


def test_shared_weights_that_would_grow_the_model():
    b = Builder()
    # 32 -> 32 -> 8, 2 units off: 336 MACs/row against 1280, but W_A stays (another block reads it), so the
    # 348 new parameters replace only W_B and the biases (296)
    w = b.const(b.weights(32, 32))
    y = b.linear(b.prelu(b.linear("x", 32, 32, weight=w), slopes(), (32,)), 32, 8)
    y2 = b.linear(b.prelu(b.linear("x", 32, 32, weight=w), 0.5), 32, 8)
    model = b.model([("x", ["N", 32])], [(y, ["N", 8]), (y2, ["N", 8])])
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    assert any("grows the model" in c.reason for c in result.report.skipped)
    result = optimized(model, rewrites=1, skip=("prelu_to_leaky_relu",), allow_growth=True)
    assert "allowed by --allow-growth" in result.report.rewrites[0].note


def test_skip_by_name():
    model = mlp(slope=slopes(), slope_shape=(32,))
    assert not lc_onnx.optimize(model, skip=("split_linear_units",), validate=False).report.rewrites


def test_split_in_a_subgraph_reading_a_weight_through_an_outer_node():
    """The then-branch's block reads its first weight through a Transpose of the outer graph: once split, that
    Transpose is unread but is the outer graph's to clean up (it was unhooked and left there, no inputs, no outputs)."""
    from tests.test_eliminate_unit_activation import if_feeds, if_model

    b = Builder()
    (wt,) = b.node("Transpose", [b.const(b.weights(32, 8))])
    at = len(b.nodes)
    model = if_model(b, at, b.linear(b.prelu(b.linear("x", 8, 32, weight=wt), slopes(), (32,)), 32, 8))
    for cond in (True, False):
        result = optimized(model, rewrites=1, feeds=if_feeds(cond))
        assert rules(result) == ["split_linear_units"]
    assert count_ops(result.model, "Transpose") == 0  # the outer graph is cleaned up too


# --- pointwise convolutions (units = channels) and BatchNormalization ---------------------------------------


def conv_slopes(h=32, off=(3, 17), value=0.25):
    return slopes(h, off, value)


def conv_ops(result) -> list[str]:
    return [n.op_type for n in result.model.graph.node]


@pytest.mark.parametrize("spatial,slope_shape,bias,bn,opset", [
    (2, None, True, None, 17), (2, (1, 32, 1, 1), True, None, 13), (2, None, False, None, 21),
    (1, None, True, None, 17), (1, (1, 32, 1), False, None, 13), (3, None, True, None, 18),
    (2, None, True, "before", 17), (2, None, False, "after", 17), (2, (1, 32, 1, 1), True, "after", 13),
    (1, None, False, "before", 21),
])
def test_conv_block_splits_and_stays_exact(spatial, slope_shape, bias, bn, opset):
    """Conv1x1 → PRelu(per channel) → Conv1x1 (1-, 2-, 3-D; a BatchNormalization before or after the activation
    folded in): three pointwise Convs and the sum, equal to the block in ONNX Runtime."""
    model = conv_mlp(spatial=spatial, slope=conv_slopes(), slope_shape=slope_shape, bias=bias, bn=bn, opset=opset)
    result = optimized(model, rewrites=1, seeds=(0, 1, 2))
    (r,) = result.report.rewrites
    assert r.rule == "split_linear_units" and r.error_coefficient == 0 and r.shape == (8, 32, 8)
    assert (r.macs_before, r.macs_after) == (32 * 16, 8 * 8 + 2 * 16)
    assert conv_ops(result) == ["Conv", "Conv", "PRelu", "Conv", "Add", "Identity"]
    prelu = next(n for n in result.model.graph.node if n.op_type == "PRelu")
    kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == prelu.input[1]))
    want = list(slope_shape or (32,) + (1,) * spatial)
    want[want.index(32)] = 2
    assert list(kept.shape) == want and kept.reshape(-1).tolist() == [0.25, 0.25]  # channels 3 and 17, in place
    (left,) = result.report.skipped
    assert left.shape == (8, 2, 8) and "outside tolerance" in left.reason


def test_conv_split_channels_in_order():
    """Off channels with distinct slopes: the narrow PRelu gets each channel's own slope (read on axis 1), and the
    direct map takes exactly the others; checked against ONNX Runtime."""
    s = np.ones(32)
    s[[0, 9, 30]] = [0.1, -0.3, 0.6]
    result = optimized(conv_mlp(slope=s), rewrites=1, seeds=(0, 1, 2))
    prelu = next(n for n in result.model.graph.node if n.op_type == "PRelu")
    kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == prelu.input[1]))
    np.testing.assert_allclose(kept.reshape(-1), [0.1, -0.3, 0.6], rtol=1e-6)


def test_conv_float16():
    optimized(conv_mlp(slope=conv_slopes(), dtype=np.float16), rewrites=1, rtol=2e-2, atol=2e-2)
    optimized(conv_mlp(slope=conv_slopes(), dtype=np.float16, bn="after", opset=13), rewrites=1, rtol=3e-2,
              atol=3e-2)


def test_conv_near_one_channels_state_their_error():
    s = conv_slopes() + np.where(conv_slopes() == 1, 4e-4, 0)
    (r, *_) = optimized(conv_mlp(slope=s), rewrites=1, rtol=1e-2, atol=1e-2).report.rewrites
    assert r.rule == "split_linear_units" and r.slope_range == pytest.approx((1.0004, 1.0004))
    assert r.error_coefficient > 0


def test_conv_one_channel_left():
    """One channel left: its PRelu (slope [1, 1, 1]) becomes a LeakyRelu in the same run; a second run changes
    nothing."""
    result = optimized(conv_mlp(slope=conv_slopes(off=(5,))), rewrites=1)
    assert rules(result) == ["split_linear_units", "prelu_to_leaky_relu"]
    assert count_ops(result.model, "LeakyRelu") == 1
    assert not lc_onnx.optimize(result.model).report.rewrites


def test_conv_dilation_of_a_1x1_kernel_is_no_near_miss():
    """A dilated 1x1 kernel reads one position, as an undilated one does (the chain rule takes it too)."""
    model = conv_mlp(slope=conv_slopes(), first={"dilations": [2, 2]}, second={"dilations": [3, 3]})
    assert rules(optimized(model, rewrites=1)) == ["split_linear_units"]


@pytest.mark.parametrize("bn", ["before", "after"])
def test_gemm_with_batchnorm1d_splits(bn):
    """2-D Gemm → [BN] → PRelu → [BN] → Gemm (torch's BatchNorm1d beside the activation)."""
    b = Builder()
    h = b.linear("x", 8, 32, "gemm")
    h = b.batchnorm(h, 32) if bn == "before" else h
    h = b.prelu(h, slopes(), (32,))
    h = b.batchnorm(h, 32) if bn == "after" else h
    y = b.linear(h, 32, 8, "gemm", trans_b=True)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1, seeds=(0, 1, 2))
    assert rules(result) == ["split_linear_units"] and count_ops(result.model, "BatchNormalization") == 0


def test_reshape_between_2d_layers_splits():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, "gemm"), slopes(), (32,))
    (h,) = b.node("Reshape", [h, b.const([-1, 32], dtype=np.int64)])
    y = b.linear(h, 32, 8, "gemm")
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1, seeds=(0, 1, 2))
    assert rules(result) == ["split_linear_units"]


def test_inspect_lists_the_conv_split(tmp_path):
    from click.testing import CliRunner

    from lc_onnx.cli import main

    model = conv_mlp(slope=conv_slopes(), bn="after")
    found = [c for c in lc_onnx.inspect(model) if c.kind == "chain"]
    assert [c.rule for c in found] == ["split_linear_units"] and found[0].shape == (8, 32, 8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "split_linear_units" in out


@pytest.mark.parametrize("bn", [None, "before"])
def test_mac_share_of_a_conv_split(tmp_path, bn):
    """bench's MAC share counts a Conv split as its direct map and narrow MLP: what the optimized model holds."""
    from lc_onnx import bench

    model = conv_mlp(slope=conv_slopes(), bn=bn)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    shapes = {"x": [2, 8, 4, 5]}
    share = bench.mac_share(onnx.load(path), shapes, lc_onnx.inspect(path))
    found, unknown = bench.node_macs(lc_onnx.optimize(path).model, shapes)
    rows = 2 * 4 * 5
    assert unknown == [] and share.unsaved == 0 and share.chain_count == 1
    assert share.total == rows * 512 and share.after == rows * (64 + 2 * 16) == sum(m for _, m in found.values())


# --- Conv near misses: must not fire ----------------------------------------------------------------------


@pytest.mark.parametrize("first,second,why", [
    ({"kernel": 3}, None, "kernel"),
    (None, {"kernel": 3}, "kernel"),
    ({"strides": [2, 2]}, None, "strides"),
    (None, {"strides": [2, 2]}, "strides"),
    ({"pads": [1, 1, 1, 1]}, None, "pads"),
    ({"group": 2}, None, "2 groups"),
    (None, {"group": 4}, "4 groups"),
    ({"kernel": 3, "dilations": [2, 2]}, None, "kernel"),
])
def test_conv_that_is_not_pointwise_is_not_split(first, second, why):
    model = conv_mlp(slope=conv_slopes(), first=first, second=second, size=(7, 8))
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    assert not result.report.rewrites
    assert any(why in c.reason for c in result.report.skipped), [c.reason for c in result.report.skipped]


@pytest.mark.parametrize("slope_shape,size", [
    ((32,), (4, 32)),  # on W (axis 3), which is 32 wide: it fits the input, but not the channels
    ((32, 1), (32, 5)),  # on H
    ((32, 4, 5), (4, 5)),  # per channel and position
    ((1, 1, 1, 32), (4, 32)),
])
def test_conv_slope_on_another_axis_is_refused_with_a_reason(slope_shape, size, tmp_path):
    from click.testing import CliRunner

    from lc_onnx.cli import main

    s = np.ones(int(np.prod(slope_shape)))
    s[[3, 17]] = 0.25
    model = conv_mlp(slope=s, slope_shape=slope_shape, size=size)
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    reasons = [c.reason for c in result.report.skipped]
    assert any("split_linear_units" in r and "not one slope per unit" in r and "axis 1" in r for r in reasons), reasons
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert "not one slope per unit" in CliRunner().invoke(main, ["inspect", str(path)]).output


def test_matmul_slope_on_another_axis_is_refused_with_a_reason():
    b = Builder()
    h = b.linear("x", 8, 32)
    (h,) = b.node("PRelu", [h, b.const(np.where(np.arange(3) == 0, 0.5, 1.0).reshape(3, 1))])
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])])
    reasons = [c.reason for c in lc_onnx.inspect(model) if c.kind == "chain"]
    assert any("not one slope per unit" in r and "the last axis" in r for r in reasons), reasons


def test_conv_hidden_read_elsewhere():
    b = Builder()
    h = b.prelu(b.conv("x", 8, 32), conv_slopes().reshape(32, 1, 1), (32, 1, 1))
    y = b.conv(h, 32, 8)
    (side,) = b.node("Neg", [h])
    model = b.model([("x", ["N", 8, 4, 5])], [(y, ["N", 8, 4, 5]), (side, ["N", 32, 4, 5])])
    assert not optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",)).report.rewrites


def test_conv_weight_is_a_graph_input():
    from onnx import TensorProto, helper

    b = Builder()
    h = b.prelu(b.node("Conv", ["x", "w"])[0], conv_slopes().reshape(32, 1, 1), (32, 1, 1))
    y = b.conv(h, 32, 8)
    model = b.model([("x", ["N", 8, 4, 5])], [(y, ["N", 8, 4, 5])])
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [32, 8, 1, 1]))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 4, 5)).astype(np.float32),
             "w": np.random.default_rng(1).standard_normal((32, 8, 1, 1)).astype(np.float32)}
    result = optimized(model, rewrites=0, feeds=feeds, skip=("prelu_to_leaky_relu",))
    assert not result.report.rewrites
    assert any("not a constant" in c.reason for c in result.report.skipped)


def test_conv_then_matmul_is_not_split():
    b = Builder()
    h = b.prelu(b.conv("x", 8, 8), slopes(8, off=(1,)).reshape(8, 1, 1), (8, 1, 1))
    y = b.linear(h, 8, 8)  # over the last axis (W), not the channels
    model = b.model([("x", ["N", 8, 4, 8])], [(y, ["N", 8, 4, 8])])
    assert "split_linear_units" not in rules(optimized(model, skip=("prelu_to_leaky_relu",)))


def test_prepared_torch_conv_block_with_some_channels_at_one_splits(tmp_path):
    """What lc_onnx.train prepares per channel on a pointwise Conv2d block, with some channels trained to 1 (set
    here), exported through both exporters, splits; the split model computes what torch does."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from lc_onnx import train
    from tests.harness import run

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6)
    for dynamo in (False, True):
        model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.GELU(), nn.Conv2d(32, 8, 1)).eval()
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
        train.prepare(model, (x,), per_channel=True)
        with torch.no_grad():
            prelu = next(m for m in model.modules() if isinstance(m, nn.PReLU))
            prelu.weight.fill_(1.0)
            prelu.weight[[2, 11, 29]] = torch.tensor([0.1, -0.2, 0.4])
            expected = model(x).numpy()
        path = tmp_path / f"conv_{dynamo}.onnx"
        train.export(model, (x,), path, dynamo=dynamo)
        exported = onnx.load(path)
        feeds = {exported.graph.input[0].name: x.numpy()}
        result = optimized(exported, rewrites=1, feeds=feeds, rtol=1e-4, atol=1e-5)
        assert rules(result)[0] == "split_linear_units"
        np.testing.assert_allclose(run(result.model, feeds)[0], expected, rtol=1e-4, atol=1e-5)


# --- tf2onnx / Keras dense: Reshape(x, [-1, d]) → MatMul → Reshape(back) → Add ---------------------------------


def tf_block(slope=None, slope_shape=(32,), target="const", dtype=np.float32, opset=17, bias=True, bias_first=False,
             hidden_shape=False, back=None, reader=None, hidden_out=False):
    """Two tf2onnx dense layers 8→32→8 on (N, 3, 8) with a per-unit PRelu between. `hidden_shape` states the
    PRelu input's shape (N, 3, 32); `back` the first dense's back-Reshape target; `reader` "shape" adds a Shape of
    the hidden tensor as a graph output."""
    b = Builder(dtype)
    h = tf_dense(b, "x", 8, 32, target=target, bias=bias, bias_first=bias_first, back=back)
    s = slopes() if slope is None else slope
    p = b.prelu(h, np.asarray(s).reshape(slope_shape) if np.size(s) == np.prod(slope_shape) else s, slope_shape)
    y = tf_dense(b, p, 32, 8, target=target, bias=bias, bias_first=bias_first)
    outs = [(y, ["N", 3, 8])]
    if reader == "shape":
        outs.append((b.node("Shape", [p])[0], [3]))
    if hidden_out:
        outs.append((p, ["N", 3, 32]))
    model = b.model([("x", ["N", 3, 8])], outs, opset)
    if reader == "shape":  # the Shape's output is int64
        model.graph.output[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    if hidden_shape:
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(h, model.graph.input[0].type.tensor_type
                                                                         .elem_type, ["N", 3, 32]))
    return model


def split_rewrites(result) -> list[str]:
    return [r.rule for r in result.report.rewrites if r.rule != "prelu_to_leaky_relu"]


@pytest.mark.parametrize("target", ["const", "shape"])
@pytest.mark.parametrize("opset", [13, 17, 21])
def test_tf2onnx_dense_splits_and_stays_exact(target, opset):
    """The narrow MLP and the direct map on the flattened 2-D input, their sum through the second dense's own
    Reshape and bias; tf2onnx's Shape(hidden) for the back target is rewired to the first dense's target."""
    result = optimized(tf_block(target=target, opset=opset), rewrites=1, seeds=(0, 1, 2))
    (r,) = result.report.rewrites
    assert r.rule == "split_linear_units" and r.error_coefficient == 0 and r.shape == (8, 32, 8)
    assert (r.macs_before, r.macs_after) == (32 * 16, 8 * 8 + 2 * 16)
    ops = [n.op_type for n in result.model.graph.node if n.op_type not in ("Shape", "Slice", "Concat")]
    assert ops.count("Reshape") == 2 and ops[-2:] == ["Reshape", "Add"]  # the input's flatten; the output's
    (prelu,) = [n for n in result.model.graph.node if n.op_type == "PRelu"]
    slope = next(i for i in result.model.graph.initializer if i.name == prelu.input[1])
    assert list(slope.dims) == [2]
    shapes = [n for n in result.model.graph.node if n.op_type == "Shape"]
    assert all(n.input[0] == "x" for n in shapes)  # none reads a tensor of the old block: it died whole


@pytest.mark.parametrize("bias,bias_first", [(False, False), (True, True)])
def test_tf2onnx_dense_without_biases_or_bias_first(bias, bias_first):
    optimized(tf_block(bias=bias, bias_first=bias_first), rewrites=1, seeds=(0, 1, 2))


def test_tf2onnx_dense_float16_and_near_one_slopes():
    optimized(tf_block(dtype=np.float16), rewrites=1, rtol=2e-2, atol=2e-2)
    s = slopes() + np.where(slopes() == 1, 4e-4, 0)
    (r,) = optimized(tf_block(slope=s, opset=13), rewrites=1, rtol=1e-2, atol=1e-2).report.rewrites
    assert r.rule == "split_linear_units" and r.error_coefficient > 0


def test_tf2onnx_dense_rank_three_slope_is_written_one_dimensional():
    """A (1, 1, 32) slope on the stated (N, 3, 32) hidden: the narrow PRelu reads the 2-D product, so its slope
    is (2,), not (1, 1, 2) (which would raise the output's rank)."""
    result = optimized(tf_block(slope_shape=(1, 1, 32), hidden_shape=True), rewrites=1, seeds=(0, 1, 2))
    (prelu,) = [n for n in result.model.graph.node if n.op_type == "PRelu"]
    assert [list(i.dims) for i in result.model.graph.initializer if i.name == prelu.input[1]] == [[2]]


def test_tf2onnx_back_reshape_that_only_flattens_is_taken():
    """The first dense's back Reshape to [-1, 32] leaves the leading dims flat: the product is the same 2-D one,
    and the output keeps the second dense's own target, so the split is exact."""
    optimized(tf_block(back=[-1, 32]), rewrites=1, seeds=(0, 1, 2))


# --- tf2onnx near misses: must not fire -------------------------------------------------------------------


def reasons_left(model) -> list[str]:
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    assert not split_rewrites(result)
    return [c.reason for c in result.report.skipped]


def test_tf2onnx_back_reshape_that_moves_the_features_is_left():
    """[-1, 6, 16]: the count holds but the 32 units are spread over two axes (the leading dims not restored)."""
    b = Builder()
    h = b.prelu(tf_dense(b, "x", 8, 32, back=[-1, 6, 16], bias=False), slopes(16, (3,)), (16,))
    (flat,) = b.node("Reshape", [h, b.const([-1, 32], dtype=np.int64)])
    (y,) = b.node("MatMul", [flat, b.const(b.weights(32, 8))])
    reasons = reasons_left(b.model([("x", ["N", 3, 8])], [(y, ["N", 8])]))
    assert any("split_linear_units" in r and "not one slope per unit" in r for r in reasons), reasons


def test_tf2onnx_back_target_not_a_constant_is_left():
    """The back target's last dim comes from Shape(MatMul): nothing states it keeps the 32 units."""
    reasons = reasons_left(tf_block(target="computed"))
    assert any("target does not say so" in r for r in reasons), reasons


def test_tf2onnx_reshape_before_the_activation_that_does_not_state_the_units_is_left():
    """Reshape(h, Shape(h)) before the PRelu: the identity, but its target states no last dim, so the per-unit
    slopes are not proven to meet their units."""
    b = Builder()
    h = tf_dense(b, "x", 8, 32)
    (h,) = b.node("Reshape", [h, b.node("Shape", [h])[0]])
    y = tf_dense(b, b.prelu(h, slopes(), (32,)), 32, 8)
    reasons = reasons_left(b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])]))
    assert any("split_linear_units" in r and "units on the last axis" in r for r in reasons), reasons


def test_tf2onnx_shape_reader_of_the_hidden_is_left():
    """Shape(hidden) is a graph output and the first dense's target [-1, 3, 32] does not spell the shape out."""
    reasons = reasons_left(tf_block(reader="shape"))
    assert any("also feeds" in r and "Shape" in r for r in reasons), reasons


def test_tf2onnx_hidden_graph_output_is_left():
    reasons = reasons_left(tf_block(hidden_out=True))
    assert any("is a graph output" in r for r in reasons), reasons


def test_tf2onnx_slope_on_the_wrong_axis_is_left():
    """A (3, 1) slope (per token) on the stated (N, 3, 32) hidden: not one slope per unit."""
    model = tf_block(slope=np.where(np.arange(3) == 0, 0.5, 1.0), slope_shape=(3, 1), hidden_shape=True)
    reasons = reasons_left(model)
    assert any("split_linear_units" in r and "not one slope per unit" in r for r in reasons), reasons


@pytest.mark.parametrize("linear, splits", [(32, False), (33, True)])
def test_a_64_256_64_block_splits_from_33_linear_units_as_its_parameters_shrink(linear, splits):
    """The 256 slopes go with the block and the narrow MLP gets n new ones: the growth check counted the new
    slopes but not the old, and refused 33 linear units (the model shrinks: 33,024 -> 32,863 stored values)."""
    b = Builder(seed=0)
    h = b.prelu(b.linear("x", 64, 256), np.array([1.0] * linear + [0.5] * (256 - linear)), (256,))
    model = b.model([("x", ["N", 64])], [(b.linear(h, 256, 64), ["N", 64])])
    result = optimized(model, rewrites=1 if splits else 0)
    assert [r.rule for r in result.report.rewrites] == (["split_linear_units"] if splits else [])
    if splits:
        assert result.report.after.params < result.report.before.params

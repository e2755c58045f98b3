"""split_linear_units: per-unit slopes where only some units are linear split into one direct map for those
units beside a narrower MLP for the rest, where that costs fewer MACs than the block."""

from __future__ import annotations

import numpy as np
import pytest

import lc_onnx
from tests.builder import Builder, mlp
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

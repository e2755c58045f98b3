"""drop_unit_activation: in a bottleneck, the unit-slope activation goes and both layers stay."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

import lc_onnx
from tests.builder import Builder, mlp
from tests.harness import count_ops, optimized


def bottleneck(**kw):
    # 64 -> 8 -> 64: one fused 64x64 layer (4096 MACs/row) costs more than the factors (1024)
    return mlp(d_in=64, hidden=8, d_out=64, **kw)


def test_bottleneck_keeps_both_layers_and_drops_the_activation():
    result = optimized(bottleneck(), rewrites=1)
    assert [r.rule for r in result.report.rewrites] == ["drop_unit_activation"]
    assert count_ops(result.model, "PRelu") == 0 and count_ops(result.model, "MatMul") == 2
    (left,) = result.report.skipped
    assert left.reason.startswith("bottleneck")


def test_bottleneck_without_activation_is_left_alone():
    result = optimized(bottleneck(slope=None), rewrites=0)
    assert "bottleneck" in result.report.skipped[0].reason


def test_bottleneck_slope_outside_tolerance_is_left_alone():
    result = optimized(bottleneck(slope=0.5), rewrites=0)
    assert "outside tolerance" in result.report.skipped[0].reason


def test_skip_by_name():
    nodes = ("drop_unit_activation", "eliminate_unit_activation", "prelu_to_leaky_relu")
    assert not lc_onnx.optimize(bottleneck(), skip=nodes).report.rewrites
    (only,) = lc_onnx.optimize(bottleneck(), skip=("drop_unit_activation",)).report.rewrites
    assert only.rule == "eliminate_unit_activation"  # the node rule removes what the chain rule would have
    assert not lc_onnx.optimize(mlp(), skip=("collapse_linear_chain",) + nodes[1:]).report.rewrites
    # a PRelu(1) left behind never becomes LeakyRelu(alpha=1), an identity node nothing would remove
    assert not lc_onnx.optimize(mlp(), skip=("collapse_linear_chain", "eliminate_unit_activation")).report.rewrites
    (only,) = lc_onnx.optimize(mlp(slope=0.5), skip=("collapse_linear_chain",)).report.rewrites
    assert only.rule == "prelu_to_leaky_relu"



def test_equal_cost_collapses():
    # d_in·d_out == h·(d_in + d_out): collapse does not cost more, and removes nodes
    result = optimized(mlp(d_in=16, hidden=8, d_out=16), rewrites=1)
    assert result.report.rewrites[0].rule == "collapse_linear_chain"


@pytest.mark.parametrize("outer_output", [False, True])
def test_bottleneck_across_a_subgraph_boundary_is_left(outer_output):
    """A bottleneck whose activation is outside an If and second layer in its then-branch: the outer activation is
    not unhooked from the subgraph's sweep (it stayed in the outer graph with no inputs, or lost an outer output)."""
    from tests.test_eliminate_unit_activation import if_feeds, if_model

    b = Builder()
    h = b.prelu(b.linear("x", 64, 8), 1.0)
    model = if_model(b, len(b.nodes), b.linear(h, 8, 64), d=64)
    if outer_output:
        model.graph.output.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, [4, 8]))
    for cond in (True, False):
        result = optimized(model, rewrites=0, feeds=if_feeds(cond, 64), skip=("eliminate_unit_activation",))
    assert count_ops(result.model, "PRelu") == 1

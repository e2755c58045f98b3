"""prelu_to_leaky_relu: a PRelu with one slope becomes LeakyRelu (exact); anything else stays PRelu."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import lc_onnx
from tests.builder import Builder, mlp
from tests.harness import count_ops, optimized


def node_rewrites(result) -> list[str]:
    return [r.rule for r in result.report.rewrites if r.rule == "prelu_to_leaky_relu"]


def alone(slope, shape=(1,), dtype=np.float32, rank=3, opset=17):
    """x → PRelu(slope) → y, outside any chain."""
    b = Builder(dtype)
    y = b.prelu("x", slope, shape)
    dims = ["N"] + [4] * (rank - 1)
    return b.model([("x", dims)], [(y, dims)], opset=opset)


# --- fires ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_one_slope_of_any_rank_and_float_dtype(shape, dtype):
    result = optimized(alone(0.25, shape, dtype), rewrites=0)
    assert node_rewrites(result) == ["prelu_to_leaky_relu"]
    assert count_ops(result.model, "PRelu") == 0
    (leaky,) = result.model.graph.node
    assert leaky.op_type == "LeakyRelu" and leaky.attribute[0].f == 0.25


def test_a_chain_left_outside_tolerance_keeps_its_layers_and_gets_leaky_relu():
    result = optimized(mlp(slope=0.5), rewrites=0)
    assert node_rewrites(result) == ["prelu_to_leaky_relu"]
    assert count_ops(result.model, "MatMul") == 2 and count_ops(result.model, "LeakyRelu") == 1
    assert result.report.skipped and "outside tolerance" in result.report.skipped[0].reason


def test_keeps_the_node_name_and_is_idempotent():
    model = mlp(slope=0.5)
    (prelu,) = [n.name for n in model.graph.node if n.op_type == "PRelu"]
    once = optimized(model).model
    assert [n.name for n in once.graph.node if n.op_type == "LeakyRelu"] == [prelu]
    twice = lc_onnx.optimize(once)
    assert not twice.report.rewrites and twice.model is once


def test_inspect_lists_it_after_the_chains():
    found = lc_onnx.inspect(mlp(slope=0.5))
    assert [(c.kind, c.rule) for c in found] == [("chain", None), ("node", "prelu_to_leaky_relu")]
    assert [c.kind for c in lc_onnx.inspect(mlp(slope=1.0))] == ["chain"]  # collapsed, not converted


# --- must not fire -------------------------------------------------------------------------------------


def test_a_chain_that_collapses_is_collapsed_not_converted():
    result = optimized(mlp(slope=1.0), rewrites=1)
    assert not node_rewrites(result)


@pytest.mark.parametrize("model", [
    alone(np.linspace(0.1, 0.9, 4), shape=(4,)),  # one slope per channel
    alone(0.1, dtype=np.float64),  # 0.1 in float64 has no exact float32 alpha
    alone(np.nan),
], ids=["per-channel", "float64-not-float32", "nan"])
def test_left_as_prelu(model):
    result = optimized(model, rewrites=0)
    assert not node_rewrites(result) and count_ops(result.model, "PRelu") == 1


def test_slope_that_is_not_a_constant():
    b = Builder()
    y = b.node("PRelu", ["x", "slope"])[0]
    model = b.model([("x", ["N", 4]), ("slope", [1])], [(y, ["N", 4])])
    assert not node_rewrites(optimized(model, rewrites=0))


def test_custom_domain_prelu_and_skip():
    b = Builder()
    (y,) = b.node("PRelu", ["x", b.const(np.full(1, 0.5))], domain="com.example")
    model = b.model([("x", ["N", 4])], [(y, ["N", 4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert lc_onnx.optimize(model, validate=False).model is model
    assert lc_onnx.optimize(alone(0.5), skip=("prelu_to_leaky_relu",)).report.rewrites == []

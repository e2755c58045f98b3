"""eliminate_unit_activation: a unit-slope activation no fold takes is removed; anything else stays."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lc_onnx
from tests.builder import Builder
from tests.harness import count_ops, optimized


def rules(result) -> list[str]:
    return [r.rule for r in result.report.rewrites]


def test_weight_that_is_a_graph_input():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, weight="w_in"), 1.0)
    y = b.linear(h, 32, 8)
    result = optimized(b.model([("x", ["N", 8]), ("w_in", [8, 32])], [(y, ["N", 8])]), rewrites=0)
    assert rules(result) == ["eliminate_unit_activation"] and count_ops(result.model, "PRelu") == 0
    assert "not a constant" in result.report.skipped[0].reason  # the chain is still listed, with why


@pytest.mark.parametrize("op", ["PRelu", "LeakyRelu"])
def test_fan_out_into_a_non_linear_node(op):
    b = Builder()
    h = b.linear("x", 8, 32)
    (h,) = b.node("PRelu", [h, b.const(np.ones(1))]) if op == "PRelu" else b.node("LeakyRelu", [h], alpha=1.0)
    y = b.linear(h, 32, 8)
    (side,) = b.node("Relu", [h])
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8]), (side, ["N", 32])]), rewrites=0)
    assert rules(result) == ["eliminate_unit_activation"]
    assert count_ops(result.model, op) == 0 and count_ops(result.model, "LeakyRelu") == 0


def test_within_tol_not_exactly_one_states_its_error():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, weight="w_in"), 1 + np.linspace(-5e-4, 5e-4, 32), (32,))
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 8]), ("w_in", [8, 32])], [(y, ["N", 8])])
    (r,) = optimized(model, rtol=1e-2, atol=1e-2).report.rewrites
    assert r.rule == "eliminate_unit_activation" and r.error_coefficient == pytest.approx(5e-4, rel=1e-3)


@pytest.mark.parametrize("where", ["input", "output", "both"])
def test_activation_at_the_graph_boundary(where):
    """Output names stay: a graph output keeps its name (its producer writes it, or an Identity)."""
    b = Builder()
    x = "x"
    if where in ("input", "both"):
        x = b.prelu(x, 1.0)
    y = b.node("Relu", [x])[0] if where == "input" else x
    if where == "output":
        y = b.prelu(b.node("Relu", [x])[0], 1.0)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=0)
    assert rules(result) == ["eliminate_unit_activation"]
    assert [o.name for o in result.model.graph.output] == [y] and count_ops(result.model, "PRelu") == 0


def test_output_read_by_another_node_and_a_graph_output():
    b = Builder()
    (r,) = b.node("Relu", ["x"])
    h = b.prelu(r, 1.0)
    (n,) = b.node("Neg", [h])
    result = optimized(b.model([("x", ["N", 8])], [(h, ["N", 8]), (n, ["N", 8])]), rewrites=0)
    assert rules(result) == ["eliminate_unit_activation"] and count_ops(result.model, "PRelu") == 0


@pytest.mark.parametrize("second", ["PRelu", "LeakyRelu", "fan_out"])
def test_removed_activations_open_a_chain_in_the_same_run(second):
    """Two unit activations in a row: no chain walks over both, so they are removed; the layers they joined
    then fold in the same run (before, only a second run of optimize folded them)."""
    b = Builder()
    h = b.prelu(b.linear("x", 8, 4 if second == "fan_out" else 32), 1.0)
    if second == "fan_out":  # one head behind a second unit PRelu
        outs = [(b.linear(h, 4, 3), ["N", 3]), (b.linear(b.prelu(h, 1.0), 4, 2), ["N", 2])]
    else:
        (h,) = b.node("PRelu", [h, b.const(np.ones(1))]) if second == "PRelu" else b.node("LeakyRelu", [h], alpha=1.0)
        outs = [(b.linear(h, 32, 8), ["N", 8])]
    result = optimized(b.model([("x", ["N", 8])], outs), rewrites=1)
    assert rules(result)[:2] == ["eliminate_unit_activation"] * 2
    assert count_ops(result.model, "Gemm") + count_ops(result.model, "MatMul") == len(outs)
    assert not lc_onnx.optimize(result.model).report.rewrites


# --- must not fire --------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [0.5, 1.06, [1.0] * 31 + [0.9]])
def test_slope_outside_tolerance_stays(slope):
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, weight="w_in"), slope, (32,))
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 8]), ("w_in", [8, 32])], [(y, ["N", 8])])
    result = lc_onnx.optimize(model, validate=False)
    assert "eliminate_unit_activation" not in rules(result)


def test_never_writes_leaky_relu_with_alpha_near_one():
    b = Builder()
    (r,) = b.node("Relu", ["x"])
    h = b.prelu(r, 1.0005)
    model = b.model([("x", ["N", 8])], [(h, ["N", 8])])
    result = lc_onnx.optimize(model, skip=("eliminate_unit_activation",), validate=False)
    assert not result.report.rewrites  # left a PRelu, not LeakyRelu(1.0005), with the rule skipped
    assert rules(optimized(model, rtol=1e-2, atol=1e-2)) == ["eliminate_unit_activation"]
    assert rules(lc_onnx.optimize(model, tol=1e-4, validate=False)) == ["prelu_to_leaky_relu"]


def test_non_finite_or_computed_slope_stays():
    b = Builder()
    (r,) = b.node("Relu", ["x"])
    (s,) = b.node("Abs", [b.const(np.ones(1))])
    (h,) = b.node("PRelu", [r, s])
    h2 = b.prelu(h, np.nan)
    model = b.model([("x", ["N", 8])], [(h2, ["N", 8])])
    assert not lc_onnx.optimize(model, validate=False, tol=1e9).report.rewrites


def test_inspect_names_the_rule():
    b = Builder()
    (r,) = b.node("Relu", ["x"])
    h = b.prelu(r, 1.0)
    model = b.model([("x", ["N", 8])], [(h, ["N", 8])])
    (c,) = lc_onnx.inspect(model)
    assert c.kind == "node" and c.rule == "eliminate_unit_activation"


def if_model(b: Builder, then_from: int, then_out: str, d: int = 8) -> onnx.ModelProto:
    """`y = If(cond, then: b's nodes from index `then_from` on, giving then_out; else: Neg(x))` after b's earlier
    nodes (the initializers are the outer graph's), x and y [4, d] floats."""
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph(b.nodes[then_from:], "then", [], [vi(then_out, TensorProto.FLOAT, [4, d])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"], name="neg")], "else", [],
                               [vi("e_out", TensorProto.FLOAT, [4, d])])
    nodes = b.nodes[:then_from] + [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g,
                                                    else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [4, d]), vi("cond", TensorProto.BOOL, [])],
                              [vi("y", TensorProto.FLOAT, [4, d])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def if_feeds(cond: bool, d: int = 8) -> dict[str, np.ndarray]:
    return {"cond": np.array(cond), "x": np.random.default_rng(0).standard_normal((4, d)).astype(np.float32)}


def then_branch(model: onnx.ModelProto) -> onnx.GraphProto:
    return next(a.g for a in model.graph.node[-1].attribute if a.name == "then_branch")


def test_subgraph_output_whose_input_comes_from_the_outer_graph():
    """A then-branch output must be written by a node of the branch, not by the outer node producing its input."""
    b = Builder()
    h = b.linear("x", 8, 8, bias=False)
    model = if_model(b, len(b.nodes), b.prelu(h, 1.0))
    for cond in (True, False):
        result = optimized(model, rewrites=0, feeds=if_feeds(cond))
        assert rules(result) == ["eliminate_unit_activation"]
    (node,) = then_branch(result.model).node
    assert (node.op_type, list(node.input), list(node.output)) == ("Identity", [h], [then_branch(model).output[0].name])


def test_inspect_lists_the_chain_two_unit_activations_in_a_row_open():
    """The chain walk takes one activation, so layer > PRelu(1) > PRelu(1) > layer is a chain only once the
    node rule has removed them: inspect looks again after the node rules (on a copy), as optimize does."""
    b = Builder()
    h = b.prelu(b.prelu(b.linear("x", 8, 32), 1.0), 1.0)
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 8])], [(y, ["N", 8])])
    before = model.SerializeToString()
    found = lc_onnx.inspect(model)
    assert model.SerializeToString() == before
    (chain,) = [c for c in found if c.kind == "chain"]
    assert chain.rule == "collapse_linear_chain" and chain.shape == (8, 32, 8)
    assert [c.rule for c in found if c.kind == "node"] == ["eliminate_unit_activation"] * 2
    result = optimized(model)
    assert rules(result) == ["eliminate_unit_activation"] * 2 + ["collapse_linear_chain"]
    assert set(result.report.rewrites[-1].names) == set(chain.names)


def test_inspect_keeps_the_first_look_when_the_node_rules_open_no_chain():
    """A chain left for a reason keeps that reason even where a node rule then removes its activation."""
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, weight="w_in"), 1.0)
    y = b.linear(h, 32, 8)
    found = lc_onnx.inspect(b.model([("x", ["N", 8]), ("w_in", [8, 32])], [(y, ["N", 8])]))
    (chain,) = [c for c in found if c.kind == "chain"]
    assert chain.rule is None and "not a constant" in chain.reason
    assert [c.rule for c in found if c.kind == "node"] == ["eliminate_unit_activation"]

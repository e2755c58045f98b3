"""collapse_linear_chain: fires on every supported layout, and never where it would change the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import lc_onnx
import passes
from tests.builder import Builder, mlp
from tests.harness import count_ops, optimized


def only_rule(result) -> set[str]:
    return {r.rule for r in result.report.rewrites}


# --- fires ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_matmul_add_collapses_at_every_rank(rank):
    result = optimized(mlp(rank=rank), rewrites=1)
    assert only_rule(result) == {"collapse_linear_chain"}
    assert count_ops(result.model, "PRelu") == 0
    assert count_ops(result.model, "MatMul") + count_ops(result.model, "Gemm") == 1


def test_rank_two_matmul_becomes_gemm_and_higher_rank_stays_matmul():
    assert count_ops(optimized(mlp(rank=2), rewrites=1).model, "Gemm") == 1
    three = optimized(mlp(rank=3), rewrites=1).model
    assert count_ops(three, "Gemm") == 0 and count_ops(three, "MatMul") == 1 and count_ops(three, "Add") == 1


@pytest.mark.parametrize("bias_first", [False, True])
def test_bias_on_either_side_of_add(bias_first):
    optimized(mlp(bias_first=bias_first), rewrites=1)


def test_without_biases_there_is_no_add():
    result = optimized(mlp(bias=False), rewrites=1)
    assert count_ops(result.model, "Add") == 0


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", [None, (1, 32), (1,)])
def test_gemm_attributes(trans_b, alpha, beta, c_shape):
    b = Builder()
    h = b.linear("x", 8, 32, "gemm", trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    h = b.prelu(h, 1.0)
    y = b.linear(h, 32, 8, "gemm", trans_b=not trans_b, alpha=beta, beta=alpha)
    model = b.model([("x", ["N", 8])], [(y, ["N", 8])])
    result = optimized(model, rewrites=1)
    assert count_ops(result.model, "Gemm") == 1 and count_ops(result.model, "PRelu") == 0


def test_gemm_without_c():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, "gemm", bias=False), 1.0)
    y = b.linear(h, 32, 8, "gemm", bias=False)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1)
    assert len(next(n for n in result.model.graph.node if n.op_type == "Gemm").input) == 2


@pytest.mark.parametrize("shape", [(1,), (1, 1), (1, 1, 1), (32,), (1, 1, 32)])
def test_prelu_slope_shapes(shape):
    optimized(mlp(rank=3, slope_shape=shape), rewrites=1)


def test_per_channel_slope_within_tolerance():
    b = Builder()
    slope = 1 + np.linspace(-5e-4, 5e-4, 32)
    h = b.prelu(b.linear("x", 8, 32), slope, (32,))
    y = b.linear(h, 32, 8)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1, rtol=1e-2, atol=1e-2)
    lo, hi = result.report.rewrites[0].slope_range
    assert lo == pytest.approx(1 - 5e-4) and hi == pytest.approx(1 + 5e-4)
    assert result.report.rewrites[0].error_coefficient > 0


def test_leaky_relu_with_alpha_one():
    b = Builder()
    (h,) = b.node("LeakyRelu", [b.linear("x", 8, 32)], alpha=1.0)
    y = b.linear(h, 32, 8)
    optimized(b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])]), rewrites=1)


def test_no_activation_at_all():
    optimized(mlp(slope=None), rewrites=1)


def test_sees_through_identity_and_inference_dropout():
    b = Builder()
    (h,) = b.node("Identity", [b.linear("x", 8, 32)])
    (h,) = b.node("Dropout", [h])
    h = b.prelu(h, 1.0)
    (h,) = b.node("Dropout", [h, b.const(0.1), b.const(False, dtype=np.bool_)])
    (h,) = b.node("Identity", [h])
    y = b.linear(h, 32, 8)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1)
    assert len(result.model.graph.node) == 1


def test_chain_of_four_layers_collapses_into_one():
    b = Builder()
    h = b.linear("x", 8, 32)
    for _ in range(3):
        h = b.linear(b.prelu(h, 1.0), 32, 32 if _ < 2 else 8)
    result = optimized(b.model([("x", ["N", 3, 8])], [(h, ["N", 3, 8])]), rewrites=3)
    assert count_ops(result.model, "MatMul") == 1 and count_ops(result.model, "PRelu") == 0


@pytest.mark.parametrize("dims,first_fold", [((64, 32, 16, 4), (32, 16, 4)), ((4, 16, 32, 64), (4, 16, 32))])
def test_three_layers_fold_in_the_cheaper_order(dims, first_fold):
    """A shrinking head folds back to front (W1·(W2·W3)), a widening one front to back."""
    b = Builder()
    h = b.linear("x", dims[0], dims[1], "gemm")
    for d_in, d_out in zip(dims[1:-1], dims[2:], strict=True):
        h = b.linear(b.prelu(h, 1.0), d_in, d_out, "gemm")
    result = optimized(b.model([("x", ["N", dims[0]])], [(h, ["N", dims[-1]])]), rewrites=2)
    assert result.report.rewrites[0].shape == first_fold
    assert count_ops(result.model, "Gemm") == 1 and count_ops(result.model, "PRelu") == 0


def test_slope_near_one_within_tol_reports_error_bound():
    result = optimized(mlp(slope=0.9995), rewrites=1, tol=1e-3, rtol=1e-2, atol=1e-2)
    r = result.report.rewrites[0]
    assert r.slope_range == pytest.approx((0.9995, 0.9995))
    assert r.error_coefficient > 0


def test_output_of_second_layer_may_be_a_graph_output():
    b = Builder()
    y = b.linear(b.prelu(b.linear("x", 8, 32), 1.0), 32, 8)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1)
    assert [o.name for o in result.model.graph.output] == [y]


@pytest.mark.parametrize("opset", [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24])
def test_opsets(opset):
    optimized(mlp(opset=opset), rewrites=1)


def test_an_opset_the_rules_are_not_written_for_says_so():
    """Opset 25 is valid ONNX; the chain is listed as left with why, not as if a --skip had taken the rules."""
    (chain,) = [c for c in lc_onnx.inspect(mlp(opset=25)) if c.kind == "chain"]
    assert chain.rule is None and "the rules cover opsets 11-24" in chain.reason


@pytest.mark.parametrize("dtype,tol", [(np.float16, 2e-2), (np.float64, 1e-9)])
def test_dtypes(dtype, tol):
    result = optimized(mlp(dtype=dtype), rewrites=1, rtol=tol, atol=tol)
    weights = [t for t in result.model.graph.initializer if len(t.dims) == 2]
    assert all(t.data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) for t in weights)


def test_tied_weight_is_not_mutated():
    b = Builder()
    shared = b.const(b.weights(8, 32), "shared")
    h = b.prelu(b.linear("x", 8, 32, weight=shared), 1.0)
    y = b.linear(h, 32, 8)
    (other,) = b.node("MatMul", ["x", shared])  # a second user of the same initializer
    model = b.model([("x", ["N", 8])], [(y, ["N", 8]), (other, ["N", 32])])
    before = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "shared")).copy()
    result = optimized(model, rewrites=1)
    after = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "shared"))
    np.testing.assert_array_equal(before, after)


def test_collapses_inside_if_subgraphs():
    inner = Builder(seed=1)
    y = inner.linear(inner.prelu(inner.linear("x", 8, 32), 1.0), 32, 8)
    then_g = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [4, 8])],
                               inner.inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4, 8])])
    b = Builder()
    b.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g))
    graph = helper.make_graph(
        b.nodes, "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
        result = optimized(model, rewrites=1, feeds=feeds)
    then_branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Gemm"]


def test_collapses_inside_a_loop_body():
    """README: Loop (and Scan) bodies are rewritten with the same checks; the body reads x from the graph around."""
    inner = Builder(seed=1)
    y = inner.linear(inner.prelu(inner.linear("x", 8, 32), 1.0), 32, 8)
    inner.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"))
    body = helper.make_graph(
        inner.nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(y, TensorProto.FLOAT, [4, 8])], inner.inits)
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [3])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", ""], ["ys"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("ys", TensorProto.FLOAT, [3, 4, 8])], [trips])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = optimized(model, rewrites=1)
    body_out = next(a.g for a in result.model.graph.node[0].attribute if a.name == "body")
    assert sorted(n.op_type for n in body_out.node) == ["Gemm", "Identity"]
    assert result.report.rewrites[0].graph == "body"


# --- must not fire --------------------------------------------------------------------------------------


def skipped_reason(model, **kw) -> str:
    """Why the one chain was left; the model must come back unchanged (the node rule is skipped here:
    tests/test_prelu_to_leaky_relu.py has it)."""
    kw.setdefault("skip", ("prelu_to_leaky_relu", "eliminate_unit_activation"))
    result = optimized(model, rewrites=0, **kw)
    assert result.model is model or result.model.SerializeToString() == model.SerializeToString()
    (only,) = result.report.skipped
    return only.reason


def test_slope_outside_tolerance():
    assert "outside tolerance" in skipped_reason(mlp(slope=0.9), tol=0.05)


def test_one_channel_outside_tolerance():
    # (split_linear_units takes the 31 unit channels out: tests/test_split_linear_units.py)
    model = mlp(slope=[1.0] * 31 + [0.5], slope_shape=(32,))
    assert "outside tolerance" in skipped_reason(model, skip=("prelu_to_leaky_relu", "split_linear_units"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_slope(bad):
    assert "NaN or inf" in skipped_reason(mlp(slope=bad), tol=1e9)


def test_non_finite_weight():
    b = Builder()
    w = b.weights(8, 32)
    w[0, 0] = np.nan
    h = b.prelu(b.linear("x", 8, 32, weight=b.const(w)), 1.0)
    y = b.linear(h, 32, 8)
    assert "NaN or inf" in skipped_reason(b.model([("x", ["N", 8])], [(y, ["N", 8])]))


def test_activation_output_with_fan_out():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    y = b.linear(h, 32, 8)
    (side,) = b.node("Relu", [h])
    assert "also feeds" in skipped_reason(b.model([("x", ["N", 8])], [(y, ["N", 8]), (side, ["N", 32])]))


def test_activation_output_is_a_graph_output():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    y = b.linear(h, 32, 8)
    assert "graph output" in skipped_reason(b.model([("x", ["N", 8])], [(y, ["N", 8]), (h, ["N", 32])]))


def test_weight_that_is_a_graph_input():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, weight="w_in"), 1.0)
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 8]), ("w_in", [8, 32])], [(y, ["N", 8])])
    assert "not a constant" in skipped_reason(model)


def test_weight_that_is_computed():
    b = Builder()
    (w,) = b.node("Relu", [b.const(b.weights(8, 32))])
    h = b.prelu(b.linear("x", 8, 32, weight=w), 1.0)
    y = b.linear(h, 32, 8)
    assert "not a constant" in skipped_reason(b.model([("x", ["N", 8])], [(y, ["N", 8])]))


def test_slope_that_is_computed():
    b = Builder()
    (s,) = b.node("Abs", [b.const(np.ones(1))])
    (h,) = b.node("PRelu", [b.linear("x", 8, 32), s])
    y = b.linear(h, 32, 8)
    assert "not a constant" in skipped_reason(b.model([("x", ["N", 8])], [(y, ["N", 8])]))


def test_gemm_with_trans_a():
    b = Builder()
    (h,) = b.node("Gemm", ["x", b.const(b.weights(8, 32))], transA=1)
    y = b.linear(b.prelu(h, 1.0), 32, 8, "gemm")
    assert "transA" in skipped_reason(b.model([("x", [8, "N"])], [(y, ["N", 8])]))


def test_dropout_in_training_mode_is_not_seen_through():
    b = Builder()
    (h,) = b.node("Dropout", [b.linear("x", 8, 32), b.const(0.0), b.const(True, dtype=np.bool_)])
    y = b.linear(b.prelu(h, 1.0), 32, 8)
    result = lc_onnx.optimize(b.model([("x", ["N", 8])], [(y, ["N", 8])]), validate=False)
    assert [r.rule for r in result.report.rewrites] == ["eliminate_unit_activation"]  # the PRelu(1) only


def test_custom_domain_activation_passes_through():
    b = Builder()
    (h,) = b.node("PRelu", [b.linear("x", 8, 32), b.const(np.ones(1))], domain="com.example")
    y = b.linear(h, 32, 8)
    model = b.model([("x", ["N", 8])], [(y, ["N", 8])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    result = lc_onnx.optimize(model, validate=False)
    assert not result.report.rewrites and result.model is model


def test_bias_broadcasting_over_rows_is_not_a_bias():
    b = Builder()
    h = b.prelu(b.linear("x", 8, 32, "gemm", c_shape=(4, 32)), 1.0)
    y = b.linear(h, 32, 8, "gemm")
    assert "one value per output feature" in skipped_reason(b.model([("x", [4, 8])], [(y, [4, 8])]))


def test_tol_zero_still_takes_exact_slopes():
    optimized(mlp(slope=1.0), rewrites=1, tol=0.0)


def test_constants_shared_through_identity():
    # the legacy torch exporter keeps one copy of equal initializers and feeds the others through Identity
    b = Builder()
    slope = b.const(np.ones((1, 1)))
    h = b.linear("x", 8, 32)
    for d_out in (32, 8):
        (s,) = b.node("Identity", [slope])
        h = b.linear(b.node("PRelu", [h, s])[0], 32, d_out)
    optimized(b.model([("x", ["N", 8])], [(h, ["N", 8])]), rewrites=2)


def gpt2_like(target_from_shape: bool):
    """Gemm → Reshape(to 3-D) → PRelu → Reshape(to 2-D) → Gemm → Reshape(to 3-D with dims from
    Shape(activation)), as HF GPT-2's Conv1D exports with dynamic axes."""
    b = Builder()
    (flat,) = b.node("Reshape", ["x", b.const(np.array([-1, 8]), dtype=np.int64)])
    h2d = b.linear(flat, 8, 32, "gemm")
    if target_from_shape:  # batch and tokens read from Shape(x), hidden a positive constant: explicit
        (sx,) = b.node("Shape", ["x"])
        (lead,) = b.node("Slice", [sx, b.const([0], dtype=np.int64), b.const([2], dtype=np.int64)])
        (target,) = b.node("Concat", [lead, b.const([32], dtype=np.int64)], axis=0)
    else:
        target = b.const(np.array([-1, 3, 32]), dtype=np.int64)
    (h3d,) = b.node("Reshape", [h2d, target])
    act = b.prelu(h3d, 1.0)
    (s,) = b.node("Shape", [act])
    (lead,) = b.node("Slice", [s, b.const([0], dtype=np.int64), b.const([2], dtype=np.int64)])
    (out_shape,) = b.node("Concat", [lead, b.const([8], dtype=np.int64)], axis=0)
    (back,) = b.node("Reshape", [act, b.const(np.array([-1, 32]), dtype=np.int64)])
    y2d = b.linear(back, 32, 8, "gemm")
    (y,) = b.node("Reshape", [y2d, out_shape])
    return b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])])


def test_shape_reader_outside_the_chain_is_rewired_to_an_explicit_target():
    result = optimized(gpt2_like(target_from_shape=True), rewrites=1)
    assert count_ops(result.model, "PRelu") == 0 and count_ops(result.model, "Gemm") == 1


def test_shape_reader_outside_the_chain_without_explicit_target_blocks():
    assert "also feeds" in skipped_reason(gpt2_like(target_from_shape=False))



@pytest.mark.parametrize("trans_b", [False, True])
def test_fold_in_row_blocks_matches(monkeypatch, trans_b):
    """The product is taken a few rows of W_A at a time (uneven last block, transposed view, alpha)."""
    from passes import collapse_linear_chain

    monkeypatch.setattr(collapse_linear_chain, "BLOCK_VALUES", 7 * 32)  # 7 rows of 32 per block
    b = Builder()
    h = b.linear("x", 30, 32, "gemm", trans_b=trans_b, alpha=0.5)
    y = b.linear(b.prelu(h, 1.0), 32, 6, "gemm")
    optimized(b.model([("x", ["N", 30])], [(y, ["N", 6])]), rewrites=1)


def residual_blocks(*slopes: float) -> onnx.ModelProto:
    """x → (x + MLP_i(x)) for each slope: 8 → 32 → 8 blocks with a scalar PRelu, no biases."""
    b = Builder()
    x = "x"
    for s in slopes:
        y = b.linear(b.prelu(b.linear(x, 8, 32, bias=False), s), 32, 8, bias=False)
        (x,) = b.node("Add", [x, y])
    return b.model([("x", ["N", 8])], [(x, ["N", 8])])


def test_unnamed_nodes_are_told_apart():
    """Node names may all be '' (legal ONNX): blocks are told apart by the nodes, not their names."""
    named = residual_blocks(1.0, 0.5, 0.7)
    unnamed = onnx.ModelProto()
    unnamed.CopyFrom(named)
    for n in unnamed.graph.node:
        n.name = ""

    def entries(model):  # the passes' own inspect: lc_onnx.inspect may label unnamed nodes before
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
        return [(c.kind, c.rule, c.reason, c.slope_range, c.shape) for c in passes.inspect(graph, 1e-3)]

    found = entries(named)
    assert [(k, r) for k, r, *_ in found] == [("chain", "collapse_linear_chain"), ("chain", None), ("chain", None),
                                              ("node", "prelu_to_leaky_relu"), ("node", "prelu_to_leaky_relu")]
    assert entries(unnamed) == found
    assert [c.reason for c in lc_onnx.inspect(unnamed)] == [c.reason for c in lc_onnx.inspect(named)]
    a, b = optimized(named, rewrites=1), optimized(unnamed, rewrites=1)
    assert [(r.rule, r.slope_range) for r in a.report.rewrites] == [(r.rule, r.slope_range) for r in b.report.rewrites]
    assert [c.reason for c in a.report.skipped] == [c.reason for c in b.report.skipped] and len(b.report.skipped) == 2
    assert [n.op_type for n in a.model.graph.node] == [n.op_type for n in b.model.graph.node]


@pytest.mark.parametrize("outer_output", [False, True])
def test_chain_across_a_subgraph_boundary_is_left(outer_output):
    """First layer and activation outside an If, second layer in its then-branch: no chain rule takes nodes of two
    graphs (the outer ones were unhooked but left in the outer graph, or an outer graph output lost its producer)."""
    from tests.test_eliminate_unit_activation import if_feeds, if_model

    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    model = if_model(b, len(b.nodes), b.linear(h, 32, 8))
    if outer_output:
        model.graph.output.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, [4, 32]))
    for cond in (True, False):
        result = optimized(model, rewrites=0, feeds=if_feeds(cond), skip=("eliminate_unit_activation",
                                                                          "prelu_to_leaky_relu"))
    (left,) = result.report.skipped
    assert left.graph == "then" and "subgraph" in left.reason
    result = optimized(model, rewrites=0, feeds=if_feeds(True))  # the outer activation goes, in the outer graph
    assert [(r.rule, r.graph) for r in result.report.rewrites] == [("eliminate_unit_activation", "")]


def test_chain_in_a_subgraph_reading_a_weight_through_an_outer_node():
    """The then-branch's chain reads its first weight through a Transpose of the outer graph: once folded, that
    Transpose is unread but is the outer graph's to clean up (it was unhooked and left there, no inputs, no outputs)."""
    from tests.test_eliminate_unit_activation import if_feeds, if_model, then_branch

    b = Builder()
    (wt,) = b.node("Transpose", [b.const(b.weights(32, 8))])
    at = len(b.nodes)
    model = if_model(b, at, b.linear(b.prelu(b.linear("x", 8, 32, weight=wt), 1.0), 32, 8))
    for cond in (True, False):
        result = optimized(model, rewrites=1, feeds=if_feeds(cond))
    assert [n.op_type for n in then_branch(result.model).node] == ["Gemm"]
    assert count_ops(result.model, "Transpose") == 0  # the outer graph is cleaned up too

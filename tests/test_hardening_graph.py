"""Issue 8 (hardening): one test per item of the graph side (passes/, totals, inspect)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

import lc_onnx
import passes
from passes import chain as chain_mod
from passes import match
from passes.cost import later_pair_first_is_cheaper
from tests.builder import Builder, mlp
from tests.harness import count_ops, optimized, random_feeds
from tests.harness import run as ort_run


def with_initializer_inputs(model: onnx.ModelProto, names: list[str], ir_version: int) -> onnx.ModelProto:
    """`model` with the initializers `names` also listed as graph inputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = ir_version
    for t in m.graph.initializer:
        if t.name in names:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def weight_names(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if len(t.dims) == 2]


# --- item 4: initializers that are also graph inputs ---------------------------------------------------------


def test_item4_ir3_keeps_every_initializer_a_graph_input():
    """IR < 4 requires each initializer in graph.input: the collapsed model must keep (and add) them."""
    base = mlp(rank=2, opset=11)
    model = with_initializer_inputs(base, [t.name for t in base.graph.initializer], ir_version=3)
    result = optimized(model, rewrites=1)
    out = result.model.graph
    assert {t.name for t in out.initializer} <= {i.name for i in out.input}


@pytest.mark.parametrize("which", ["weight", "slope"])
def test_item4_overridable_initializer_is_not_folded_and_stays_an_input(which):
    """IR >= 4: an initializer that is also a graph input is a default the caller may override."""
    base = mlp(rank=2)
    name = weight_names(base)[1] if which == "weight" else next(
        t.name for t in base.graph.initializer if len(t.dims) == 1 and t.dims[0] == 1)
    model = with_initializer_inputs(base, [name], ir_version=8)
    result = optimized(model, rewrites=0)
    assert name in [i.name for i in result.model.graph.input]
    assert count_ops(result.model, "PRelu") == (1 if which == "slope" else 0)  # a fixed slope may be LeakyRelu
    (left,) = [c for c in result.report.skipped if c.kind == "chain"]
    assert "graph input" in left.reason
    # and overriding it gives the same outputs as the original
    value = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    feeds = dict(random_feeds(model), **{name: (value * 0.5).astype(value.dtype)})
    for ref, got in zip(ort_run(model, feeds), ort_run(result.model, feeds), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# --- item 5: float16 fold overflow ------------------------------------------------------------------------------


def test_item5_float16_fold_that_overflows_is_left_with_the_reason():
    """W_A·W_B = 8·100·100 = 80000 > 65504: in float16 the fused weight would be inf."""
    b = Builder(np.float16)
    h = b.linear("x", 4, 8, weight=b.const(np.full((4, 8), 100.0)))
    y = b.linear(b.prelu(h, 1.0), 8, 4, weight=b.const(np.full((8, 4), 100.0)))
    model = b.model([("x", ["N", 4])], [(y, ["N", 4])])
    small = {"x": np.full((3, 4), 1e-2, dtype=np.float16)}  # inputs where the original stays finite
    result = optimized(model, rewrites=0, validate=False, feeds=small, rtol=1e-2, atol=1e-2,
                       skip=("prelu_to_leaky_relu",))
    (left,) = result.report.skipped
    assert "float16" in left.reason and "inf" in left.reason
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in result.model.graph.initializer)


# --- item 6: a PRelu slope of higher rank than its input -------------------------------------------------------


def high_rank_slope_chain(hidden: int):
    """x[N, 8] → MatMul → PRelu(slope of shape [1, 1, h]) → MatMul: ONNX Runtime broadcasts the output to
    [1, N, h], so the second layer's output is [1, N, 8]."""
    b = Builder()
    h = b.prelu(b.linear("x", 8, hidden), 1.0, (1, 1, hidden))
    y = b.linear(h, hidden, 8)
    return b.model([("x", ["N", 8])], [(y, ["N", 8])])  # what onnx infers (and its checker passes)


def test_item6_collapse_leaves_a_slope_that_raises_the_rank():
    model = high_rank_slope_chain(32)
    assert ort_run(model, random_feeds(model))[0].shape == (1, 3, 8)  # N = 3: the output grew a dim
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    assert "rank" in result.report.skipped[0].reason


def test_item6_drop_unit_activation_leaves_a_slope_that_raises_the_rank():
    model = high_rank_slope_chain(2)  # a bottleneck: the rule that would fire is drop_unit_activation
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    assert "rank" in result.report.skipped[0].reason


def test_item6_prelu_to_leaky_relu_leaves_a_slope_that_raises_the_rank():
    b = Builder()
    y = b.prelu("x", 0.25, (1, 1, 1))
    model = b.model([("x", ["N", 4])], [(y, ["N", 4])])
    result = optimized(model, rewrites=0)
    assert count_ops(result.model, "PRelu") == 1 and not result.report.rewrites


# --- item 10: honest numbers ---------------------------------------------------------------------------------


def test_item10_params_count_weights_in_constant_nodes():
    m = mlp(d_in=8, hidden=32, d_out=8)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    result = optimized(m, rewrites=1)
    assert result.report.before.params == 8 * 32 + 32 + 1 + 32 * 8 + 8
    assert result.report.after.params == 8 * 8 + 8


def mlp_with(activation: str, opset: int = 20) -> onnx.ModelProto:
    """Linear → activation → Linear, the activation as exporters write it."""
    b = Builder()
    h = b.linear("x", 8, 32)
    if activation == "gelu":
        (h,) = b.node("Gelu", [h])
    elif activation == "gelu_erf":  # torch's legacy export: x·0.5·(1 + erf(x/√2))
        (d,) = b.node("Div", [h, b.const(np.sqrt(2.0))])
        (e,) = b.node("Erf", [d])
        (a,) = b.node("Add", [e, b.const(1.0)])
        (m,) = b.node("Mul", [h, a])
        (h,) = b.node("Mul", [m, b.const(0.5)])
    elif activation == "swish":
        (s,) = b.node("Sigmoid", [h])
        (h,) = b.node("Mul", [h, s])
    else:
        (h,) = b.node("Relu", [h])
    y = b.linear(h, 32, 8)
    return b.model([("x", ["N", 3, 8])], [(y, ["N", 3, 8])], opset=opset)


@pytest.mark.parametrize("activation,name", [("gelu", "Gelu"), ("gelu_erf", "Gelu"), ("swish", "Swish"),
                                             ("relu", "Relu")])
def test_item10_inspect_lists_blocks_with_a_nonlinear_activation(activation, name):
    model = mlp_with(activation)
    (block,) = [c for c in lc_onnx.inspect(model) if c.kind == "chain"]
    assert block.rule is None and block.shape == (8, 32, 8)
    assert block.reason == f"activation {name} is not linear; fine-tune with lc_onnx.train to make it collapsible"
    result = optimized(model, rewrites=0)  # and optimize leaves it, saying why
    assert [c.reason for c in result.report.skipped] == [block.reason]


# --- item 12: scale ----------------------------------------------------------------------------------------------


def shrinking_widths(layers: int, top: int) -> list[int]:
    """Widths for which every pair of a run prefers to wait for the pair after it (folding back to front is
    the cheaper product) and every chain is worth collapsing: a sweep folds only the last pair of the run."""
    dims = [top, top - 1, top]
    while len(dims) < layers + 1:
        p0, p1, p2 = dims[-3:]
        dims.append(next(c for c in range(top, 1, -1)
                         if later_pair_first_is_cheaper(p0, p1, p2, c) and p0 * p2 <= p1 * (p0 + p2)))
    return dims


def test_item12_a_1040_layer_run_collapses_in_one_run():
    dims = shrinking_widths(1040, 268)
    b = Builder()
    h = "x"
    for i, (d_in, d_out) in enumerate(zip(dims, dims[1:], strict=False)):
        if i:
            h = b.prelu(h, 1.0)
        # a padded identity keeps the product of 1040 layers exact and its scale at 1
        h = b.linear(h, d_in, d_out, "gemm", bias=False, weight=b.const(np.eye(d_in, d_out)))
    model = b.model([("x", ["N", dims[0]])], [(h, ["N", dims[-1]])])
    result = optimized(model, rewrites=1039, seeds=(0,))
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]


def lattice_model(width: int, depth: int) -> onnx.ModelProto:
    """Gemm → PRelu → Reshape → Gemm, the Reshape's target computed from Shape(PRelu output) through a
    lattice: each level has `width` Max nodes, each reading every node of the level before."""
    b = Builder()
    act = b.prelu(b.linear("x", 8, 32, "gemm"), 1.0)
    level = b.node("Shape", [act])
    for _ in range(depth):
        level = [b.node("Max", level)[0] for _ in range(width)]
    (target,) = b.node("Max", level)
    (back,) = b.node("Reshape", [act, target])
    y = b.linear(back, 32, 8, "gemm")
    return b.model([("x", ["N", 8])], [(y, ["N", 8])])


def test_item12_shape_lattice_is_walked_in_polynomial_time(monkeypatch):
    """`only_feeds` used to follow every path through the lattice (width**depth of them)."""
    calls = Counter()
    original = match.only_feeds

    def counted(*args, **kw):
        calls["only_feeds"] += 1
        return original(*args, **kw)

    monkeypatch.setattr(match, "only_feeds", counted)
    monkeypatch.setattr(chain_mod, "only_feeds", counted)
    model = lattice_model(width=4, depth=6)
    result = optimized(model, rewrites=1)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert calls["only_feeds"] <= 4 * len(model.graph.node)


class CountedValues(gs.ir.tensor.LazyValues):
    """A constant whose data is read from its source (external data on disk) each time it is loaded."""

    reads: Counter = Counter()

    def load(self):
        CountedValues.reads[self.tensor.name] += 1
        return super().load()


def reads_model() -> onnx.ModelProto:
    """Several runs side by side from one input: a shrinking run (folds back to front), a widening one
    (front to back), a chain outside tolerance and one with a NaN weight (both left)."""
    b = Builder()
    outputs = []
    for dims in ((8, 64, 32, 16, 4), (8, 16, 32, 64)):
        h = b.linear("x", 8, dims[1])
        for d_in, d_out in zip(dims[1:], dims[2:], strict=False):
            h = b.linear(b.prelu(h, 1.0), d_in, d_out)
        outputs.append((h, ["N", dims[-1]]))
    outputs.append((b.linear(b.prelu(b.linear("x", 8, 32), 0.5), 32, 8), ["N", 8]))
    nan = b.weights(8, 32)
    nan[0, 0] = np.nan
    outputs.append((b.linear(b.prelu(b.linear("x", 8, 32, weight=b.const(nan)), 1.0), 32, 8), ["N", 8]))
    return b.model([("x", ["N", 8])], outputs)


def test_item12_each_external_tensor_is_read_once_per_run():
    model = reads_model()
    graph = gs.import_onnx(model)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, gs.ir.tensor.LazyValues):
            t._values = CountedValues(t._values.tensor)
    CountedValues.reads.clear()
    result = passes.run(graph, 1e-3)
    assert len([r for r in result.rewrites if r.rule == "collapse_linear_chain"]) == 5
    assert CountedValues.reads and max(CountedValues.reads.values()) == 1, CountedValues.reads
    out = gs.export_onnx(graph.cleanup())
    out.ir_version, out.opset_import[0].version = model.ir_version, 17
    feeds = random_feeds(model)
    for ref, got in zip(ort_run(model, feeds)[:3], ort_run(out, feeds)[:3], strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_weights_are_left_with_the_reason_and_no_graphsurgeon_noise(capfd):
    # numpy has no bfloat16: graphsurgeon hands the dtype over as ONNX's number, and np.dtype(float64) == None
    # once let such a weight through, so the fold wrote a float64 Gemm that failed the checker
    import ml_dtypes

    rng = np.random.default_rng(0)

    def bf16(name, shape):
        value = rng.normal(size=shape).astype(ml_dtypes.bfloat16) if shape != (1,) else np.ones(1, ml_dtypes.bfloat16)
        return helper.make_tensor(name, onnx.TensorProto.BFLOAT16, shape, value.tobytes(), raw=True)

    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("PRelu", ["h", "s"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [2, 8])],
                              [bf16("W1", (8, 32)), bf16("W2", (32, 8)), bf16("s", (1,))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = lc_onnx.optimize(model, validate=False)
    assert not result.report.rewrites
    assert any("BFLOAT16" in c.reason for c in result.report.skipped)
    onnx.checker.check_model(result.model, full_check=True)
    out, err = capfd.readouterr()
    assert "[W]" not in out + err

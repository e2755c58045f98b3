"""Issue 15 (hardening 3): items 10, 11, 12, 16 and 17 — growth counted with the slopes that die, scale of the
fan-out cascade and of unnamed nodes, bench's MAC share over subgraphs. Work is counted, never timed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

import passes
from passes import pipeline
from passes.linear import Names
from tests import scripts
from tests.builder import Builder
from tests.harness import optimized

# --- item 12: the fan-out growth check counts the activation's slopes that die with the fold ---------------------


def _shrinking_fan_out(shared_slope: bool = False) -> onnx.ModelProto:
    """64 -> 48 (bias) -> PRelu(48 unit slopes) -> two heads 48 -> 92 (no bias): 12,000 params, 11,960 folded.
    Without the 48 slopes that go, the fold looks like +8."""
    b = Builder()
    slope = b.const(np.ones(48))
    (h,) = b.node("PRelu", [b.linear("x", 64, 48), slope])
    ys = [b.linear(h, 48, 92, bias=False) for _ in range(2)]
    outputs = [(y, ["N", 92]) for y in ys]
    inputs = [("x", ["N", 64])]
    if shared_slope:  # the slope is also read outside the block: it stays, and the fold would grow the model
        outputs.append((b.node("PRelu", ["z", slope])[0], ["N", 48]))
        inputs.append(("z", ["N", 48]))
    return b.model(inputs, outputs)


def test_item12_fan_out_growth_counts_dying_slopes():
    (r,) = optimized(_shrinking_fan_out(), rewrites=1).report.rewrites
    assert r.rule == "collapse_fan_out" and (r.params_before, r.params_after) == (12_000, 11_960)
    left = optimized(_shrinking_fan_out(shared_slope=True), rewrites=0).report.skipped
    assert any("grow the model by +8 params" in c.reason for c in left)


# --- item 17: name allocation is O(1) per name, however many unnamed nodes ask for the same one ------------------


def _unnamed_chains(n: int) -> onnx.ModelProto:
    """n separate chains x -> 8x8 -> PRelu(1) -> 8x8, every node unnamed: each fused layer asks for `_collapsed`."""
    b = Builder()
    ys = [b.linear(b.prelu(b.linear("x", 8, 8, bias=False), 1.0), 8, 8, bias=False) for _ in range(n)]
    model = b.model([("x", ["N", 8])], [(y, ["N", 8]) for y in ys])
    for node in model.graph.node:
        node.name = ""
    return model


class _CountingSet(set):
    looks = 0

    def __contains__(self, item) -> bool:
        _CountingSet.looks += 1
        return super().__contains__(item)


def test_item17_unnamed_nodes_name_allocation_is_constant_per_name(monkeypatch):
    asked = []

    class Counted(Names):
        def __init__(self, graph):
            super().__init__(graph)
            self.taken = _CountingSet(self.taken)

        def __call__(self, base: str) -> str:
            asked.append(base)
            return super().__call__(base)

    monkeypatch.setattr(pipeline, "Names", Counted)
    _CountingSet.looks = 0
    result = optimized(_unnamed_chains(300), rewrites=300, seeds=(0,))
    assert asked.count("_collapsed") == 300 and len(result.model.graph.node) == 300
    # before: the allocator tried `_collapsed`, `_collapsed_1`, ... each time: ~n²/2 looks per base
    assert _CountingSet.looks <= 2 * len(asked), (_CountingSet.looks, len(asked))


def test_item17_names_stay_what_they_were():
    """The counter gives the names a search from 1 gave: the first free `base`, `base_1`, ..."""
    graph = gs.Graph(nodes=[gs.Node("Relu", "a"), gs.Node("Relu", "a_2")])
    names = Names(graph)
    assert [names("a") for _ in range(3)] + [names("b"), names("a_1")] == ["a_1", "a_3", "a_4", "b", "a_1_1"]


# --- item 16: an early-exit fan-out cascade folds in one sweep ---------------------------------------------------


def _cascade(levels: int, d: int = 8, e: int = 2) -> onnx.ModelProto:
    """x -> L0 -> PRelu(1) -> {exit E0, L1}; L1 -> PRelu(1) -> {E1, L2}; ... every exit a graph output."""
    b = Builder()
    h, outputs = "x", []
    for _ in range(levels):
        h = b.prelu(b.linear(h, d, d, bias=False), 1.0)
        outputs.append((b.linear(h, d, e, bias=False), ["N", e]))
    outputs.append((b.linear(h, d, e, bias=False), ["N", e]))
    return b.model([("x", ["N", d])], outputs)


def test_item16_fan_out_cascade_folds_in_one_sweep(monkeypatch):
    fired = []
    sweep = pipeline._block_sweep

    def counted(*args, **kwargs):
        rewrites, candidates = sweep(*args, **kwargs)
        fired.append(len(rewrites))
        return rewrites, candidates

    monkeypatch.setattr(pipeline, "_block_sweep", counted)
    levels = 200
    result = optimized(_cascade(levels), rewrites=levels, seeds=(0,), rtol=1e-4, atol=1e-4)
    assert {r.rule for r in result.report.rewrites} == {"collapse_fan_out"}
    # before: a sweep folded every other level, the next the half left...: log2(levels) sweeps of the whole graph
    assert [f for f in fired if f] == [levels], fired
    # front to back: each fold takes its exit and the next level's layer, the last its two exits
    assert [r.shape for r in result.report.rewrites] == [(8, 8, 10)] * (levels - 1) + [(8, 8, 4)]


def test_item16_cascade_unhooks_in_constant_work(monkeypatch):
    """Each fold unhooks the old layer from `x`, which every folded exit reads: found from the end of the list,
    not by comparing it with each node before it (gs.Node.__eq__ is a deep comparison)."""
    compared = []
    eq = gs.Node.__eq__

    def counted(self, other):
        compared.append(1)
        return eq(self, other)

    monkeypatch.setattr(gs.Node, "__eq__", counted)
    graph = gs.import_onnx(_cascade(400))
    assert len(passes.run(graph, 1e-3).rewrites) == 400
    assert len(compared) < 400, len(compared)


# --- item 11: bench's MAC share counts the MACs in If branches and Loop bodies ----------------------------------


def _branch(b: Builder, name: str, x: str, layers: list, out: str) -> onnx.GraphProto:
    """A subgraph on the outer tensor `x` (8 wide): `layers` is a list of widths, 'prelu' or 'tanh'."""
    b.nodes, width, t = [], 8, x
    for step in layers:
        if step == "prelu":
            t = b.prelu(t, 1.0)
        elif step == "tanh":
            (t,) = b.node("Tanh", [t])
        else:
            t, width = b.linear(t, width, step, bias=False), step
    b.nodes.append(onnx.helper.make_node("Identity", [t], [out], name=f"{name}_out"))
    return onnx.helper.make_graph(b.nodes, name, [], [onnx.helper.make_tensor_value_info(out, b.elem, ["N", 8])])


def _if_model() -> onnx.ModelProto:
    """main: x -> 8>8>8 chain (128 MACs/row) -> If: then 8>64>8 chain (1,024) > Tanh > 8x8 (64); else 8x8 (64)."""
    from onnx import helper

    b = Builder()
    h = b.linear(b.prelu(b.linear("x", 8, 8, bias=False), 1.0), 8, 8, bias=False)
    main = b.nodes
    then = _branch(b, "then", h, [64, "prelu", 8, "tanh", 8], "t_out")
    other = _branch(b, "else", h, [8], "e_out")
    b.nodes = main + [helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)]
    model = b.model([("x", ["N", 8]), ("c", [])], [("y", ["N", 8])])
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.BOOL
    return model


def _loop_model() -> onnx.ModelProto:
    """main: x -> 8x8 (64 MACs/row) -> Loop (3 trips) whose body runs an 8>32>8 chain (512) on the carried h."""
    from onnx import TensorProto, helper

    b = Builder()
    h = b.linear("x", 8, 8, bias=False)
    main = b.nodes
    body = _branch(b, "body", "h_in", [32, "prelu", 8], "h_out")
    body.node.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"))
    body.input.extend([helper.make_tensor_value_info("i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                       helper.make_tensor_value_info("h_in", b.elem, ["N", 8])])
    body.output.insert(0, helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []))
    trips = b.const(np.array(3), dtype=np.int64)
    cond = b.const(np.array(True), dtype=np.bool_)
    b.nodes = main + [helper.make_node("Loop", [trips, cond, h], ["y"], name="loop", body=body)]
    return b.model([("x", ["N", 8])], [("y", ["N", 8])])


def test_item11_bench_mac_share_counts_subgraphs(tmp_path):
    from lc_onnx import api, bench

    path = tmp_path / "if.onnx"
    onnx.save(_if_model(), path)
    share = bench.mac_share(onnx.load(path), {"x": [2, 8], "c": []}, api.inspect(path))
    rows = 2
    # before: the main graph only, 128 MACs/row, "the 1 collapsible chain(s) hold 100.0%"
    assert share.total == rows * (128 + 1024 + 64)  # an If counts its costlier branch: then
    assert share.chains == rows * (128 + 1024) and share.chain_count == 2 and share.unknown == []
    assert share.after == rows * (64 + 64 + 64)
    assert "2 collapsible chain(s) hold 94.7%" in share.line()


def test_item11_loop_body_counts_one_iteration(tmp_path):
    from lc_onnx import api, bench

    path = tmp_path / "loop.onnx"
    onnx.save(_loop_model(), path)
    candidates = api.inspect(path)
    assert [c.graph for c in candidates if c.rule] == ["body"]
    share = bench.mac_share(onnx.load(path), {"x": [2, 8]}, candidates)
    assert share.total == 2 * (64 + 512) and share.chains == 2 * 512 and share.after == 2 * (64 + 64)


# --- item 10: the README states the memory bound of a model that is one wide chain ------------------------------


def test_item10_readme_states_the_memory_bound_of_one_wide_chain(tmp_path):
    """`--no-validate` stays far below the model size only where chains are a small part of it: a chain's two
    weights are read whole. The README states the bound for one wide chain, measured on the benchmark's `--wide`
    model, which folds to one layer."""
    from pathlib import Path

    import lc_onnx

    root = Path(__file__).resolve().parent.parent
    bench_memory = scripts.load("memory_big_model")
    path = bench_memory.build_wide(tmp_path / "wide", 16, 256, 16)
    (r,) = lc_onnx.optimize(path, validate=False).report.rewrites
    assert r.rule == "collapse_linear_chain" and r.params_before == 16 * 256 + 256 + 256 * 16 + 16
    text = " ".join((root / "docs" / "limits.md").read_text().split())  # the README's reference moved to docs/
    assert "memory_big_model.py --wide" in text and "a model that is one wide chain peaks at" in text

"""Unnamed nodes (legal ONNX: all named '') get `inspect`'s `#index` labels in `optimize`'s report, table and
JSON, rewrites and skipped alike, while the written model keeps them unnamed."""

from __future__ import annotations

import json

import onnx
from click.testing import CliRunner
from onnx import helper

import lc_onnx
from lc_onnx import api
from lc_onnx.cli import main
from tests.builder import Builder


def unnamed() -> onnx.ModelProto:
    """x → L1 → PRelu(1) → L2 → Tanh → L3 → PRelu(0.5) → L4 → y, every node unnamed: the first chain
    collapses, the last is left for its slope (its PRelu becomes a LeakyRelu), the middle one for its Tanh."""
    b = Builder()
    h = b.linear(b.prelu(b.linear("x", 8, 32), 1.0), 32, 8)
    (h,) = b.node("Tanh", [h])
    y = b.linear(b.prelu(b.linear(h, 8, 32), 0.5), 32, 8)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    model = b.model([("x", ["N", 3, 8])], [("y", ["N", 3, 8])])
    for n in model.graph.node:
        n.name = ""
    return model


def chain_names(path) -> dict[str | None, list[list[str]]]:
    """inspect's candidates' node names, by the rule that would fire (None: left)."""
    found: dict[str | None, list[list[str]]] = {}
    for c in lc_onnx.inspect(path):
        found.setdefault(c.rule, []).append(c.names)
    return found


def test_cli_report_names_unnamed_nodes_as_inspect_does(tmp_path):
    path, out, report = tmp_path / "m.onnx", tmp_path / "m.lc.onnx", tmp_path / "r.json"
    onnx.save(unnamed(), path)
    result = CliRunner().invoke(main, ["optimize", str(path), "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    seen = chain_names(path)
    data = json.loads(report.read_text())
    by_rule = {r["rule"]: r["names"] for r in data["rewrites"]}
    assert by_rule["collapse_linear_chain"] == ["#0", "#1", "#2", "#3", "#4"] == seen["collapse_linear_chain"][0]
    assert [by_rule["prelu_to_leaky_relu"]] == seen["prelu_to_leaky_relu"] == [["#8"]]
    tanh, slope = seen[None]  # left: the chain through Tanh, and the one whose slope is 0.5
    assert [s["names"] for s in data["skipped"]][1] == slope == ["#6", "#7", "#8", "#9", "#10"]
    # the Tanh chain now starts at the fused layer, which has a name of its own; its other nodes keep their labels
    left = data["skipped"][0]["names"]
    assert left[2:] == tanh[2:] == ["#5", "#6", "#7"] and left[0].startswith("_collapsed")
    assert "#0 > ... > #4 (5 nodes)" in result.output  # the table's nodes column
    assert "  #6 > ... > #10 (5 nodes): " in result.output  # the chain left for its slope, with why


def test_written_model_keeps_unnamed_nodes_unnamed(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(unnamed(), path)
    model = lc_onnx.optimize(path).model
    kept = [n for n in model.graph.node if n.op_type in ("Tanh", "LeakyRelu", "Identity")]
    assert len(kept) == 3 and all(n.name == "" for n in kept)
    names = [n.name for n in model.graph.node] + [t.name for t in model.graph.initializer]
    assert not any("#" in name for name in names)


def test_labels_change_nothing_in_the_written_model(monkeypatch):
    """The run with labels writes the very bytes the run without them wrote: no name, derived or kept,
    moves (the fused layer's names are built from its unnamed source node's '')."""
    labelled = lc_onnx.optimize(unnamed())
    monkeypatch.setattr(api, "_node_labels", lambda graph: iter(()))
    plain = lc_onnx.optimize(unnamed())
    assert labelled.model.SerializeToString() == plain.model.SerializeToString()
    assert [r.names for r in plain.report.rewrites][0] == [""] * 5  # the blanks the labels replace
    assert [r.names for r in labelled.report.rewrites][0] == ["#0", "#1", "#2", "#3", "#4"]


def test_named_nodes_keep_their_names_in_the_report():
    model = unnamed()
    model.graph.node[1].name = "bias1"
    report = lc_onnx.optimize(model).report
    assert report.rewrites[0].names == ["#0", "bias1", "#2", "#3", "#4"]
    assert "#0 > ... > #4 (5 nodes)" in report.table()


def test_unnamed_nodes_of_a_subgraph_are_labelled_in_their_graph():
    from onnx import TensorProto

    inner = Builder(seed=1)
    y = inner.linear(inner.prelu(inner.linear("x", 8, 32), 1.0), 32, 8)
    then_g = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [4, 8])],
                               inner.inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4, 8])])
    for n in then_g.node:
        n.name = ""
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (seen,) = [c for c in lc_onnx.inspect(model) if c.rule == "collapse_linear_chain"]
    result = lc_onnx.optimize(model)
    (done,) = result.report.rewrites
    assert done.names == seen.names == ["#0", "#1", "#2", "#3", "#4"] and done.graph == seen.graph == "then"
    assert "[then] #0 > ... > #4 (5 nodes)" in result.report.table()
    (node,) = result.model.graph.node
    then_out = next(a.g for a in node.attribute if a.name == "then_branch")
    assert node.name == "" and not any("#" in n.name for n in then_out.node)

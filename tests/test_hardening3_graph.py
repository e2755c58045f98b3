"""Issue 15 (hardening 3): items 7, 8, 9 and 15 — subgraph weights, the external-data layout, what a rewrite keeps."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

import lc_onnx
from lc_onnx import io
from tests.builder import mlp
from tests.harness import optimized
from tests.harness import run as run_model
from tests.test_hardening import if_model, ort_run, save_external, x_feed

D, H = 16, 64  # W1 (D, H) and W2 (H, D): 4 KiB each, past io.EXTERNAL_THRESHOLD


def graphs(g: onnx.GraphProto, path: str = ""):
    """(path, graph) for the graph and every subgraph, the path naming the attributes on the way."""
    yield path, g
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs):
                yield from graphs(sub, f"{path}/{a.name}")


def initializers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Each graph's initializer names, by path ('' the main graph)."""
    return {path: sorted(t.name for t in g.initializer) for path, g in graphs(model.graph)}


def outer_weights_model(chains: tuple[str, ...]) -> onnx.ModelProto:
    """optimum's merged-decoder layout: W1, b1, the slope, W2 and b2 are main-graph initializers, and both If
    branches read them. A branch named in `chains` runs linear -> PRelu(1) -> linear on them; the other runs
    linear -> Relu -> linear (not a chain), so the weights stay read either way."""
    rng = np.random.default_rng(0)
    weights = {"W1": rng.standard_normal((D, H)) / 4, "b1": rng.standard_normal(H) / 10, "slope": np.ones(1),
               "W2": rng.standard_normal((H, D)) / 8, "b2": rng.standard_normal(D) / 10}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]

    def branch(name: str) -> onnx.GraphProto:
        act = ("PRelu", [f"{name}_h", "slope"]) if name in chains else ("Relu", [f"{name}_h"])
        nodes = [helper.make_node("MatMul", ["x", "W1"], [f"{name}_m"], name=f"{name}_mm1"),
                 helper.make_node("Add", [f"{name}_m", "b1"], [f"{name}_h"], name=f"{name}_add1"),
                 helper.make_node(act[0], act[1], [f"{name}_a"], name=f"{name}_act"),
                 helper.make_node("MatMul", [f"{name}_a", "W2"], [f"{name}_n"], name=f"{name}_mm2"),
                 helper.make_node("Add", [f"{name}_n", "b2"], [f"{name}_y"], name=f"{name}_add2")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                 ["N", D])])

    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def cond_feeds(cond: bool) -> dict[str, np.ndarray]:
    return {"cond": np.array(cond), "x": np.random.default_rng(3).standard_normal((4, D)).astype(np.float32)}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer, in every graph (the envelope, value_info and the stamp left out)."""
    return sum(len(io._raw_bytes(t, None) or b"") for _, g in graphs(model.graph) for t in g.initializer)


def branch_weight_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every subgraph initializer, by name."""
    return {t.name: len(io._raw_bytes(t, None) or b"") for path, g in graphs(model.graph) if path
            for t in g.initializer}


# --- item 8: branches reading a main-graph initializer ---------------------------------------------------------

def chain_rewrites(result: lc_onnx.OptimizeResult) -> list[str]:
    return [r.graph for r in result.report.rewrites if r.rule == "collapse_linear_chain"]


def test_item08_branch_reads_outer_weight_not_copied():
    """One branch's chain reads W1 and W2, which the other branch reads too: folding it would add a weight and free
    none, so it is left (and the PRelu(1) goes); W1 and W2 stay, once, in the main graph."""
    model = outer_weights_model(("then",))
    for cond in (True, False):
        result = optimized(model, feeds=cond_feeds(cond))
    found = initializers(result.model)
    assert found == {"": ["W1", "W2", "b1", "b2"], "/else_branch": [], "/then_branch": []}, found
    assert not chain_rewrites(result) and result.report.after.params < result.report.before.params  # the slope
    assert weight_bytes(result.model) <= weight_bytes(model)
    again = lc_onnx.optimize(result.model)  # a second run changes nothing
    assert not again.report.rewrites and again.report.after.params == result.report.after.params


def test_item08_chains_in_both_branches_on_outer_weights_fold_in_one_run():
    """Both branches' chains read W1 and W2: readers like any other, they group, and folding both frees the shared
    weights (2129 -> 544 params): run 1 folds both, run 2 finds nothing."""
    model = outer_weights_model(("then", "else"))
    for cond in (True, False):
        result = optimized(model, feeds=cond_feeds(cond))
    assert sorted(chain_rewrites(result)) == ["else", "then"]
    found = initializers(result.model)
    assert not found[""] and all(len(found[b]) == 2 for b in ("/then_branch", "/else_branch")), found
    assert result.report.after.params < result.report.before.params
    again = lc_onnx.optimize(result.model)
    assert not again.report.rewrites and again.report.after.params == result.report.after.params


def test_item08_an_overridable_weight_only_branches_read_stays_an_input():
    """W1 is also a graph input (IR >= 4: a default the caller may override), read only in the branches: it stays
    an input, in the main graph, and no chain takes it as a constant."""
    model = outer_weights_model(("then", "else"))
    model.graph.input.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, [D, H]))
    for cond in (True, False):
        result = optimized(model, feeds=cond_feeds(cond))
    assert [i.name for i in result.model.graph.input] == ["cond", "x", "W1"]
    found = initializers(result.model)
    assert "W1" in found[""] and not any("W1" in names for path, names in found.items() if path), found
    assert not chain_rewrites(result)


def test_item08_loop_body_reading_an_outer_weight_is_not_copied():
    """A Loop body reads W, which the main graph also reads; a chain elsewhere makes the run rewrite and export."""
    model = outer_weights_model(("then",))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["x", "W1"], ["body_y"], name="body_mm")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("body_y", TensorProto.FLOAT, ["N", H])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
    model.graph.node.append(helper.make_node("Loop", ["trips", ""], ["ys"], name="loop", body=body))
    model.graph.output.append(helper.make_tensor_value_info("ys", TensorProto.FLOAT, [2, "N", H]))
    result = optimized(model, feeds=cond_feeds(True))
    found = initializers(result.model)
    assert found["/body"] == [] and found[""].count("W1") == 1, found
    assert weight_bytes(result.model) <= weight_bytes(model)


def test_item08_external_data_is_not_doubled_by_branch_readers(tmp_path):
    src = save_external(outer_weights_model(("then",)), tmp_path / "m.onnx")
    result = lc_onnx.optimize(src)
    out = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").stat().st_size <= (tmp_path / "m.onnx.data").stat().st_size
    assert not any(found for path, found in initializers(onnx.load(out, load_external_data=False)).items() if path)
    for cond in (True, False):
        np.testing.assert_allclose(ort_run(out, cond_feeds(cond))[0], ort_run(src, cond_feeds(cond))[0],
                                   rtol=1e-4, atol=1e-5)


# --- item 9: fused branch weights go to the external data file ------------------------------------------------

def test_item09_fused_branch_weights_are_written_to_the_data_file(tmp_path):
    src = save_external(if_model(), tmp_path / "m.onnx")
    result = lc_onnx.optimize(src)
    assert any(r.graph == "then" for r in result.report.rewrites)
    out = result.save(tmp_path / "out.onnx")
    model = onnx.load(out, load_external_data=False)
    large = [t for path, g in graphs(model.graph) if path for t in g.initializer if np.prod(t.dims) * 4 >= 1024]
    assert large and all(uses_external_data(t) for t in large), [t.name for t in large if not uses_external_data(t)]
    np.testing.assert_allclose(ort_run(out, x_feed(d=32))[0], ort_run(src, x_feed(d=32))[0], rtol=1e-4, atol=1e-5)


# --- item 7: past protobuf's limit, branch weights are external too -----------------------------------------

def test_item07_past_the_size_limit_branch_weights_are_saved_external(tmp_path, monkeypatch):
    """A model over 2 GB is saved with external data on its own; its fused branch weights must go there too, else
    the shell alone is over the limit ("Failed to serialize proto"). The limit is lowered, not the model raised."""
    result = optimized(if_model(), feeds=x_feed(d=32))
    sizes = branch_weight_sizes(result.model)
    assert max(sizes.values()) >= io.EXTERNAL_THRESHOLD
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", sum(sizes.values()) // 2)  # the branch weights alone pass it
    assert io.serialized_size(result.model) == result.model.ByteSize()  # counted from dims, to the byte
    out = io.save(result.model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()
    assert out.stat().st_size < io.PROTOBUF_LIMIT  # the shell holds no branch weight
    np.testing.assert_allclose(ort_run(out, x_feed(d=32))[0], run_model(if_model(), x_feed(d=32))[0],
                               rtol=1e-4, atol=1e-5)


def test_item07_past_1_gb_fused_branch_weights_move_to_the_main_graph(tmp_path, monkeypatch):
    """Protobuf cannot copy a subgraph past 2 GB, and export and every check copy subgraphs whole: past half the limit
    the fused branch weights move to the main graph (read from there, as optimum's merged decoders read theirs),
    whose weights are streamed to the data file. The limit is lowered, not the model raised."""
    src = save_external(if_model(), tmp_path / "m.onnx")
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 4096)  # the fused 32x32 float weight is 4096 bytes: past half of it
    result = lc_onnx.optimize(src)
    assert any(r.graph == "then" for r in result.report.rewrites)
    fused = [t.name for t in result.model.graph.initializer if "collapsed" in t.name]
    branches = [name for path, names in initializers(result.model).items() if path for name in names]
    assert fused and not set(fused) & set(branches), (fused, branches)
    out = result.save(tmp_path / "out.onnx")
    on_disk = onnx.load(out, load_external_data=False)
    assert all(uses_external_data(t) for t in on_disk.graph.initializer if t.name in fused)
    np.testing.assert_allclose(ort_run(out, x_feed(d=32))[0], ort_run(src, x_feed(d=32))[0], rtol=1e-4, atol=1e-5)
    monkeypatch.undo()  # below the limit the fused weights stay in their branch
    assert not any("collapsed" in t.name for t in lc_onnx.optimize(src).model.graph.initializer)


# --- item 15: doc strings of inputs and outputs, quantization_annotation, training_info ----------------------

def annotated_model() -> onnx.ModelProto:
    model = mlp()
    model.graph.input[0].doc_string = "the tokens' features"
    model.graph.output[0].doc_string = "the logits"
    dying = model.graph.node[0].output[0]  # the first MatMul's output: gone once the chain folds
    for name in ("x", dying, "y"):  # their scales: initializers only the annotations read
        model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), f"{name}_scale"))
        model.graph.quantization_annotation.add(
            tensor_name=name, quant_parameter_tensor_names=[onnx.StringStringEntryProto(key="SCALE_TENSOR",
                                                                                        value=f"{name}_scale")])
    algorithm = helper.make_graph([], "step", [], [])
    model.training_info.add(algorithm=algorithm, update_binding=[onnx.StringStringEntryProto(key="a", value="b")])
    return model


def test_item15_doc_strings_quantization_annotation_and_training_info_are_kept():
    model = annotated_model()
    result = lc_onnx.optimize(model)
    assert result.report.rewrites
    out = result.model
    assert out.graph.input[0].doc_string == "the tokens' features"
    assert out.graph.output[0].doc_string == "the logits"
    assert [a.tensor_name for a in out.graph.quantization_annotation] == ["x", "y"]  # the dying tensor's goes
    assert out.graph.quantization_annotation[1].quant_parameter_tensor_names[0].value == "y_scale"
    scales = sorted(t.name for t in out.graph.initializer if t.name.endswith("_scale"))
    assert scales == ["x_scale", "y_scale"]
    assert list(out.training_info) == list(model.training_info)


def test_a_weight_training_info_binds_is_never_folded():
    """A training_info that updates (or reads) a chain's weight trains it in place: folding it would leave the
    binding naming a removed initializer, which onnx.checker does not catch. The chain is left, saying why; a
    binding to a weight no chain holds changes nothing."""
    model = mlp()
    weight = model.graph.node[0].input[1]  # the first MatMul's weight
    step = helper.make_graph([helper.make_node("Identity", [weight], ["w_next"])], "step", [],
                             [helper.make_tensor_value_info("w_next", TensorProto.FLOAT, None)])
    model.training_info.add(algorithm=step, update_binding=[onnx.StringStringEntryProto(key=weight, value="w_next")])
    result = lc_onnx.optimize(model)
    assert [r.rule for r in result.report.rewrites] == ["eliminate_unit_activation"]  # the slope-1 PRelu alone
    assert weight in {t.name for t in result.model.graph.initializer}
    assert "weight of MatMul_3 is trained in place (the model's training_info binds it)" in result.report.table()
    assert [c.names for c in lc_onnx.inspect(model) if c.rule and c.kind == "chain"] == []  # inspect agrees
    read_only = mlp()
    read_only.training_info.add(algorithm=helper.make_graph([], "step", [], []),
                                update_binding=[onnx.StringStringEntryProto(key="not_a_weight", value="b")])
    assert optimized(read_only, rewrites=1).report.rewrites


def test_training_info_reads_of_the_inference_graph_survive():
    """A training_info may read a hidden tensor of the inference graph, and a Gradient node names the weights it
    differentiates in its attributes: both stay (as a graph output would), and the chain is left."""
    model = mlp(slope=0.99)
    hidden = model.graph.node[1].output[0]  # the first layer's output (MatMul + Add)
    weight = model.graph.node[0].input[1]
    step = helper.make_graph([helper.make_node("ReduceSum", [hidden], ["loss"], keepdims=0),
                              helper.make_node("Gradient", ["x"], ["dw"], domain="ai.onnx.preview.training",
                                               xs=[weight], y="y")],
                             "step", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, None),
                                          helper.make_tensor_value_info("dw", TensorProto.FLOAT, None)])
    model.training_info.add(algorithm=step)
    model.opset_import.append(helper.make_opsetid("ai.onnx.preview.training", 1))
    out = lc_onnx.optimize(model, rtol=1.0).model
    produced = {o for n in out.graph.node for o in n.output} | {t.name for t in out.graph.initializer}
    assert hidden in produced and weight in produced
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]  # no output added


def test_a_weight_only_if_branches_read_is_protected_when_training_info_binds_it():
    """optimum's merged decoders keep the weights in the main graph and read them from both If branches."""
    d, h = 8, 32
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((d, h)) / 4).astype(np.float32), "w1"),
               numpy_helper.from_array(np.array([0.99], np.float32), "a"),
               numpy_helper.from_array((rng.standard_normal((h, d)) / 8).astype(np.float32), "w2")]

    def branch(tag: str) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["x", "w1"], [f"h{tag}"], name=f"fc1{tag}"),
                 helper.make_node("PRelu", [f"h{tag}", "a"], [f"p{tag}"], name=f"act{tag}"),
                 helper.make_node("MatMul", [f"p{tag}", "w2"], [f"y{tag}"], name=f"fc2{tag}")]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, [4, d])])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("T"), else_branch=branch("E"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, d])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    step = helper.make_graph([helper.make_node("Identity", ["w1"], ["nxt"])], "step", [],
                             [helper.make_tensor_value_info("nxt", TensorProto.FLOAT, None)])
    model.training_info.add(algorithm=step, update_binding=[onnx.StringStringEntryProto(key="w1", value="nxt")])
    assert lc_onnx.optimize(model, rtol=1.0, validate=False).report.rewrites  # the PRelus (slope within tol) go
    result = lc_onnx.optimize(model, rtol=1.0, allow_growth=True)
    assert not [r for r in result.report.rewrites if r.shape]  # no chain folded, in either branch
    assert "w1" in {t.name for t in result.model.graph.initializer}
    assert all("trained in place" in c.reason for c in result.report.skipped)

"""`lc-onnx bench`: interleaved runs, the table and JSON, batch and provider handling. No timing asserts."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from lc_onnx import bench
from lc_onnx.cli import main
from tests.builder import mlp


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(rank=3), a)
    onnx.save(mlp(rank=3, slope=None), b)
    return a, b


def invoke(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_two_models_table_and_json(pair, tmp_path):
    out = tmp_path / "b.json"
    result = invoke(*pair, "--runs", 3, "--warmup", 1, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["model", "median"] and "1.00x" in lines[1] and str(pair[1]) in lines[2]
    data = json.loads(out.read_text())
    assert data["inputs"] == {"x": [4, 3, 8]} and data["runs"] == 3 and data["provider"] == "cpu"
    first, second = data["models"]
    assert first["speedup_vs_first"] == 1.0 and second["runs"] == 3
    assert first["p10_ms"] <= first["median_ms"] <= first["p90_ms"]


def test_models_run_interleaved(pair, monkeypatch):
    order = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, *_):
            order.append(self.name)

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(bench, "session", lambda m, *a, **k: Fake(m.name))
    bench.interleaved(list(pair) + [pair[0].with_name("c.onnx")], {}, runs=3, warmup=1)
    warm, timed = order[:3], order[3:]
    assert warm == ["a.onnx", "b.onnx", "c.onnx"]
    assert timed == ["a.onnx", "b.onnx", "c.onnx", "b.onnx", "c.onnx", "a.onnx", "c.onnx", "a.onnx", "b.onnx"]


def test_cuda_without_cuda_is_exit_2_not_a_cpu_fallback(pair, monkeypatch):
    monkeypatch.setattr(bench.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = invoke(pair[0], "--provider", "cuda")
    assert result.exit_code == 2 and "CUDAExecutionProvider is not available" in result.stderr


def test_provider_that_falls_back_is_an_error(pair, monkeypatch):
    class CpuOnly:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(bench, "session", lambda *a, **k: CpuOnly())
    with pytest.raises(bench.InputError, match="fell back"):
        bench.interleaved([pair[0]], {}, runs=1, warmup=0, providers=["CUDAExecutionProvider"])


def test_fixed_batch_dim_and_mismatched_inputs_are_exit_2(tmp_path, pair):
    fixed = tmp_path / "fixed.onnx"
    model = mlp(rank=3)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, fixed)
    result = invoke(fixed, "--batch", 8)
    assert result.exit_code == 2 and "fixed first dim" in result.stderr
    other = tmp_path / "other.onnx"
    renamed = mlp(rank=3)
    renamed.graph.input[0].name = "z"
    for n in renamed.graph.node:
        n.input[:] = ["z" if i == "x" else i for i in n.input]
    onnx.save(renamed, other)
    result = invoke(pair[0], other)
    assert result.exit_code == 2 and "cannot share inputs" in result.stderr


def test_one_model_with_given_inputs_prints_no_progress_off_a_terminal(pair, tmp_path):
    import numpy as np

    feeds = tmp_path / "x.npz"
    np.savez(feeds, x=np.ones((5, 3, 8), np.float32))
    out = tmp_path / "one.json"
    result = invoke(pair[0], "--inputs", feeds, "--runs", 2, "--warmup", 0, "--threads", 1, "--json", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # CliRunner is not a terminal: no progress bar
    assert len(result.stdout.splitlines()) == 5  # header, one model, the settings line, the input, the MAC share
    data = json.loads(out.read_text())
    assert data["inputs"] == {"x": [5, 3, 8]} and data["threads"] == 1 and len(data["models"]) == 1


def test_bad_input_shape_and_unknown_input_are_exit_2(pair):
    result = invoke(pair[0], "--input-shape", "x:3,a")
    assert result.exit_code == 2 and result.stderr.startswith("error: --input-shape")
    result = invoke(pair[0], "--input-shape", "nope:1,3,8")
    assert result.exit_code == 2 and "has no input 'nope'" in result.stderr
    result = invoke(pair[0], "--runs", 0)
    assert result.exit_code == 2 and "--runs" in result.stderr


def test_io_binding_runs_through_bound_buffers_not_session_run(pair, tmp_path, monkeypatch):
    import onnxruntime as ort

    def no_plain_run(*a, **k):
        raise AssertionError("sess.run called with --io-binding")

    monkeypatch.setattr(ort.InferenceSession, "run", no_plain_run)
    calls = []
    real = ort.InferenceSession.run_with_iobinding
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding",
                        lambda self, b, *a: (calls.append(b), real(self, b, *a))[1])
    out = tmp_path / "io.json"
    result = invoke(*pair, "--io-binding", "--runs", 3, "--warmup", 1, "--json", out)
    assert result.exit_code == 0, result.output
    assert "inputs and outputs bound on the device (IOBinding)" in result.stdout
    assert len(calls) == 2 * (1 + 1 + 3)  # per model: the run that places the outputs, warm-up, timed runs
    assert len({id(b) for b in calls}) == 2  # one binding per model, reused
    data = json.loads(out.read_text())
    assert data["io_binding"] is True and data["cuda_graph"] is False


def test_bound_step_writes_into_the_same_output_buffer():
    import numpy as np

    sess = bench.session(mlp(rank=2))
    feeds = {"x": np.ones((4, 8), np.float32)}
    step = bench._Bound(sess, feeds, "cpu")
    outputs = step.outputs
    first = outputs[0].data_ptr()
    step()
    step()
    assert outputs[0].data_ptr() == first
    assert np.allclose(outputs[0].numpy(), sess.run(None, feeds)[0])


def test_cuda_graph_on_the_cpu_provider_is_one_line_exit_2(pair):
    result = invoke(pair[0], "--cuda-graph")
    assert result.exit_code == 2
    assert result.stderr == "error: --cuda-graph needs --provider cuda (ONNX Runtime captures CUDA graphs only " \
                            "there), not cpu\n"
    with pytest.raises(bench.InputError, match="--cuda-graph needs --provider cuda"):
        bench.bench_files([pair[0]], "cpu", cuda_graph=True)


def test_cuda_graph_asks_cuda_for_it_and_binds_on_the_device(pair, monkeypatch):
    seen = {}

    class Fake:
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def session(m, providers, *a, **k):
        seen["providers"] = providers
        seen.setdefault("dims", []).append([d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim])
        return Fake()

    monkeypatch.setattr(bench.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(bench, "session", session)
    monkeypatch.setattr(bench, "_Bound", lambda s, feeds, device: seen.setdefault("device", device) and (lambda: None))
    result = bench.bench_files(list(pair), "cuda", batch=4, runs=2, warmup=1, cuda_graph=True)
    assert seen["providers"] == [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
    assert seen["device"] == "cuda" and result.io_binding and result.cuda_graph
    assert seen["dims"] == [[4, 3, 8]] * 2  # each model's inputs pinned to the shapes it is fed


def test_pinned_inputs_let_ort_fold_the_shape_subgraphs(tmp_path):
    """What --cuda-graph needs: with the dynamic batch fixed, ORT folds the Shape -> Gather -> Concat reshape
    targets (left open they run on the CPU and feed CUDA through Memcpy, and ORT refuses to capture)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    class Flatten(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x.reshape(x.shape[0], -1)) * x.shape[0]

    path = tmp_path / "flat.onnx"
    torch.onnx.export(Flatten(), (torch.randn(2, 3, 4),), path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})

    def optimized(model):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(tmp_path / "opt.onnx"), sess

    model = bench.pinned(path, {"x": [5, 3, 4]})
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [5, 3, 4]
    assert "Shape" in {n.op_type for n in optimized(onnx.load(path))[0].graph.node}
    folded, sess = optimized(model)
    assert "Shape" not in {n.op_type for n in folded.graph.node}
    x = np.random.default_rng(0).standard_normal((5, 3, 4), dtype=np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x.reshape(5, -1), 0) * 5)


def test_mac_share_of_the_collapsible_chain(pair, tmp_path):
    from lc_onnx import api

    out = tmp_path / "m.json"
    result = invoke(*pair, "--runs", 1, "--warmup", 0, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    macs = json.loads(out.read_text())["macs"]
    rows = 4 * 3  # batch 4, the rank-3 mlp's middle dim 3
    assert macs["by_op"]["MatMul"] == macs["total"] == rows * (8 * 32 + 32 * 8)
    assert macs["chains"] == macs["total"] and macs["chain_count"] == 1 and macs["share"] == 1.0
    assert macs["after"] == rows * 8 * 8 and macs["mac_ratio"] == 8.0 and macs["unknown"] == []
    assert "1 collapsible chain(s) hold 100.0%" in result.stdout and "(8.00x fewer)" in result.stdout
    # a slope outside --tol: nothing collapses, nothing to gain
    left = tmp_path / "left.onnx"
    onnx.save(mlp(rank=3, slope=0.5), left)
    share = bench.mac_share(onnx.load(left), {"x": [4, 3, 8]}, api.inspect(left))
    assert share.chains == 0 and share.share == 0.0 and share.mac_ratio == 1.0 and share.total == rows * 512


def test_node_macs_of_gemm_conv_and_batched_matmul():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((16, 3, 3, 3), np.float32), "w")  # C_out 16, C_in 3, 3x3
    g = numpy_helper.from_array(np.zeros((10, 16 * 6 * 6), np.float32), "g")  # Gemm weight, transB
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g"], ["y"], name="gemm", transB=1),
        helper.make_node("MatMul", ["a", "b"], ["z"], name="bmm"),
    ]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6]),
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 5, 7]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 7, 2]),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, g])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    found, unknown = bench.node_macs(model, {"x": [2, 3, 6, 6], "a": [2, 4, 5, 7], "b": [2, 4, 7, 2]})
    assert found == {"conv": ("Conv", 2 * 16 * 6 * 6 * 3 * 3 * 3), "gemm": ("Gemm", 2 * 10 * 576),
                     "bmm": ("MatMul", 2 * 4 * 5 * 2 * 7)} and unknown == []
    found, unknown = bench.node_macs(model, {"x": [2, 3, 6, 6]})  # a and b left open: bmm unknown
    assert "bmm" not in found and unknown == ["bmm"]


def _three_layers(named: bool = True) -> onnx.ModelProto:
    """64 -> 256 -> 256 -> 64 with unit slopes: inspect gives two chains that share the middle layer."""
    from onnx import helper

    from tests.builder import Builder

    b = Builder()
    h = b.prelu(b.linear("x", 64, 256), 1.0)
    h = b.prelu(b.linear(h, 256, 256), 1.0)
    b.nodes.append(helper.make_node("Identity", [b.linear(h, 256, 64)], ["y"], name="out"))
    model = b.model([("x", ["N", 64])], [("y", ["N", 64])])
    if not named:
        for n in model.graph.node:
            n.name = ""
    return model


@pytest.mark.parametrize("named", [True, False])
def test_mac_share_counts_a_run_of_chains_that_share_a_layer_once(tmp_path, named):
    from lc_onnx import api

    path = tmp_path / "mlp3.onnx"
    onnx.save(_three_layers(named), path)
    share = bench.mac_share(onnx.load(path), {"x": [2, 64]}, api.inspect(path))
    total = 2 * (64 * 256 + 256 * 256 + 256 * 64)
    assert share.total == share.chains == total and share.share == 1.0 and share.chain_count == 1
    assert share.after == 2 * 64 * 64 and share.mac_ratio == 24.0
    assert "1 collapsible chain(s) hold 100.0%" in share.line()


def test_unnamed_nodes_are_told_apart_by_inspect():
    from lc_onnx import api

    chains = [c for c in api.inspect(_three_layers(named=False)) if c.kind == "chain"]
    assert len(chains) == 2 and all(name.startswith("#") for c in chains for name in c.names)
    assert len(set(chains[0].names) & set(chains[1].names)) == 2  # the middle layer's MatMul and Add


def test_run_failure_on_given_inputs_does_not_blame_random_ones(tmp_path):
    import numpy as np

    from tests.test_hardening import reshape_fails_model

    path, data = tmp_path / "reshape.onnx", tmp_path / "in.npz"
    onnx.save(reshape_fails_model(), path)
    np.savez(data, x=np.ones((2, 3, 8), np.float32))  # the wrong batch for its Reshape to [5, 24]
    result = invoke(path, "--runs", 1, "--warmup", 0, "--inputs", data)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "on the inputs given with --inputs" in result.stderr and "random" not in result.stderr
    result = invoke(path, "--runs", 1, "--warmup", 0)
    assert "on the random inputs" in result.stderr and "pass real data with --inputs" in result.stderr


def _fan_out(tail: bool = False) -> onnx.ModelProto:
    """x[N,3,8] → 8→32 → PRelu(1) → two heads 32→8 and 32→4 (collapse_fan_out); with `tail`, the 8-wide head
    goes on through Tanh into a 8→16 layer that no rule folds."""
    from onnx import helper

    from tests.builder import Builder

    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    y1, y2 = b.linear(h, 32, 8), b.linear(h, 32, 4)
    outputs = [(y1, ["N", 3, 8]), (y2, ["N", 3, 4])]
    if tail:
        (t,) = b.node("Tanh", [y1])
        outputs[0] = (b.linear(t, 8, 16), ["N", 3, 16])
    for i, (y, _) in enumerate(outputs):
        b.nodes.append(helper.make_node("Identity", [y], [f"y{i}"], name=f"out{i}"))
    return b.model([("x", ["N", 3, 8])], [(f"y{i}", s) for i, (_, s) in enumerate(outputs)])


def _split(slopes, slope_shape=(32,)) -> onnx.ModelProto:
    """x[N,3,8] → 8→32 → PRelu(one slope per unit) → 32→8 → Tanh → 8→16: the block splits, the last layer stays."""
    from onnx import helper

    from tests.builder import Builder

    b = Builder()
    y = b.linear(b.prelu(b.linear("x", 8, 32), slopes, slope_shape), 32, 8)
    (t,) = b.node("Tanh", [y])
    b.nodes.append(helper.make_node("Identity", [b.linear(t, 8, 16)], ["y"], name="out"))
    return b.model([("x", ["N", 3, 8])], [("y", ["N", 3, 16])])


def _share_and_optimized_macs(model: onnx.ModelProto, tmp_path, shapes=None):
    """mac_share of the model at x [4, 3, 8] (12 rows), and the MACs node_macs counts on its optimized form."""
    import lc_onnx
    from lc_onnx import api

    shapes = shapes or {"x": [4, 3, 8]}
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    share = bench.mac_share(onnx.load(path), shapes, api.inspect(path))
    found, unknown = bench.node_macs(lc_onnx.optimize(path).model, shapes)
    assert unknown == []
    return share, sum(m for _, m in found.values())


def test_mac_share_counts_a_fan_out_block_as_its_folded_heads(tmp_path):
    share, optimized = _share_and_optimized_macs(_fan_out(), tmp_path)
    rows = 12
    assert share.total == share.chains == rows * (8 * 32 + 32 * 8 + 32 * 4) and share.chain_count == 1
    assert share.after == rows * 8 * (8 + 4) == optimized  # two folded heads: 8→8 and 8→4
    assert share.share == 1.0 and share.unsaved == 0
    assert "1 collapsible chain(s) hold 100.0%" in share.line() and "no saving" not in share.line()


@pytest.mark.parametrize("slope_shape", [(32,), (1, 1, 32)])
def test_mac_share_counts_a_split_block_as_its_direct_map_and_narrow_mlp(tmp_path, slope_shape):
    import numpy as np

    slopes = np.ones(32)
    slopes[[3, 17]] = 0.25  # 30 linear units, 2 others
    share, optimized = _share_and_optimized_macs(_split(slopes, slope_shape), tmp_path)
    rows, tail = 12, 12 * 8 * 16
    assert share.total == rows * (8 * 32 + 32 * 8) + tail and share.chains == rows * 512 and share.chain_count == 1
    assert share.after == rows * (8 * 8 + 2 * (8 + 8)) + tail == optimized  # direct 8x8, narrow 8>2>8; tail kept
    assert share.share == pytest.approx(512 / (512 + 128))


def test_mac_share_of_a_split_tells_linear_units_by_their_slope_range(tmp_path):
    """Linear units with slopes spread within tol, and one unit just outside it: the range inspect gives picks
    exactly the linear ones (29 of 32)."""
    import numpy as np

    slopes = 1 + np.linspace(-0.045, 0.045, 32)  # within the default tol 0.05
    slopes[[3, 17]] = 0.25
    slopes[30] = 1.06
    share, optimized = _share_and_optimized_macs(_split(slopes), tmp_path)
    assert share.after == 12 * (8 * 8 + 3 * (8 + 8)) + 12 * 8 * 16 == optimized


def test_mac_share_of_a_fan_out_beside_other_chains_counts_no_saving(tmp_path):
    """A head that starts a chain of its own: the run's fold depends on the order the rules fire, so its
    MACs are in the share but no saving is counted, and the line says so."""
    from lc_onnx import api
    from tests.builder import Builder

    b = Builder()
    h = b.prelu(b.linear("x", 8, 32), 1.0)
    y1 = b.linear(b.prelu(b.linear(h, 32, 32), 1.0), 32, 4)
    y2 = b.linear(h, 32, 8)
    path = tmp_path / "mixed.onnx"
    onnx.save(b.model([("x", ["N", 8])], [(y1, ["N", 4]), (y2, ["N", 8])]), path)
    share = bench.mac_share(onnx.load(path), {"x": [2, 8]}, api.inspect(path))
    assert share.chains == share.total == share.after == 2 * (8 * 32 + 32 * 32 + 32 * 4 + 32 * 8)
    assert share.unsaved == 1 and share.chain_count == 1
    assert "(1 fan-out/split run(s) counted with no saving)" in share.line()


def test_bench_json_counts_the_fan_out(tmp_path):
    path, out = tmp_path / "fan.onnx", tmp_path / "fan.json"
    onnx.save(_fan_out(tail=True), path)
    result = invoke(path, "--runs", 1, "--warmup", 0, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    macs = json.loads(out.read_text())["macs"]
    tail = 12 * 8 * 16
    assert macs["total"] == 12 * (8 * 32 + 32 * 8 + 32 * 4) + tail and macs["after"] == 12 * 8 * 12 + tail
    assert macs["unsaved"] == 0 and "not counted" not in result.stdout


def test_bench_reads_a_split_slope_kept_as_external_data(tmp_path, monkeypatch):
    """The slopes are read from the model's own folder, not the current directory."""
    import numpy as np

    slopes = np.ones(32)
    slopes[[3, 17]] = 0.25
    path, out = tmp_path / "split.onnx", tmp_path / "split.json"
    onnx.save(_split(slopes), path, save_as_external_data=True, location="split.data", size_threshold=0)
    monkeypatch.chdir(tmp_path.parent)
    result = invoke(path, "--runs", 1, "--warmup", 0, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    macs = json.loads(out.read_text())["macs"]
    assert macs["after"] == 12 * (8 * 8 + 2 * (8 + 8)) + 12 * 8 * 16


def test_split_whose_prelu_name_repeats_is_counted_with_no_saving(tmp_path):
    """Names may repeat (legal ONNX): a PRelu that its name does not single out is not guessed at."""
    import numpy as np

    from lc_onnx import api

    slopes = np.ones(32)
    slopes[[3, 17]] = 0.25
    model = _split(slopes)
    for n in model.graph.node:
        if n.op_type in ("PRelu", "Tanh"):
            n.name = "dup"
    path = tmp_path / "dup.onnx"
    onnx.save(model, path)
    share = bench.mac_share(onnx.load(path), {"x": [4, 3, 8]}, api.inspect(path))
    assert share.chains == 12 * 512 and share.after == share.total and share.unsaved == 1


def test_pinned_sets_an_undeclared_shape_and_refuses_another_rank(tmp_path):
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.5] * 12)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "noshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = bench.pinned(path, {"x": [2, 4]})
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 4]
    with pytest.raises(bench.InputError, match="input 'x' has rank 2, not the 3"):
        bench.pinned(_saved(model, tmp_path), {"x": [1, 2, 4]})


def _saved(model, tmp_path):
    path = tmp_path / "pinned.onnx"
    onnx.save(model, path)
    return path

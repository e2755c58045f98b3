"""Issue 8 (hardening): one test per item of the app side (files, validation inputs, errors, exit codes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import lc_onnx
from lc_onnx import io
from lc_onnx.cli import main
from tests.builder import Builder, mlp

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def save_external(model, path, location=None, **kw):
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location or f"{path.name}.data", size_threshold=0, **kw)
    return path


def ort_run(path, feeds):
    """ONNX Runtime on a model file, which resolves external data against the file's own folder."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def x_feed(n=3, d=8):
    return {"x": np.random.default_rng(5).standard_normal((n, 3, d)).astype(np.float32)}


def constant_model(**kw) -> onnx.ModelProto:
    """`mlp` with its weights in Constant nodes (Paddle exports, silero-vad) instead of initializers."""
    m = mlp(**kw)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def if_model() -> onnx.ModelProto:
    """y = If(true, then: chain on the outer x, else: one linear layer); weights live in the branches."""
    then, other = Builder(seed=1), Builder(seed=2)
    other._n = 100  # names stay unique across the branches
    y = then.linear(then.prelu(then.linear("x", 32, 64), 1.0), 64, 32)
    then.nodes.append(helper.make_node("Identity", [y], ["then_y"]))
    z = other.linear("x", 32, 32)  # large enough to stay external data in the output
    other.nodes.append(helper.make_node("Identity", [z], ["else_y"]))
    out = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 3, 32]) for n in ("then_y", "else_y")]
    branches = [helper.make_graph(b.nodes, name, [], [o], b.inits)
                for b, name, o in ((then, "then", out[0]), (other, "else", out[1]))]
    nodes = [
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond_value")),
        helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 32])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def edit_external(path, edit):
    """Change the external_data entries of every external tensor of a saved model (all graphs, attributes)."""
    m = onnx.load(path, load_external_data=False)
    for t in io.all_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {kv.key: kv.value for kv in t.external_data}
            edit(t, info)
            del t.external_data[:]
            for k, v in info.items():
                t.external_data.add(key=k, value=v)
    onnx.save(m, path)


# --- data loss and wrong weights ----------------------------------------------------------------------------

def test_item1_no_write_lands_on_a_file_the_input_reads(tmp_path):
    # a renamed torch export: model_v2.onnx keeps its weights in model.onnx.data
    src = save_external(mlp(), tmp_path / "model_v2.onnx", location="model.onnx.data")
    data = tmp_path / "model.onnx.data"
    before = data.read_bytes()
    for args in (["-o", tmp_path / "model.onnx"], ["-o", data],
                 ["-o", tmp_path / "out.onnx", "--report", data],
                 ["-o", tmp_path / "model.onnx", "--overwrite"]):
        result = invoke("optimize", src, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "reads" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert data.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.data", "model_v2.onnx"]
    # the API refuses the same when saving
    result = lc_onnx.optimize(src)
    with pytest.raises(lc_onnx.InputError, match="reads"):
        result.save(tmp_path / "model.onnx")
    assert data.read_bytes() == before


def test_item1_in_place_overwrite_still_allowed(tmp_path):
    src = save_external(mlp(), tmp_path / "m.onnx")
    want = ort_run(src, x_feed())
    assert invoke("optimize", src, "-o", src, "--overwrite", "-q").exit_code == 0
    np.testing.assert_allclose(ort_run(src, x_feed())[0], want[0], rtol=1e-4, atol=1e-5)


def test_item2_report_may_not_replace_the_input_or_the_output(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    before = src.read_bytes()
    result = invoke("optimize", src, "--report", src)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    out = tmp_path / "out.onnx"
    result = invoke("optimize", src, "-o", out, "--report", out)
    assert result.exit_code == 2 and "--report" in result.stderr
    assert src.read_bytes() == before and not out.exists()


def test_item3_constant_node_data_comes_from_the_model_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = save_external(constant_model(), tmp_path / "a" / "c.onnx", convert_attribute=True)
    data = tmp_path / "a" / "c.onnx.data"
    (tmp_path / "b" / "c.onnx.data").write_bytes(bytes(data.stat().st_size))  # a decoy of zeros in the cwd
    monkeypatch.chdir(tmp_path / "b")
    out = tmp_path / "a" / "out.onnx"
    result = invoke("optimize", src, "-o", out, "--no-validate", "-q")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(ort_run(out, x_feed())[0], ort_run(src, x_feed())[0], rtol=1e-4, atol=1e-5)
    assert invoke("optimize", src, "-o", out, "-q").exit_code == 0  # and validation agrees
    # the path guard holds for Constant nodes too: a symlink out of the model's folder is refused
    (tmp_path / "a" / "link.data").symlink_to(tmp_path / "b" / "c.onnx.data")
    edit_external(src, lambda t, info: info.update(location="link.data"))
    result = invoke("optimize", src, "-o", out, "--no-validate", "-q")
    assert result.exit_code == 2 and "outside" in result.stderr


def test_item3_one_resolver_reads_every_external_tensor(tmp_path, monkeypatch):
    src = save_external(if_model(), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path.parent)
    model = io.load(src)  # weights loaded: through lc_onnx's resolver, relative to the model's folder
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in io.all_tensors(model))
    with pytest.raises(lc_onnx.InputError, match="pass its path"):  # a bare ModelProto has no folder to read from
        lc_onnx.optimize(onnx.load(src, load_external_data=False))
    edit_external(src, lambda t, info: info.update(location="../m.onnx.data"))
    with pytest.raises(lc_onnx.InputError, match="outside"):
        io.load(src)


# --- real models and exports ------------------------------------------------------------------------------

def embedding_model() -> onnx.ModelProto:
    """OPT-like: position ids from the cumulative attention mask, token ids into a 3-row table, then an MLP."""
    b = Builder()
    emb = b.const(b.rng.standard_normal((3, 8)), "tokens")
    pos = b.const(b.rng.standard_normal((5, 8)), "positions")
    (tok,) = b.node("Gather", [emb, "input_ids"])
    (cum,) = b.node("CumSum", ["attention_mask", b.const(1, dtype=np.int64)])
    (p,) = b.node("Gather", [pos, cum])
    (h,) = b.node("Add", [tok, p])
    y = b.linear(b.prelu(b.linear(h, 8, 32), 1.0), 32, 8)
    graph = helper.make_graph(
        b.nodes, "emb",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["N", 4]),
         helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["N", 4, 8])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_item7_validation_inputs_real_models_accept(tmp_path):
    src = tmp_path / "opt.onnx"
    onnx.save(embedding_model(), src)
    report = tmp_path / "r.json"
    result = invoke("optimize", src, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    drawn = json.loads(report.read_text())["validation"]["drawn"]
    assert drawn["attention_mask"] == "ones (a mask)"
    assert drawn["input_ids"] == "integers in [0, 3) (indices into 'tokens')"


def test_item8_subgraph_external_data_works_from_any_cwd(tmp_path, monkeypatch):
    for d in "abc":
        (tmp_path / d).mkdir()
    save_external(if_model(), tmp_path / "a" / "m.onnx")
    monkeypatch.chdir(tmp_path / "b")
    result = invoke("optimize", "../a/m.onnx", "-o", "../c/out.onnx")
    assert result.exit_code == 0, result.output
    assert "[then] " in result.output and "validation passed" in result.output  # the branch's chain collapsed
    out = tmp_path / "c" / "out.onnx"
    locations = {kv.value for t in io.all_tensors(onnx.load(out, load_external_data=False))
                 for kv in t.external_data if kv.key == "location"}
    assert locations == {"out.onnx.data"}  # every external tensor, branches included, lives beside the output
    monkeypatch.chdir(tmp_path)
    feed = x_feed(d=32)
    np.testing.assert_allclose(ort_run(out, feed)[0], ort_run(tmp_path / "a" / "m.onnx", feed)[0],
                               rtol=1e-4, atol=1e-5)


def reshape_fails_model() -> onnx.ModelProto:
    """Runs only when x's first dim is 5: ORT fails inside the graph on the default validation inputs."""
    b = Builder()
    (r,) = b.node("Reshape", ["x", b.const([5, 24], dtype=np.int64)])
    y = b.linear(b.prelu(b.linear(r, 24, 32), 1.0), 32, 8)
    return b.model([("x", ["N", 3, 8])], [(y, [5, 8])])


def test_item9_one_error_line_without_runtime_or_numpy_noise(tmp_path, capfd):
    src = tmp_path / "m.onnx"
    onnx.save(reshape_fails_model(), src)
    result = invoke("optimize", src)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "onnxruntime" not in capfd.readouterr().err  # ORT's own logger stays silent
    # a float16 fold past 65504: numpy's overflow warning is not printed beside our output
    b = Builder(np.float16)
    big = b.const(np.eye(8) * 300)
    y = b.linear(b.prelu(b.linear("x", 8, 8, weight=big, bias=False), 1.0), 8, 8, weight=big, bias=False)
    onnx.save(b.model([("x", ["N", 8])], [(y, ["N", 8])]), src)
    result = invoke("optimize", src, "--no-validate", "-q")
    assert "Warning" not in result.stderr and "Warning" not in capfd.readouterr().err


def test_item11_default_rtol_follows_what_was_rewritten_not_tol(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(slope=0.5), src)
    result = invoke("optimize", src, "--tol", "10", "--no-budget")  # a slope of 0.5 taken as 1: far past 1e-2
    assert result.exit_code == 1 and "validation failed" in result.stderr
    result = invoke("optimize", src, "--tol", "10")  # the budget leaves that block, with its error
    assert result.exit_code == 0 and "over rtol 0.01" in result.output
    assert invoke("optimize", src, "--tol", "10", "--rtol", "1", "-q").exit_code == 0  # the user may allow it
    onnx.save(mlp(slope=1.0), src)
    assert lc_onnx.optimize(src, tol=0.5).report.validation.rtol == 1e-4  # exact rewrite: tol does not matter
    onnx.save(mlp(slope=0.999), src)
    assert lc_onnx.optimize(src, tol=0.01).report.validation.rtol == pytest.approx(1e-3, rel=1e-3)


# --- exit 3 where exit 2 (or 0) is right ------------------------------------------------------------------

def test_exit_external_data_without_length_works(tmp_path):
    src = save_external(mlp(), tmp_path / "m.onnx")
    edit_external(src, lambda t, info: info.pop("length", None))
    result = invoke("optimize", src, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "m.lc.onnx"
    np.testing.assert_allclose(ort_run(out, x_feed())[0], ort_run(src, x_feed())[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["negative offset", "length off the dims", "constant longer than its dims"])
def test_exit_damaged_external_data_is_exit_2(tmp_path, case):
    if case == "constant longer than its dims":
        m = constant_model()
        t = m.graph.node[0].attribute[0].t
        t.raw_data = t.raw_data + b"\0" * 8
        src = tmp_path / "m.onnx"
        onnx.save(m, src)
    else:
        src = save_external(mlp(), tmp_path / "m.onnx")
        key, value = ("offset", "-4") if case == "negative offset" else ("length", "8")
        edit_external(src, lambda t, info: info.update({key: value}) if math.prod(t.dims) > 2 else None)
    result = invoke("optimize", src)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_exit_unwritable_report_is_exit_2_before_any_work(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    for report in (tmp_path / "nodir" / "r.json", tmp_path):
        result = invoke("optimize", src, "--report", report)
        assert result.exit_code == 2 and "--report" in result.stderr, result.output
        assert not (tmp_path / "m.lc.onnx").exists()


@pytest.mark.parametrize("case", ["npy", "empty", "truncated"])
def test_exit_bad_inputs_file_is_exit_2(tmp_path, case):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    given = tmp_path / "in.npz"
    if case == "npy":
        given = tmp_path / "in.npy"
        np.save(given, np.ones((2, 3, 8), np.float32))
    elif case == "empty":
        given.write_bytes(b"")
    else:
        np.savez(given, x=np.ones((2, 3, 8), np.float32))
        given.write_bytes(given.read_bytes()[:-30])
    result = invoke("optimize", src, "--inputs", given)
    assert result.exit_code == 2 and "--inputs" in result.stderr, result.output


def test_exit_bad_input_shape_and_seed_are_exit_2(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    result = invoke("optimize", src, "--input-shape", "x:-1,3,8")
    assert result.exit_code == 2 and "--input-shape" in result.stderr
    result = invoke("optimize", src, "--seed", "-1")
    assert result.exit_code == 2 and "--seed" in result.stderr


@pytest.mark.parametrize("option,value", [("--rtol", "-1"), ("--rtol", "nan"), ("--atol", "-1e-3"),
                                          ("--atol", "nan"), ("--tol", "nan"), ("--tol", "-1")])
def test_exit_bad_tolerances_are_exit_2(tmp_path, option, value):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    commands = [["optimize", src, option, value]] + ([["inspect", src, option, value]] if option == "--tol" else [])
    for command in commands:
        result = invoke(*command)
        assert result.exit_code == 2 and option in result.stderr, (command, result.output)


def test_exit_bench_bad_options_and_models_are_exit_2(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    result = invoke("bench", src, "--batch", "-3")
    assert result.exit_code == 2 and "--batch" in result.stderr
    result = invoke("bench", src, "--json", tmp_path / "nodir" / "x.json")
    assert result.exit_code == 2 and "--json" in result.stderr
    before = src.read_bytes()
    result = invoke("bench", src, "--json", src)
    assert result.exit_code == 2 and "reads" in result.stderr and src.read_bytes() == before
    custom = tmp_path / "custom.onnx"
    node = helper.make_node("Mystery", ["x"], ["y"], domain="acme")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, ["N", 8])],
                              [helper.make_tensor_value_info("y", 1, ["N", 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)]),
              custom)
    failing = tmp_path / "reshape.onnx"
    onnx.save(reshape_fails_model(), failing)
    for path, message in ((custom, "cannot load"), (failing, "pass real data with --inputs")):
        result = invoke("bench", path, "--runs", 1, "--warmup", 0)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_exit_ctrl_c_is_130(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lc_onnx.api, "optimize", interrupted)
    result = invoke("optimize", src)
    assert result.exit_code == 130 and "interrupted" in result.stderr


SIGTERM_RUN = """
import os, signal, sys
from lc_onnx import io
from lc_onnx.cli import main
real = io._write_split
def killed(*a, **k):
    real(*a, **k)  # the temp files are written, not yet renamed
    os.kill(os.getpid(), signal.SIGTERM)
io._write_split = killed
main([sys.argv[1], "-o", sys.argv[2], "--external-data", "-q", "--no-validate"])
"""


def test_exit_sigterm_cleans_temp_files_like_ctrl_c(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-c", SIGTERM_RUN.replace("main([", "main(['optimize', "), src, out],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert list(out.parent.iterdir()) == []  # no temp file left behind, nothing half written


def test_exit_packed_int4_weights_are_valid(tmp_path):
    # 4-bit values are packed two to an entry of int32_data (and to a byte of raw_data): 15 values, 8 entries
    w = helper.make_tensor("w", onnx.TensorProto.INT4, [5, 3], [1] * 15)
    scale = helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.5])
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", 1, [5, 3])], [w, scale])
    src = tmp_path / "int4.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), src)
    result = invoke("optimize", src, "-q")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args", [["optimize", "m.onnx", "--seed", "abc"], ["optimize"], ["bogus"],
                                  ["optimize", "m.onnx", "--skip", "nope"]])
def test_exit_usage_errors_are_one_line(args):
    result = invoke(*args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")

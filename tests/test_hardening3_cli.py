"""Issue 15 ("Hardening 3"), the CLI's items: no command writes over what it reads (4), nor over anything but a
regular file (5); inputs too large to draw are a clear exit 2 (6); integer outputs have their own rule (13); a
model at a path that is not UTF-8 runs (14)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from lc_onnx import api, io
from lc_onnx.cli import main
from tests.builder import Builder, mlp


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result, code: int = 2) -> str:
    """The single stderr line of a refused run."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Any refusal must come before the model is read or rewritten."""
    def fail(*a, **k):
        raise AssertionError("work started before the refusal")
    monkeypatch.setattr(api, "optimize", fail)
    monkeypatch.setattr(api, "inspect", fail)


# --- item 4: every written file is protected, not only optimize's -o ---------------------------------------

def test_item04_bench_json_over_inputs_refused(model, tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((2, 3, 8), np.float32))
    before = data.read_bytes()
    line = one_error(invoke("bench", model, "--inputs", data, "--json", data, "--runs", 1, "--warmup", 0, "-q"))
    assert "data.npz" in line and data.read_bytes() == before
    # the models and their data files stay protected as before
    one_error(invoke("bench", model, "--json", model, "--runs", 1, "--warmup", 0, "-q"))


def test_item04_optimize_report_over_inputs_refused(model, tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((2, 3, 8), np.float32))
    before = data.read_bytes()
    one_error(invoke("optimize", model, "--inputs", data, "--report", data))
    one_error(invoke("optimize", model, "--inputs", data, "-o", data))
    assert data.read_bytes() == before


def test_item04_demo_refuses_to_replace_existing_files(tmp_path, monkeypatch):
    folder = tmp_path / "demo"
    folder.mkdir()
    for name in ("demo.onnx", "demo.lc.onnx"):
        mine = folder / name
        mine.write_bytes(b"mine")
        line = one_error(invoke("demo", "-o", folder))
        assert name in line and "--overwrite" in line and mine.read_bytes() == b"mine"
        mine.unlink()

    # with --overwrite the demo goes on (stopped here once it has rewritten the model: the rest is timing)
    (folder / "demo.onnx").write_bytes(b"mine")

    def stop(*a, **k):
        raise SystemExit(7)
    monkeypatch.setattr(api, "optimize", stop)
    assert invoke("demo", "-o", folder, "--overwrite").exit_code == 7
    assert (folder / "demo.onnx").read_bytes() != b"mine"


# --- item 5: only regular files or new paths are written ---------------------------------------------------

def test_item05_fifo_refused_everywhere(model, tmp_path, no_work):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # a reader that never blocks, so that a write which goes through cannot hang the test
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        runs = [("optimize", model, "-o", fifo), ("optimize", model, "-o", tmp_path / "o.onnx", "--report", fifo),
                ("bench", model, "--json", fifo, "--runs", 1, "--warmup", 0, "-q")]
        for args in runs:
            line = one_error(invoke(*args))
            assert "pipe" in line and "regular file" in line
            assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        # optimize's external data file beside the output too
        os.mkfifo(tmp_path / "o2.onnx.data")
        one_error(invoke("optimize", model, "-o", tmp_path / "o2.onnx", "--external-data"))
        assert stat.S_ISFIFO(os.stat(tmp_path / "o2.onnx.data").st_mode)
    finally:
        os.close(reader)
    # and a demo file that is one
    folder = tmp_path / "demo"
    folder.mkdir()
    os.mkfifo(folder / "demo.lc.onnx")
    one_error(invoke("demo", "-o", folder, "--overwrite"))
    assert stat.S_ISFIFO(os.stat(folder / "demo.lc.onnx").st_mode) and not (folder / "demo.onnx").exists()
    one_error(invoke("demo", "-o", fifo))  # or the folder itself


def test_item05_char_device_refused(model, tmp_path, no_work):
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here")
    for args in (("optimize", model, "-o", dev), ("optimize", model, "-o", tmp_path / "o.onnx", "--report", dev)):
        one_error(invoke(*args))
        assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_item05_dev_null_untouched(model, tmp_path, monkeypatch, no_work):
    before = os.stat("/dev/null")
    real_replace = os.replace

    def guarded(src, dst, *a, **k):  # a regression must fail this test, not replace the system's /dev/null
        if os.path.abspath(os.fsdecode(dst)).startswith("/dev/"):
            raise AssertionError(f"replacing {dst}")
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", guarded)
    for args in (("optimize", model, "-o", "/dev/null"), ("optimize", model, "--report", "/dev/null"),
                 ("bench", model, "--json", "/dev/null", "--runs", 1, "--warmup", 0, "-q")):
        line = one_error(invoke(*args))
        assert "/dev/null" in line and "regular file" in line
    assert "/dev/null" in one_error(invoke("demo", "-o", "/dev/null"))
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


# --- item 6: inputs too large to draw ------------------------------------------------------------------------

def test_item06_huge_input_shape_is_exit_2_with_size(model):
    line = one_error(invoke("optimize", model, "--input-shape", "x:1000000000000,3,8"))
    assert "'x'" in line and "[1000000000000, 3, 8]" in line and "TB" in line and "--input-shape" in line


def test_item06_bench_huge_batch_is_exit_2_with_size(model):
    line = one_error(invoke("bench", model, "--batch", 10**12, "--runs", 1, "--warmup", 0, "-q"))
    assert "'x'" in line and "[1000000000000, 3, 8]" in line and "TB" in line and "--batch" in line


# --- item 13: integer outputs computed from float ones -----------------------------------------------------

def classifier(seed: int = 3) -> onnx.ModelProto:
    """float16 x -> linear -> PRelu(1) -> linear -> ArgMax: ten logits so close that float16's rounding of the
    fused weights flips some of the argmaxes (11 of 64 here), though the collapse is exact."""
    b = Builder(np.float16, seed=seed)
    h = b.prelu(b.linear("x", 16, 64), 1.0)
    w2 = b.weights(64, 1) + 3e-4 * b.rng.standard_normal((64, 10))
    y = b.linear(h, 64, 10, weight=b.const(w2), bias=False)
    b.nodes.append(helper.make_node("ArgMax", [y], ["label"], name="argmax", axis=1, keepdims=0))
    graph = helper.make_graph(b.nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 16])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_item13_integer_outputs_judged_by_mismatch_share(tmp_path):
    src, out, report = tmp_path / "clf.onnx", tmp_path / "clf.lc.onnx", tmp_path / "r.json"
    onnx.save(classifier(), src)
    shape = ("--input-shape", "x:64,16")
    for extra in ((), ("--rtol", 1, "--atol", 1)):  # tolerances on floats do not help an integer output
        line = one_error(invoke("optimize", src, "-o", out, *shape, *extra), code=1)
        assert "'label'" in line and "--max-mismatch" in line and "--rtol" not in line, line
        assert "of 64" in line  # how many of the labels moved
    assert not out.exists()
    result = invoke("optimize", src, "-o", out, *shape, "--max-mismatch", 0.5, "--report", report)
    assert result.exit_code == 0, result.output
    v = json.loads(report.read_text())["validation"]
    share = v["outputs"][0]["mismatch"]
    assert 0 < share <= 0.5 and v["max_mismatch"] == 0.5 and v["passed"]
    assert "mismatch" in result.stdout  # the table says it too
    for bad in (-0.1, 1.5, "nan"):
        one_error(invoke("optimize", src, "-o", out, "--max-mismatch", bad))


def test_item13_float_output_message_still_names_rtol(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp(slope=0.99), src)
    line = one_error(invoke("optimize", src, "--tol", 0.05, "--rtol", 1e-6, "--atol", 0, "--no-budget"), code=1)
    assert "'y'" in line and "--rtol" in line and "--max-mismatch" not in line


# --- item 14: a path that is not UTF-8 ------------------------------------------------------------------------

def test_item14_non_utf8_path_runs(tmp_path):
    src = tmp_path / os.fsdecode(b"m\xff.onnx")
    onnx.save(mlp(), src)
    result = invoke("optimize", src)  # written beside it, and named on stdout
    assert result.exit_code == 0, result.output
    assert (tmp_path / os.fsdecode(b"m\xff.lc.onnx")).exists() and "m\\xff.lc.onnx" in result.stdout
    result = invoke("bench", src, "--runs", 1, "--warmup", 0, "-q")
    assert result.exit_code == 0 and "m\\xff.onnx" in result.stdout, result.output


def test_item14_non_utf8_folder_with_external_data_runs(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    onnx.save(mlp(32, 64, 32), plain / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    folder = tmp_path / os.fsdecode(b"d\xfe")
    plain.rename(folder)
    (folder / "m.onnx").rename(folder / os.fsdecode(b"m\xff.onnx"))
    src = folder / os.fsdecode(b"m\xff.onnx")
    result = invoke("optimize", src, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert io.has_external(onnx.load(tmp_path / "out.onnx", load_external_data=False))
    assert invoke("bench", src, "--runs", 1, "--warmup", 0, "-q").exit_code == 0
    # its default output would name a data file that is not UTF-8 inside the model: said before any work
    line = one_error(invoke("optimize", src))
    assert "UTF-8" in line and not list(folder.glob("*.lc.*"))


def test_item05_the_python_api_save_refuses_a_fifo_and_a_device_too(tmp_path, monkeypatch):
    """`OptimizeResult.save()` / `io.save()` from Python: the same rule as the CLI's -o, checked before any write."""
    import os

    def no_replace(*args):  # as root a regression would replace the system's /dev/null: stop it before that
        raise AssertionError(f"save went on to replace {args[-1]}")

    monkeypatch.setattr(os, "replace", no_replace)

    import lc_onnx
    from lc_onnx import io as lc_io
    from tests.builder import mlp

    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    result = lc_onnx.optimize(mlp(rank=2), validate=False)
    with pytest.raises(lc_onnx.InputError, match="is a FIFO"):
        result.save(fifo)
    with pytest.raises(lc_onnx.InputError, match="is a device"):
        lc_io.save(result.model, "/dev/null")
    assert fifo.is_fifo() and os.path.exists("/dev/null") and not os.path.isfile("/dev/null")

"""Files: bad input is one clean error, external data in and out, atomic writes, weights left on disk."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lc_onnx
from lc_onnx import io
from tests.builder import Builder, mlp
from tests.harness import random_feeds, run


def save_external(model, path, location=None):
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location or f"{path.name}.data", size_threshold=0)
    return path


def set_location(path, location):
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
    onnx.save(m, path)


@pytest.mark.parametrize("case,message", [
    ("truncated", "not a readable ONNX model"),
    ("text", "not a readable ONNX model"),
    ("no graph", "holds no ONNX graph"),
    ("cycle", "not valid ONNX"),
    ("dangling input", "not valid ONNX"),
    ("mismatched weights", "not valid ONNX"),
    ("external data outside the folder", "points outside"),
    ("external data missing", "missing"),
])
def test_bad_models_raise_input_error(tmp_path, case, message):
    path = tmp_path / "m.onnx"
    good = mlp()
    if case == "truncated":
        path.write_bytes(good.SerializeToString()[:200])
    elif case == "text":
        path.write_text("hello, not a model\n")
    elif case == "no graph":
        path.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    elif case in ("cycle", "dangling input"):
        src = "b" if case == "cycle" else "nowhere"
        nodes = [helper.make_node("Relu", [src], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
        vi = [helper.make_tensor_value_info("x", 1, [2]), helper.make_tensor_value_info("b", 1, [2])]
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", vi[:1], vi[1:])), path)
    elif case == "mismatched weights":
        for t in good.graph.initializer:
            if list(t.dims) == [32, 8]:
                t.CopyFrom(numpy_helper.from_array(np.ones((16, 8), np.float32), t.name))
        onnx.save(good, path)
    else:
        save_external(good, path)
        set_location(path, "../../etc/passwd" if "outside" in case else "gone.data")
    with pytest.raises(lc_onnx.InputError, match=message):
        lc_onnx.optimize(path)


def test_external_data_in_gives_external_data_out(tmp_path):
    src = save_external(mlp(d_in=64, hidden=256, d_out=64), tmp_path / "m.onnx")
    result = lc_onnx.optimize(src)
    assert result.source == tmp_path.resolve()
    out = result.save(tmp_path / "m.lc.onnx")
    assert (tmp_path / "m.lc.onnx.data").exists()
    stub = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stub.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    feeds = random_feeds(mlp(d_in=64, hidden=256, d_out=64))
    np.testing.assert_allclose(run(onnx.load(out), feeds)[0], run(onnx.load(src), feeds)[0], rtol=1e-4, atol=1e-4)


def test_untouched_external_weights_are_streamed_not_loaded(tmp_path, monkeypatch):
    b = Builder()
    y = b.linear(b.prelu(b.linear("x", 64, 256), 1.0), 256, 64)
    side = b.linear("x", 64, 512)  # not part of any chain: its weight is never read
    model = b.model([("x", ["N", 64])], [(y, ["N", 64]), (side, ["N", 512])])
    src = save_external(model, tmp_path / "m.onnx")
    loads = []
    real = io.ExternalValues.load
    monkeypatch.setattr(io.ExternalValues, "load", lambda self: loads.append(self.tensor.name) or real(self))
    result = lc_onnx.optimize(src, validate=False)
    assert len(result.report.rewrites) == 1
    # the chain's weights, biases and slope, once each; never the side layer's weight (c16) or bias (c19)
    assert sorted(loads) == ["c1", "c10", "c13", "c4", "c7"]
    out = result.save(tmp_path / "out.onnx")
    got = run(onnx.load(out), random_feeds(model))
    want = run(onnx.load(src), random_feeds(model))
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=0)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_save_force_external_and_keeps_input_model_intact(tmp_path):
    model = mlp(d_in=64, hidden=256, d_out=64)
    before = model.SerializeToString()
    io.save(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(lc_onnx.InputError, match="No space left"):
        io.save(mlp(), target)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_written_file_has_normal_permissions(tmp_path):
    path = io.save(mlp(), tmp_path / "m.onnx")
    assert path.stat().st_mode & 0o644 == 0o644


def test_serialized_size_is_byte_size_without_encoding(tmp_path):
    """The size in the report and the 2 GB decision: exact, for raw, typed, tiny and subgraph tensors."""
    m = mlp(rank=3)
    m.graph.initializer.append(helper.make_tensor("typed", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(300_000, np.float16), "big"))  # 3-byte varint
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty"))
    m.metadata_props.add(key="k", value="v")
    assert io.serialized_size(m) == m.ByteSize()
    assert io.serialized_size(onnx.ModelProto()) == onnx.ModelProto().ByteSize()
    external = onnx.load(save_external(mlp(), tmp_path / "m.onnx"), load_external_data=False)
    assert io.serialized_size(external) == external.ByteSize()


def _external_constants(tmp_path):
    """A 256x256 Constant in the main graph and a 256x8 initializer in an If branch, both external data."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32))
    inner = numpy_helper.from_array(rng.standard_normal((256, 8)).astype(np.float32), "inner")
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "inner"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", 1, ["N", 8])], [inner])
    other = helper.make_graph([helper.make_node("Slice", ["h", "zero", "eight", "one"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", 1, ["N", 8])])
    nodes = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    small = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("eight", 8), ("one", 1))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 256]),
                                           helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", 1, ["N", 8])], small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=1024,
              convert_attribute=True)
    return path


def test_check_stands_in_for_large_external_constants_without_their_bytes(tmp_path):
    from lc_onnx import check, shapes

    path = _external_constants(tmp_path)
    model, external = io.read(path, load_weights=False)
    assert external
    light = check.check_model(model, path.parent)
    assert light.ByteSize() < 4096  # not the 256 KiB and 8 KiB of zeros the checker was once given
    assert shapes.infer(light)["h"] == (onnx.TensorProto.FLOAT, ["N", 256])
    assert lc_onnx.optimize(path).report.rewrites == []  # the whole pipeline reads it (nothing to fold)

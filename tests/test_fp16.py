"""float16 end to end: `train.export(..., dtype=torch.float16)` of a prepared model, `lc-onnx optimize` collapses
it and validates it (in float16 where the CPU provider runs it, else both models cast to float32, said in the
report), and the collapsed model stays close to the float32 torch model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import lc_onnx
from lc_onnx import validate
from lc_onnx.cli import main
from lc_onnx.errors import InputError
from tests.builder import mlp

torch = pytest.importorskip("torch")
train = pytest.importorskip("lc_onnx.train")
nn = torch.nn


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run(path, feeds) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _elem_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}


@pytest.fixture
def prepared_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.LayerNorm(16),
                          nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(4, 16)
    assert len(train.prepare(model, (x,), init=1.0)) == 2
    return model, x


def _export(model, inputs, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.export(model, inputs, path, dtype=torch.float16, **kw)
    return path


def test_export_float16_writes_half_and_gives_the_model_back(prepared_mlp, tmp_path):
    model, x = prepared_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = _export(model, (x,), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    m = onnx.load(path)
    assert _elem_types(m) == {TensorProto.FLOAT16}
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    for k, v in model.state_dict().items():  # its own float32 tensors, not a round trip through float16
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert x.dtype == torch.float32


def test_export_dtype_must_be_a_floating_torch_dtype(prepared_mlp, tmp_path):
    model, x = prepared_mlp
    for bad in (torch.int8, "float16"):
        with pytest.raises(TypeError, match="floating torch dtype"):
            train.export(model, (x,), tmp_path / "m.onnx", dtype=bad)


def test_float16_mlp_collapses_validates_and_stays_close_to_float32_torch(prepared_mlp, tmp_path):
    model, x = prepared_mlp
    path = _export(model, (x,), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    out = tmp_path / "m.lc.onnx"
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["optimize", str(path), "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert len(data["rewrites"]) == 2 and data["validation"]["passed"]
    assert data["validation"]["precision"] == "as stored"  # this onnxruntime runs these float16 ops on the CPU
    assert data["validation"]["rtol"] == 1e-2  # the float16 default
    lc = onnx.load(out)
    assert not [n for n in lc.graph.node if n.op_type == "PRelu"] and _elem_types(lc) == {TensorProto.FLOAT16}
    with torch.no_grad():
        want = model(x).numpy()
    got = _run(out, {"x": x.numpy().astype(np.float16)})
    assert got.dtype == np.float16 and _rel(got, want) < 5e-3
    assert _rel(_run(path, {"x": x.numpy().astype(np.float16)}), want) < 5e-3


def test_float16_bert_tiny_collapses_every_mlp_close_to_float32_torch(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    assert len(train.prepare(model, inputs, init=1.0)) == 2
    path = _export(model, inputs, tmp_path / "bert.onnx")
    result = lc_onnx.optimize(path)
    assert len(result.report.rewrites) == 2 and result.report.validation.passed
    assert not [n for n in result.model.graph.node if n.op_type == "PRelu"]
    out = result.save(tmp_path / "bert.lc.onnx")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state.numpy()
    got = _run(out, {k: v.numpy() for k, v in inputs.items()})
    assert got.dtype == np.float16 and _rel(got, want) < 5e-3


def _refuse_half(monkeypatch):
    """An onnxruntime whose CPU provider has no float16 kernels (as for most ops in bfloat16 today)."""
    real = validate.session

    def session(model, *args, **kw):
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        if validate.uses_half(proto):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation "
                               "for Gemm(13) node with name 'g'")
        return real(model, *args, **kw)
    monkeypatch.setattr(validate, "session", session)


def test_without_float16_kernels_both_models_are_compared_in_float32(prepared_mlp, tmp_path, monkeypatch):
    model, x = prepared_mlp
    path = _export(model, (x,), tmp_path / "m.onnx", input_names=["x"], dynamic_axes={"x": {0: "b"}})
    _refuse_half(monkeypatch)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["optimize", str(path), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "validated in float32: both models cast to float32" in result.stdout
    v = json.loads(report.read_text())["validation"]
    assert v["passed"] and v["precision"] == "float32" and "NOT_IMPLEMENTED" in v["precision_note"]
    assert 0 < v["outputs"][0]["rel_l2"] < 1e-2  # the fused weights rounded to float16, nothing else
    lc = onnx.load(path.with_suffix(".lc.onnx"))
    assert _elem_types(lc) == {TensorProto.FLOAT16}  # the cast is for the comparison only


def test_a_failure_that_is_not_precision_keeps_its_own_message(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "session", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel")))
    half = mlp(rank=2, dtype=np.float16)
    with pytest.raises(InputError, match=r"cannot run the original model.*no kernel"):
        validate.compare(half, half, {"x": np.ones((2, 8), np.float16)}, 1e-2, 1e-3)
    full = mlp(rank=2)
    with pytest.raises(InputError, match="no kernel"):
        validate.compare(full, full, {"x": np.ones((2, 8), np.float32)}, 1e-4, 1e-5)


def test_bfloat16_which_the_cpu_provider_cannot_run_is_compared_in_float32():
    import ml_dtypes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16)

    def model(scale):
        ww = (w.astype(np.float32) * scale).astype(ml_dtypes.bfloat16)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
                 helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                     np.array([0.5], ml_dtypes.bfloat16), "c")),
                 helper.make_node("Add", ["h", "c"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 4])],
                                  [numpy_helper.from_array(ww, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    feeds = {"x": rng.standard_normal((2, 8)).astype(ml_dtypes.bfloat16)}
    same = validate.compare(model(1.0), model(1.0), feeds, 1e-2, 1e-3)
    assert same.passed and same.precision == "float32" and same.outputs[0].max_abs == 0
    assert "bfloat16" in same.precision_note or "NOT_IMPLEMENTED" in same.precision_note
    off = validate.compare(model(1.0), model(1.5), feeds, 1e-2, 1e-3)
    assert not off.passed and off.precision == "float32"


def test_to_float32_widens_weights_types_constants_and_casts():
    half = mlp(rank=2, dtype=np.float16)
    half.graph.node.append(helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16))
    half.graph.node.append(helper.make_node("ConstantOfShape", ["shape"], ["z"],
                                            value=numpy_helper.from_array(np.array([2], np.float16))))
    half.graph.initializer.append(numpy_helper.from_array(np.array([2, 8], np.int64), "shape"))
    half.graph.output.append(helper.make_tensor_value_info("y16", TensorProto.FLOAT16, None))
    half.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT16, None))
    assert validate.uses_half(half)
    wide = validate.to_float32(half)
    assert not validate.uses_half(wide) and validate.uses_half(half)  # a copy: the input is unchanged
    for t in half.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            got = numpy_helper.to_array(next(u for u in wide.graph.initializer if u.name == t.name))
            assert got.dtype == np.float32 and np.array_equal(got, numpy_helper.to_array(t).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float16)
    ref = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    out = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.astype(np.float32)})
    assert [o.dtype for o in out] == [np.float32] * 3
    assert np.allclose(out[0], ref[0], rtol=1e-2, atol=1e-2) and np.array_equal(out[2], ref[2])

"""Issue 17 (Pipeline 1) items 4 and 5: default validation inputs on optimum-style exports (a ViT with every pixel
axis open, a decoder with past_key_values) and already quantized models (listed, with the reason)."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import lc_onnx
from lc_onnx import pins
from lc_onnx.cli import main
from tests.builder import Builder

I64 = np.int64
QUANTIZED = "weights are quantized: collapse before quantizing"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def mlp_block(b: Builder, x: str, d: int, hidden: int) -> str:
    """linear -> PRelu(1) -> linear: something for optimize to fold, so that validation runs."""
    return b.linear(b.prelu(b.linear(x, d, hidden), 1.0), hidden, d)


# --- item 4: validation inputs the graph pins -------------------------------------------------------------------

def vit_model(patch: int = 4, grid: int = 4, dim: int = 8) -> onnx.ModelProto:
    """A ViT as optimum exports it, every pixel axis open: Cast/Sub/Div normalisation, Conv patch embed
    (kernel = stride = patch), Reshape + Transpose to tokens, a cls token expanded to the batch from Shape, a
    position table of grid² + 1 rows, an MLP block and a MatMul head."""
    b = Builder()
    (x,) = b.node("Cast", ["pixel_values"], to=onnx.TensorProto.FLOAT)
    (x,) = b.node("Sub", [x, b.const(np.full((1, 3, 1, 1), 0.5))])
    (x,) = b.node("Div", [x, b.const(np.full((1, 3, 1, 1), 0.25))])
    (c,) = b.node("Conv", [x, b.const(b.weights(dim, 3, patch, patch) / patch), b.const(np.zeros(dim))],
                  kernel_shape=[patch, patch], strides=[patch, patch])
    (t,) = b.node("Reshape", [c, b.const([0, dim, -1], dtype=I64)])
    (t,) = b.node("Transpose", [t], perm=[0, 2, 1])
    (s,) = b.node("Shape", ["pixel_values"])
    (n,) = b.node("Gather", [s, b.const(0, dtype=I64)], axis=0)
    (n,) = b.node("Unsqueeze", [n, b.const([0], dtype=I64)])
    (shape,) = b.node("Concat", [n, b.const([1], dtype=I64), b.const([dim], dtype=I64)], axis=0)
    (cls,) = b.node("Expand", [b.const(b.rng.standard_normal((1, 1, dim))), shape])
    (t,) = b.node("Concat", [cls, t], axis=1)
    (t,) = b.node("Add", [t, b.const(b.rng.standard_normal((1, grid * grid + 1, dim)), "position_embeddings")])
    h = mlp_block(b, t, dim, 16)
    (y,) = b.node("MatMul", [h, b.const(b.weights(dim, 5))])
    b.nodes.append(helper.make_node("Identity", [y], ["logits"], name="out"))
    return b.model([("pixel_values", ["batch_size", "num_channels", "height", "width"])],
                   [("logits", ["batch_size", None, 5])])


def decoder_with_past(heads: int = 2, head_dim: int = 4, vocab: int = 11) -> onnx.ModelProto:
    """A GPT-2-like decoder "with past" as optimum names its inputs: input_ids, attention_mask over past + new
    tokens, past_key_values.0.key/value; keys and values are Concat(past, new) along the past axis and the mask is
    added to the attention scores, so a mask of the wrong length fails."""
    dim = heads * head_dim
    b = Builder()
    (e,) = b.node("Gather", [b.const(b.rng.standard_normal((vocab, dim)), "wte"), "input_ids"])
    h = mlp_block(b, e, dim, 16)

    def split(t: str) -> str:
        (t,) = b.node("Reshape", [t, b.const([0, 0, heads, head_dim], dtype=I64)])
        return b.node("Transpose", [t], perm=[0, 2, 1, 3])[0]

    q, k, v = (split(b.linear(h, dim, dim)) for _ in range(3))
    (k,) = b.node("Concat", ["past_key_values.0.key", k], axis=2)
    (v,) = b.node("Concat", ["past_key_values.0.value", v], axis=2)
    (kt,) = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    (scores,) = b.node("MatMul", [q, kt])
    (m,) = b.node("Unsqueeze", ["attention_mask", b.const([1, 2], dtype=I64)])
    (m,) = b.node("Cast", [m], to=onnx.TensorProto.FLOAT)
    (m,) = b.node("Sub", [b.const(1.0), m])
    (m,) = b.node("Mul", [m, b.const(-1e4)])
    (scores,) = b.node("Add", [scores, m])
    (p,) = b.node("Softmax", [scores], axis=-1)
    (o,) = b.node("MatMul", [p, v])
    b.nodes.append(helper.make_node("Identity", [o], ["out"], name="out"))
    past = ["batch_size", heads, "past_sequence_length", head_dim]
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    graph = helper.make_graph(
        b.nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "past_sequence_length + 1"]),
         helper.make_tensor_value_info("past_key_values.0.key", f, past),
         helper.make_tensor_value_info("past_key_values.0.value", f, past)],
        [helper.make_tensor_value_info("out", f, ["batch_size", heads, "sequence_length", head_dim])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_item4_vit_open_pixel_dims_validate_by_default(tmp_path, caplog):
    src, report = tmp_path / "vit.onnx", tmp_path / "r.json"
    onnx.save(vit_model(), src)
    with caplog.at_level(logging.WARNING, logger="lc_onnx"):
        result = invoke("optimize", src, "-o", tmp_path / "o.onnx", "--report", report)
    assert result.exit_code == 0, result.output
    v = json.loads(report.read_text())["validation"]
    assert v["inputs"]["pixel_values"] == [2, 3, 16, 16]  # 3 channels from the Conv weight, 4x4 patches of 4
    why = v["guessed"]["pixel_values"]
    assert why["shape"] == [2, 3, 16, 16]
    assert "Conv" in why["from"] and "position_embeddings" in why["from"]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lc_onnx")]
    assert len(lines) == 1 and "pixel_values [2, 3, 16, 16]" in lines[0] and "\n" not in lines[0]


def test_item4_vit_grid_only_where_the_table_proves_it():
    """A table whose rows are not a square patch count (plus tokens) pins no image size: none is guessed from it,
    though the channels still are; and a given shape is kept as it is."""
    model = vit_model(grid=4)
    table = next(t for t in model.graph.initializer if t.name == "position_embeddings")
    table.CopyFrom(numpy_helper.from_array(np.zeros((1, 20, 8), np.float32), "position_embeddings"))
    shapes, why = pins.guess_shapes(model)
    assert shapes["pixel_values"][:2] == [2, 3] and shapes["pixel_values"][2:] != [16, 16]
    assert "position" not in why["pixel_values"]
    shapes, why = pins.guess_shapes(vit_model(), {"pixel_values": [1, 3, 8, 8]})
    assert "pixel_values" not in shapes


def test_item4_decoder_with_past_mask_covers_past_and_new_tokens(tmp_path, caplog):
    src, report = tmp_path / "gpt2.onnx", tmp_path / "r.json"
    onnx.save(decoder_with_past(), src)
    with caplog.at_level(logging.WARNING, logger="lc_onnx"):
        result = invoke("optimize", src, "-o", tmp_path / "o.onnx", "--report", report)
    assert result.exit_code == 0, result.output
    v = json.loads(report.read_text())["validation"]
    assert v["inputs"]["attention_mask"] == [2, 4]  # past 2 + new 2
    assert "past_key_values.0.key" in v["guessed"]["attention_mask"]["from"]
    # a given length of new tokens moves the mask with it
    result = invoke("optimize", src, "-o", tmp_path / "o2.onnx", "--report", report, "--input-shape",
                    "input_ids:1,3")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["validation"]["inputs"]["attention_mask"] == [1, 5]


# --- item 5: quantized models -----------------------------------------------------------------------------------

def float_model(kind: str = "matmul") -> onnx.ModelProto:
    """Two linear -> PRelu(1) -> linear blocks in a row (MatMul + Add, or Gemm)."""
    b = Builder(seed=1)
    h = "x"
    for _ in range(2):
        h = b.linear(b.prelu(b.linear(h, 8, 16, kind), 1.0, (16,)), 16, 8, kind)
    b.nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    return b.model([("x", ["N", 8])], [("y", ["N", 8])], opset=17)


class _Reader:
    """A tiny CalibrationDataReader: four seeded batches."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.batches = iter([{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def quantized(tmp_path, how: str):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, out = tmp_path / "f.onnx", tmp_path / f"{how}.onnx"
    onnx.save(float_model("gemm" if how == "qgemm" else "matmul"), src)
    if how == "dynamic":
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    else:
        fmt = QuantFormat.QDQ if how == "qdq" else QuantFormat.QOperator
        quantize_static(src, out, _Reader(), quant_format=fmt)
    return out


@pytest.mark.parametrize("how, op", [("dynamic", "MatMulInteger"), ("qdq", "DequantizeLinear"),
                                     ("qlinear", "QLinearMatMul"), ("qgemm", "QGemm")])
def test_item5_quantized_blocks_listed_with_the_reason(tmp_path, how, op):
    path = quantized(tmp_path, how)
    assert any(n.op_type == op for n in onnx.load(path).graph.node)
    found = [c for c in lc_onnx.inspect(path) if c.kind == "chain"]
    assert len(found) == 2 and all(c.rule is None and c.reason == QUANTIZED for c in found)
    assert all(c.slope_range == (1.0, 1.0) for c in found)
    result = invoke("inspect", path)
    assert result.exit_code == 0 and "0 of 2 chain(s)" in result.output and QUANTIZED in result.output
    report = tmp_path / "r.json"
    result = invoke("optimize", path, "-o", tmp_path / "o.onnx", "--report", report, "-q")
    assert result.exit_code == 0, result.output
    skipped = json.loads(report.read_text())["skipped"]
    assert [c["reason"] for c in skipped] == [QUANTIZED, QUANTIZED]


def test_item5_recommended_order_optimize_then_quantize(tmp_path):
    """What the reason says works: collapse the float model first, then quantize_dynamic runs on the output."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert QUANTIZED in {c.reason for c in lc_onnx.inspect(quantized(tmp_path, "dynamic"))}
    src, folded, q = tmp_path / "f.onnx", tmp_path / "f.lc.onnx", tmp_path / "f.lc.int8.onnx"
    result = invoke("optimize", src, "-o", folded, "-q")
    assert result.exit_code == 0, result.output
    quantize_dynamic(folded, q, weight_type=QuantType.QInt8)
    # both blocks and the layers between them are one linear map now: one quantized layer
    assert sum(n.op_type == "MatMulInteger" for n in onnx.load(q).graph.node) == 1
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05

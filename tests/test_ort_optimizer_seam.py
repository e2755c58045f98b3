"""After ONNX Runtime's transformers optimizer (what optimum's --optimize runs): its com.microsoft ops carry no ONNX
shape inference, so ranks come from ONNX Runtime's symbolic inference, and GPT-2's mixed layout it leaves (c_fc a 3-D
MatMul+Add, c_proj `Reshape(-1, h) → Gemm`) folds. Tiny HF models from configs (no download), PReLU(1) MLPs."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import lc_onnx
from lc_onnx import shapes
from lc_onnx.cli import main
from lc_onnx.train import export
from tests.harness import count_ops, optimized

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort_optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
nn = torch.nn

RANK_UNKNOWN = "the rank of its input is unknown"


pytestmark = pytest.mark.usefixtures("quiet_and_seeded")  # tests/conftest.py


def tiny(kind: str) -> nn.Module:
    """A 2-layer, 32-wide BERT or GPT-2 with its MLP activation a PReLU at slope 1 and random biases (HF's are zero,
    and ORT's optimizer would share equal ones between layers)."""
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32))
        for layer in model.encoder.layer:
            layer.intermediate.intermediate_act_fn = nn.PReLU(init=1.0)
    else:
        model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                                               n_head=2, use_cache=False))
        for block in model.h:
            block.mlp.act = nn.PReLU(init=1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def ort_models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """Each tiny model through ONNX Runtime's transformers optimizer, once for the module (optimize never changes
    its input: the harness checks it)."""
    folder = tmp_path_factory.mktemp("ort")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return {kind: ort_optimized(kind, folder) for kind in ("bert", "gpt2")}


def ort_optimized(kind: str, tmp_path, opt_level: int = 1) -> onnx.ModelProto:
    """The tiny model exported (`lc_onnx.train.export`: the legacy exporter, opset 17, eager attention, batch and
    length open) and run through ONNX Runtime's transformers optimizer, as `optimize_model(path, model_type,
    num_heads, hidden_size, opt_level)` writes it."""
    path = tmp_path / f"{kind}.onnx"
    example = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    with contextlib.redirect_stdout(io.StringIO()):
        export(tiny(kind), example, path)
        ort_optimizer.optimize_model(str(path), model_type=kind, num_heads=2, hidden_size=32,
                                     opt_level=opt_level).save_model_to_file(str(path))  # adds com.microsoft's opset
    return onnx.load(str(path))


def feeds(batch: int = 2, tokens: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, 64, (batch, tokens)), "attention_mask": np.ones((batch, tokens), np.int64)}


def test_bert_after_ort_transformers_optimizer_folds_every_mlp(ort_models):
    model = ort_models["bert"]
    fused = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= fused
    result = optimized(model, rewrites=2, feeds=feeds())
    assert [r.shape for r in result.report.rewrites] == [(32, 64, 32)] * 2
    assert count_ops(result.model, "PRelu") == 0
    assert result.report.validation.passed


def test_gpt2_after_ort_transformers_optimizer_folds_its_mixed_layout(ort_models):
    model = ort_models["gpt2"]
    assert any(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    result = optimized(model, rewrites=2, feeds=feeds())
    assert count_ops(result.model, "PRelu") == 0
    assert result.report.validation.passed
    # each MLP is one Gemm on the flattened input, its output read by c_proj's own Reshape back to 3-D as before
    readers = {i: n for n in result.model.graph.node for i in n.input}
    fused = [n for n in result.model.graph.node if n.op_type == "Gemm" and n.name.endswith("_collapsed")]
    assert len(fused) == 2 and all(readers[n.output[0]].op_type == "Reshape" for n in fused)
    assert lc_onnx.optimize(result.model).report.modified is False  # a second run changes nothing


MIXED = """
<ir_version: 8, opset_import: ["" : 17]>
mixed (float[B, S, 8] x) => (float[B, S, 8] y) <float[8, 16] w1, float[16] b1, float[16] slope, float[16, 8] w2,
                                               float[8] b2, int64[1] minus1, int64[1] last, int64[1] end, int64[1] i0,
                                               int64[1] i1, int64[1] out8> {
    mm = MatMul(x, w1)
    h = Add(mm, b1)
    a = PRelu(h, slope)
    s = Shape <start = 0> (a)
    d = Slice(s, last, end)
    flat_shape = Concat <axis = 0> (minus1, d)
    flat = Reshape(a, flat_shape)
    z = Gemm(flat, w2, b2)
    n0 = Gather <axis = 0> (s, i0)
    n1 = Gather <axis = 0> (s, i1)
    back = Concat <axis = 0> (n0, n1, out8)
    y = Reshape(z, back)
}
"""


def mixed(extra: str = "", outputs: str = "float[B, S, 8] y", slope: np.ndarray | None = None) -> onnx.ModelProto:
    """ONNX Runtime's GPT-2 MLP in miniature: 3-D MatMul+Add, PRelu, Reshape to [-1, Shape(a)[-1]], Gemm, and
    Shape(a)'s leading dims read for the Reshape back. `extra` adds nodes."""
    text = MIXED.replace("(float[B, S, 8] y)", f"({outputs})").replace("    y = Reshape(z, back)\n",
                                                                        f"    y = Reshape(z, back)\n{extra}")
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    values = {"w1": rng.standard_normal((8, 16)), "b1": rng.standard_normal(16),
              "slope": np.ones(16) if slope is None else slope, "w2": rng.standard_normal((16, 8)),
              "b2": rng.standard_normal(8)}
    ints = {"minus1": [-1], "last": [-1], "end": [2**31 - 1], "i0": [0], "i1": [1], "out8": [8]}
    model.graph.initializer.extend(
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items()]
        + [onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()])
    return model


def test_mixed_layout_folds_into_reshape_then_gemm():
    model = mixed()
    result = optimized(model, rewrites=1)
    ops = [n.op_type for n in result.model.graph.node]
    assert "PRelu" not in ops and ops.count("Gemm") == 1 and "MatMul" not in ops
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    assert gemm.output[0] == "z"  # the Reshape back reads the same tensor, of the same [rows, 8] shape
    # the Reshape back's target keeps its leading dims, now from Shape(x): other batch and length sizes run
    x = np.random.default_rng(1).standard_normal((3, 7, 8)).astype(np.float32)
    optimized(model, rewrites=1, feeds={"x": x})


def test_mixed_layout_with_a_computed_target_folds_as_the_gemm_proves_it():
    """A Reshape target only known at run time: the Gemm after it takes [rows, 16] or the model does not run."""
    model = onnx.parser.parse_model(MIXED.replace("float[B, S, 8] x)", "float[B, S, 8] x, int64[2] t)")
                                    .replace("flat = Reshape(a, flat_shape)", "flat = Reshape(a, t)"))
    model.graph.initializer.extend(mixed().graph.initializer)
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    for t in ([-1, 16], [6, 16]):
        feeds = {"x": x, "t": np.array(t)}
        optimized(model, rewrites=1, feeds=feeds, inputs=feeds)


def test_mixed_layout_left_where_the_activation_or_the_flat_tensor_has_another_reader():
    result = lc_onnx.optimize(mixed("    e = Exp(a)\n", "float[B, S, 8] y, float[B, S, 16] e"))
    assert not [r for r in result.report.rewrites if r.rule == "collapse_linear_chain"]
    assert "a also feeds" in result.report.skipped[0].reason
    # a Shape of the flattened tensor: its target [-1, h] does not state the rows, so nothing gives that shape
    result = lc_onnx.optimize(mixed("    f = Shape(flat)\n", "float[B, S, 8] y, int64[2] f"))
    assert not [r for r in result.report.rewrites if r.rule == "collapse_linear_chain"]
    assert "flat also feeds" in result.report.skipped[0].reason


def test_mixed_layout_is_not_split_per_unit():
    slope = np.ones(16)
    slope[:3] = 0.25  # per-unit slopes, 13 of 16 units linear: a split would be the candidate
    result = lc_onnx.optimize(mixed(slope=slope))
    assert not [r for r in result.report.rewrites if r.rule in ("split_linear_units", "collapse_linear_chain")]
    assert any("mixed layout" in s.reason for s in result.report.skipped)


def test_ort_symbolic_inference_fills_ranks_onnx_leaves_open_and_stops_early_without_writing(tmp_path, monkeypatch):
    """A com.microsoft op ONNX cannot infer before the block (BiasGelu), one that ONNX Runtime's inference does not
    know after it: the ranks before the unknown op are used, and nothing is written to the working directory."""
    model = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1, "com.example" : 1]>
g (float[B, S, 8] x) => (float[B, S, 8] y) <float[8] gb, float[8, 16] w1, float[16] b1, float[1, 16] slope,
                                           float[16, 8] w2, float[8] b2> {
    g = com.microsoft.BiasGelu(x, gb)
    m1 = MatMul(g, w1)
    h = Add(m1, b1)
    a = PRelu(h, slope)
    m2 = MatMul(a, w2)
    z = Add(m2, b2)
    y = com.example.Unknown(z)
}
""")
    rng = np.random.default_rng(0)
    for name, shape in (("gb", [8]), ("w1", [8, 16]), ("b1", [16]), ("w2", [16, 8]), ("b2", [8])):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32),
                                                                    name))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 16), np.float32), "slope"))
    monkeypatch.chdir(tmp_path)
    result = lc_onnx.optimize(model, validate=False)  # ONNX Runtime cannot run com.example.Unknown
    assert [r.rule for r in result.report.rewrites] == ["collapse_linear_chain"]
    assert list(tmp_path.iterdir()) == []


def test_plain_models_do_not_run_ort_inference_and_its_failure_is_not_an_error(tmp_path, monkeypatch, ort_models):
    calls = []
    real = shapes.infer_ort
    monkeypatch.setattr(shapes, "infer_ort", lambda light: calls.append(1) or real(light))
    optimized(mixed(), rewrites=1)  # ONNX's inference states every rank: ONNX Runtime's is not run
    assert calls == []

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def broken(self, *args, **kw):
        raise RuntimeError("symbolic inference failed")

    monkeypatch.setattr(SymbolicShapeInference, "_infer_impl", broken)
    model = ort_models["bert"]
    result = lc_onnx.optimize(model)  # nothing folds, and the reason is the rank, in the report and the CLI
    assert calls == [1] and not result.report.rewrites and result.report.validation is None
    assert all(RANK_UNKNOWN in s.reason for s in result.report.skipped if s.shape)
    onnx.save(model, tmp_path / "m.onnx")
    out = CliRunner().invoke(main, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx")])
    assert out.exit_code == 0 and RANK_UNKNOWN in out.output.split("why no chain was folded:")[1]


"""Real exports: torch's two exporters and HF transformers models, optimized and compared in ONNX Runtime.

Every model is exported with both `torch.onnx.export(dynamo=False, opset_version=17)` and the new
`dynamo=True` exporter, with PReLU(slope 1) between its linear layers, then run through
`tests.harness.optimized` (checker -> optimize -> checker -> ONNX Runtime comparison). HF models are built
from tiny configs with random weights: nothing is downloaded."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest

import lc_onnx
from tests.harness import count_ops, optimized, run

torch = pytest.importorskip("torch")
nn = torch.nn

EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
HF_INPUTS = ["input_ids", "attention_mask"]


pytestmark = pytest.mark.usefixtures("quiet_and_seeded")  # tests/conftest.py


def export(module: nn.Module, args: tuple, path, dynamo: bool, **kw) -> onnx.ModelProto:
    """`module` in eval mode, exported to one self-contained file and loaded back."""
    module.eval()
    if dynamo:
        pytest.importorskip("onnxscript")  # the new exporter needs it
        kw.setdefault("external_data", False)
    else:
        kw.setdefault("opset_version", 17)
    with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter reports its steps on stdout
        torch.onnx.export(module, args, str(path), dynamo=dynamo, **kw)
    return onnx.load(str(path))


def linear_ops(model: onnx.ModelProto) -> int:
    return count_ops(model, "Gemm") + count_ops(model, "MatMul")


def errors(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict) -> tuple[float, float]:
    """Largest absolute error and relative L2 error of the (single) output, after vs before, on `feeds`."""
    (ref,), (got,) = run(before, feeds), run(after, feeds)
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(np.abs(got - ref).max()), float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def mlp(*widths: int, slope: float = 1.0, channels: int = 1) -> nn.Sequential:
    """Linear -> PReLU -> Linear -> ... through `widths`."""
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        if i:
            layers.append(nn.PReLU(num_parameters=channels, init=slope))
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """timm-style pre-norm residual MLP block: x + fc2(act(fc1(norm(x))))."""

    def __init__(self, d: int = 16, h: int = 64, slope: float = 1.0):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)
        self.act = nn.PReLU(init=slope)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


# --- torch.nn models ----------------------------------------------------------------------------------


@EXPORTERS
@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 16)], ids=["2d", "3d"])
def test_linear_prelu_linear(tmp_path, dynamo, shape):
    onnx_model = export(mlp(16, 64, 16), (torch.randn(*shape),), tmp_path / "m.onnx", dynamo)
    assert count_ops(onnx_model, "PRelu") == 1
    result = optimized(onnx_model, rewrites=1)
    assert [r.shape for r in result.report.rewrites] == [(16, 64, 16)]
    assert count_ops(result.model, "PRelu") == 0
    assert linear_ops(result.model) == 1
    if len(shape) == 2:  # a 2-D input becomes one Gemm, bias included
        assert count_ops(result.model, "Gemm") == 1 and len(result.model.graph.node) == 1
    else:  # higher rank stays MatMul, with the bias in one Add
        assert count_ops(result.model, "MatMul") == 1 and count_ops(result.model, "Add") == 1


@EXPORTERS
def test_residual_mlp_blocks_all_collapse(tmp_path, dynamo):
    model = nn.Sequential(Block(), Block(), Block())
    result = optimized(export(model, (torch.randn(2, 5, 16),), tmp_path / "m.onnx", dynamo), rewrites=3)
    assert [r.shape for r in result.report.rewrites] == [(16, 64, 16)] * 3
    assert count_ops(result.model, "PRelu") == 0
    assert count_ops(result.model, "MatMul") == 3
    assert not result.report.skipped


@EXPORTERS
def test_residual_block_outside_tolerance_is_left(tmp_path, dynamo):
    model = nn.Sequential(Block(), Block(slope=0.5), Block())
    onnx_model = export(model, (torch.randn(2, 5, 16),), tmp_path / "m.onnx", dynamo)
    result = optimized(onnx_model, rewrites=2)
    assert count_ops(result.model, "PRelu") == 0 and count_ops(result.model, "LeakyRelu") == 1
    (left,) = result.report.skipped
    assert "outside tolerance" in left.reason and left.slope_range == (0.5, 0.5)

    candidates = [c for c in lc_onnx.inspect(onnx_model) if c.kind == "chain"]  # in graph order: block 0, 1, 2
    assert [c.rule is None for c in candidates] == [False, True, False]
    middle = candidates[1]
    assert "outside tolerance" in middle.reason
    assert middle.slope_range == (0.5, 0.5) and middle.shape == (16, 64, 16)
    (leaky,) = [n for n in result.model.graph.node if n.op_type == "LeakyRelu"]
    assert leaky.name in middle.names  # the block left is the one with slope 0.5, its PRelu now LeakyRelu
    assert leaky.attribute[0].f == 0.5


@EXPORTERS
@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 16)], ids=["2d", "3d"])
def test_three_layers_collapse_into_one(tmp_path, dynamo, shape):
    onnx_model = export(mlp(16, 64, 64, 16), (torch.randn(*shape),), tmp_path / "m.onnx", dynamo)
    result = optimized(onnx_model, rewrites=2)
    assert count_ops(result.model, "PRelu") == 0
    assert linear_ops(result.model) == 1
    assert result.report.rewrites[-1].shape == (16, 64, 16)  # the fused 16x64 layer, then the last one


@EXPORTERS
def test_per_channel_prelu(tmp_path, dynamo):
    onnx_model = export(mlp(16, 64, 16, channels=64), (torch.randn(4, 16),), tmp_path / "m.onnx", dynamo)
    result = optimized(onnx_model, rewrites=1)
    assert count_ops(result.model, "PRelu") == 0 and linear_ops(result.model) == 1


@EXPORTERS
def test_per_channel_prelu_with_one_channel_off(tmp_path, dynamo):
    model = mlp(16, 64, 16, channels=64)
    with torch.no_grad():
        model[1].weight[7] = 0.9
    onnx_model = export(model, (torch.randn(4, 16),), tmp_path / "m.onnx", dynamo)
    result = optimized(onnx_model, rewrites=0, skip=("split_linear_units",))
    (left,) = result.report.skipped
    assert "outside tolerance" in left.reason
    assert left.slope_range == pytest.approx((0.9, 1.0))
    # split_linear_units: the 63 unit channels become one 16x16 map beside a 16>1>16 MLP for channel 7
    (split, leaky) = optimized(onnx_model, rewrites=1).report.rewrites  # the 1-unit PRelu left is a LeakyRelu
    assert leaky.rule == "prelu_to_leaky_relu"
    assert split.rule == "split_linear_units" and split.macs_after == 16 * 16 + 32 < split.macs_before


# --- HF transformers, built from small configs (no download), MLP activation swapped for PReLU ---------


class LastHidden(nn.Module):
    """An HF model with one plain tensor output, for export."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, input_ids, attention_mask):
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.key)


def hf_model(kind: str, slope: float) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=128,
                                      max_position_embeddings=32)
        model = transformers.BertModel(cfg)
        for layer in model.encoder.layer:
            layer.intermediate.intermediate_act_fn = nn.PReLU(init=slope)
        key = "last_hidden_state"
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      use_cache=False, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        for block in model.transformer.h:
            block.mlp.act = nn.PReLU(init=slope)
        key = "logits"
    with torch.no_grad():  # HF initializes biases to zero: random ones test the bias folding too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return LastHidden(model, key).eval()


def hf_inputs(batch: int = 2, tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 64, (batch, tokens)), torch.ones(batch, tokens, dtype=torch.int64)


def as_feeds(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


@EXPORTERS
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_models_collapse_every_mlp(tmp_path, dynamo, kind):
    model, args = hf_model(kind, 1.0), hf_inputs()
    onnx_model = export(model, args, tmp_path / "m.onnx", dynamo, input_names=HF_INPUTS)
    assert count_ops(onnx_model, "PRelu") == 2
    feeds = as_feeds(*args)
    result = optimized(onnx_model, rewrites=2, feeds=feeds)
    assert count_ops(result.model, "PRelu") == 0
    assert [r.shape for r in result.report.rewrites] == [(32, 128, 32)] * 2
    assert len(result.model.graph.node) < len(onnx_model.graph.node)

    max_abs, rel_l2 = errors(onnx_model, result.model, feeds)
    print(f"\n{kind} {'dynamo' if dynamo else 'legacy'}: max |abs| {max_abs:.3g}, rel L2 {rel_l2:.3g}")
    assert rel_l2 < 1e-6 and max_abs < 1e-5
    with torch.no_grad():  # the optimized model still computes what the torch model does
        expected = model(*args).numpy()
    np.testing.assert_allclose(run(result.model, feeds)[0], expected, rtol=1e-4, atol=1e-4)


@EXPORTERS
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_models_with_slopes_near_one_collapse_within_tolerance(tmp_path, dynamo, kind):
    """Slope 0.9995, within the default tol 1e-3: collapsed, with an error of the order of |1 - slope|."""
    args = hf_inputs()
    onnx_model = export(hf_model(kind, 0.9995), args, tmp_path / "m.onnx", dynamo, input_names=HF_INPUTS)
    feeds = as_feeds(*args)
    result = optimized(onnx_model, rewrites=2, feeds=feeds, rtol=1e-2, atol=1e-3)
    assert all(r.slope_range == pytest.approx((0.9995, 0.9995)) for r in result.report.rewrites)
    assert all(0 < r.error_coefficient < 1e-2 for r in result.report.rewrites)
    assert result.report.validation.passed
    max_abs, rel_l2 = errors(onnx_model, result.model, feeds)
    exporter = "dynamo" if dynamo else "legacy"
    print(f"\n{kind} {exporter} slope 0.9995: max |abs| {max_abs:.3g}, rel L2 {rel_l2:.3g}")
    assert rel_l2 < 1e-3


@EXPORTERS
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_models_with_slopes_far_from_one_keep_their_layers(tmp_path, dynamo, kind):
    onnx_model = export(hf_model(kind, 0.25), hf_inputs(), tmp_path / "m.onnx", dynamo, input_names=HF_INPUTS)
    result = optimized(onnx_model, rewrites=0, feeds=as_feeds(*hf_inputs()))
    for op in ("MatMul", "Gemm", "Add", "Reshape"):
        assert count_ops(result.model, op) == count_ops(onnx_model, op)
    assert count_ops(result.model, "PRelu") == 0 and count_ops(result.model, "LeakyRelu") == 2
    assert len(result.report.skipped) == 2
    for left in result.report.skipped:
        assert "outside tolerance" in left.reason and left.slope_range == (0.25, 0.25)


@EXPORTERS
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_models_with_dynamic_axes_collapse(tmp_path, dynamo, kind):
    """Dynamic batch and tokens: the optimized model is run on a shape other than the one exported."""
    args = hf_inputs()
    if dynamo:
        batch, tokens = torch.export.Dim("batch", max=16), torch.export.Dim("tokens", max=32)
        kw = {"dynamic_shapes": ({0: batch, 1: tokens}, {0: batch, 1: tokens})}
    else:
        kw = {"dynamic_axes": {n: {0: "batch", 1: "tokens"} for n in HF_INPUTS}}
    onnx_model = export(hf_model(kind, 1.0), args, tmp_path / "m.onnx", dynamo, input_names=HF_INPUTS, **kw)
    feeds = as_feeds(*hf_inputs(3, 13))
    result = optimized(onnx_model, rewrites=2, feeds=feeds)
    assert count_ops(result.model, "PRelu") == 0


def test_hf_gpt2_chain_goes_through_reshapes_and_shape_readers(tmp_path):
    """With dynamic axes, the legacy exporter computes GPT-2's Reshape target after the activation from
    Shape(activation output): the chain is Gemm > Reshape > PRelu > Reshape > Gemm with Shape readers."""
    kw = {"dynamic_axes": {n: {0: "batch", 1: "tokens"} for n in HF_INPUTS}}
    onnx_model = export(hf_model("gpt2", 1.0), hf_inputs(1, 8), tmp_path / "m.onnx", False,
                        input_names=HF_INPUTS, **kw)
    ops = {n.name: n.op_type for n in onnx_model.graph.node}
    chains = [c for c in lc_onnx.inspect(onnx_model) if c.rule]
    assert len(chains) == 2
    assert [ops[n] for n in chains[0].names] == ["Gemm", "Reshape", "PRelu", "Reshape", "Gemm"]
    prelu_outputs = {o for n in onnx_model.graph.node if n.op_type == "PRelu" for o in n.output}
    assert any(n.op_type == "Shape" and n.input[0] in prelu_outputs for n in onnx_model.graph.node)
    feeds = as_feeds(*hf_inputs(3, 16))
    result = optimized(onnx_model, rewrites=2, feeds=feeds)
    assert count_ops(result.model, "PRelu") == 0

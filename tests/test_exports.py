"""Real exports: torch's two exporters and HF transformers models, optimized and compared in ONNX Runtime."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lc_onnx  # noqa: E402
from lc_onnx import train  # noqa: E402
from tests.harness import count_ops, optimized  # noqa: E402

EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])


@pytest.fixture(autouse=True)
def quiet_and_seeded():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export(module: nn.Module, args: tuple, path, dynamo: bool, names=None) -> onnx.ModelProto:
    train.export(module.eval(), args, path, dynamo=dynamo, input_names=names)
    return onnx.load(path)


class Block(nn.Module):
    def __init__(self, d=16, h=64, slope=1.0):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)
        self.act = nn.PReLU(init=slope)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@EXPORTERS
@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 16)], ids=["2d", "3d"])
def test_sequential_linear_prelu_linear(tmp_path, dynamo, shape):
    model = nn.Sequential(nn.Linear(16, 64), nn.PReLU(init=1.0), nn.Linear(64, 16))
    result = optimized(export(model, (torch.randn(*shape),), tmp_path / "m.onnx", dynamo), rewrites=1)
    assert count_ops(result.model, "PRelu") == 0
    assert count_ops(result.model, "Gemm") + count_ops(result.model, "MatMul") == 1


@EXPORTERS
def test_residual_blocks_one_left_outside_tolerance(tmp_path, dynamo):
    model = nn.Sequential(Block(), Block(slope=0.5), Block())
    onnx_model = export(model, (torch.randn(2, 5, 16),), tmp_path / "m.onnx", dynamo)
    result = optimized(onnx_model, rewrites=2)
    (left,) = result.report.skipped
    assert "outside tolerance" in left.reason
    assert sum(c.rule is None for c in lc_onnx.inspect(onnx_model)) == 1


@EXPORTERS
def test_three_layers_collapse_into_one(tmp_path, dynamo):
    model = nn.Sequential(nn.Linear(16, 64), nn.PReLU(init=1.0), nn.Linear(64, 64), nn.PReLU(init=1.0),
                          nn.Linear(64, 16))
    result = optimized(export(model, (torch.randn(4, 16),), tmp_path / "m.onnx", dynamo), rewrites=2)
    assert count_ops(result.model, "Gemm") + count_ops(result.model, "MatMul") == 1


@EXPORTERS
def test_per_channel_prelu(tmp_path, dynamo):
    model = nn.Sequential(nn.Linear(16, 64), nn.PReLU(num_parameters=64, init=1.0), nn.Linear(64, 16))
    optimized(export(model, (torch.randn(4, 16),), tmp_path / "m.onnx", dynamo), rewrites=1)


# --- HF transformers, built from small configs (no download), MLP activation swapped for PReLU ---------


class Outputs(nn.Module):
    """An HF model with one plain tensor output, for export."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, input_ids, attention_mask):
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.key)


def hf_model(kind: str, slope: float):
    transformers = pytest.importorskip("transformers")
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128, max_position_embeddings=32)
        model, key = transformers.BertModel(cfg), "last_hidden_state"
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)
        model, key = transformers.GPT2LMHeadModel(cfg), "logits"
    train.prepare(model, init=slope)
    with torch.no_grad():  # GPT-2 initializes biases to zero; random ones test the bias folding too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return Outputs(model, key)


@EXPORTERS
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_models_collapse_every_mlp(tmp_path, dynamo, kind):
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    onnx_model = export(hf_model(kind, 1.0), (ids, mask), tmp_path / "m.onnx", dynamo, ["input_ids", "attention_mask"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    result = optimized(onnx_model, rewrites=2, feeds=feeds)
    assert count_ops(result.model, "PRelu") == 0
    (out,) = result.report.validation.outputs
    print(f"{kind} {'dynamo' if dynamo else 'legacy'}: max |abs| {out.max_abs:.3g}, rel L2 {out.rel_l2:.3g}")
    assert out.rel_l2 < 1e-6


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hf_models_with_slopes_far_from_one_are_left_unchanged(tmp_path, kind):
    ids = torch.randint(0, 64, (2, 8))
    onnx_model = export(hf_model(kind, 0.25), (ids, torch.ones(2, 8, dtype=torch.int64)), tmp_path / "m.onnx",
                        False, ["input_ids", "attention_mask"])
    result = lc_onnx.optimize(onnx_model)
    assert not result.report.rewrites and result.model is onnx_model
    assert len(result.report.skipped) == 2 and all("outside tolerance" in c.reason for c in result.report.skipped)


def test_hf_gpt2_chain_goes_through_reshapes_and_shape(tmp_path):
    # with dynamic axes the Reshape target after the activation is computed from Shape(activation)
    ids = torch.randint(0, 64, (1, 8))
    names = ["input_ids", "attention_mask"]
    path = tmp_path / "m.onnx"
    train.export(hf_model("gpt2", 1.0).eval(), (ids, torch.ones(1, 8, dtype=torch.int64)), path, input_names=names,
                 dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names})
    onnx_model = onnx.load(path)
    (first, *_) = [c for c in lc_onnx.inspect(onnx_model) if c.rule]
    ops = {n.name: n.op_type for n in onnx_model.graph.node}
    assert [ops[n] for n in first.names] == ["Gemm", "Reshape", "PRelu", "Reshape", "Gemm"]
    assert any(n.op_type == "Shape" and n.input[0] in {o for m in onnx_model.graph.node if m.op_type == "PRelu"
                                                        for o in m.output} for n in onnx_model.graph.node)
    assert np.isfinite(first.slope_range).all()
    feeds = {"input_ids": np.tile(ids.numpy(), (3, 2)), "attention_mask": np.ones((3, 16), np.int64)}
    optimized(onnx_model, rewrites=2, feeds=feeds)

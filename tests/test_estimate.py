"""lc-onnx estimate: the what-if graph folds each GELU block as a fine-tune to slope 1 would let lc-onnx fold it
(the same structure and size as the real collapse), is marked as a what-if and never stamped as lc-onnx's output,
and the command times it against the original (timings themselves are not asserted: benchmarks/ holds those)."""

from __future__ import annotations

import collections
import json
import warnings

import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lc_onnx  # noqa: E402
from lc_onnx import api, estimate, io, train  # noqa: E402
from lc_onnx.cli import main  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc1, self.act, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), Block()).eval()


X = torch.randn(2, 5, 16)


def export(model: nn.Module, path, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (X,), str(path), dynamo=dynamo, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 1: "tokens"}}, **({} if dynamo else {"opset_version": 17}))


def ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node if n.op_type not in ("Constant", "Identity"))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_the_what_if_graph_is_the_real_collapse_in_structure_and_size(tmp_path, dynamo):
    gelu, prelu = tmp_path / "gelu.onnx", tmp_path / "prelu.onnx"
    export(stack(), gelu, dynamo)
    prepared = stack()
    train.prepare(prepared, (X,), init=1.0)  # what a finished fine-tune leaves: every slope at 1
    export(prepared, prelu, dynamo)
    real = lc_onnx.optimize(prelu, tol=0.0).model

    original = io.read(gelu)[0]
    what_if, blocks = estimate.what_if(original)
    assert blocks == 3
    assert not {"Gelu", "Erf"} & set(ops(what_if))  # Gelu op (dynamo) or its erf form (legacy): gone
    assert ops(what_if)["MatMul"] == ops(real)["MatMul"] == 3
    assert estimate._params(what_if) == estimate._params(real)
    assert estimate.is_what_if(what_if) and not any(p.key == api.STAMP_KEY for p in what_if.metadata_props)
    one, _ = estimate.what_if(original, {1})
    assert ops(one)["MatMul"] == 5  # the other two blocks keep both layers


def test_estimate_times_each_block_and_the_last_ones_and_keeps_what_ifs_marked(tmp_path):
    model = tmp_path / "gelu.onnx"
    export(stack(), model, dynamo=True)
    kept = tmp_path / "kept"
    kept.mkdir()
    out = CliRunner().invoke(main, ["estimate", str(model), "--runs", "2", "--warmup", "1", "--input-shape",
                                    "x:1,7,16", "--keep", str(kept), "--json", str(tmp_path / "e.json")])
    assert out.exit_code == 0, out.output
    labels = [line.split("  ")[0].split(":")[0].strip() for line in out.output.splitlines()[1:7]]
    assert labels == ["original", "block 0", "block 1", "block 2", "last half (1)", "all (3)"]
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [r["blocks"] for r in rows] == [0, 1, 1, 1, 1, 3] and rows[0]["speedup"] == 1.0
    assert rows[-1]["macs"] < rows[0]["macs"] and rows[-1]["params"] < rows[0]["params"]
    files = sorted(kept.glob("*.what-if-*.onnx"))
    assert len(files) == 5 and all(estimate.is_what_if(io.read(f)[0]) for f in files)
    again = CliRunner().invoke(main, ["estimate", str(files[0])])
    assert again.exit_code == 2 and "a what-if model" in again.output


def test_a_model_without_such_blocks_says_a_fine_tune_would_collapse_nothing(tmp_path):
    model = tmp_path / "ln.onnx"
    export(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)).eval(), model, dynamo=True)
    out = CliRunner().invoke(main, ["estimate", str(model), "--runs", "2"])
    assert out.exit_code == 0 and "would collapse nothing" in out.output


def test_a_prelu_slope_outside_tol_is_a_block_and_chains_within_it_fold_as_they_are():
    from lc_onnx.demo import SLOPES, build_model

    model = build_model()  # 6 blocks: slopes 1, 1, 1, 1, 0.9996 (within 1e-3) and 0.25 (a fine-tune's work)
    what_if, blocks = estimate.what_if(model)
    assert blocks == 1 and SLOPES[-1] == 0.25
    assert ops(what_if)["MatMul"] == 6 and "PRelu" not in ops(what_if)  # every block one layer
    today, _ = estimate.what_if(model, set())
    assert ops(today)["MatMul"] == 7 and ops(today)["PRelu"] + ops(today)["LeakyRelu"] == 1  # the 0.25 block stays


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh"])
def test_gpt2s_gelu_blocks_are_found_and_folded_in_the_what_if(tmp_path, dynamo, act):
    """GPT-2's Conv1D exports Reshape → Gemm → Reshape around its tanh-form GELU, whose shape the next Reshape
    reads through a Shape node: each MLP is a block, and the what-if folds it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  activation_function=act)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path / "gpt2.onnx"
    train.export(model, {"input_ids": torch.randint(0, 64, (1, 8))}, path, dynamo=dynamo)
    found = [c for c in lc_onnx.inspect(path) if c.reason and "is not linear" in c.reason]
    assert len(found) == 2 and all("Gelu" in c.reason for c in found)
    original = io.read(path)[0]
    what_if, blocks = estimate.what_if(original)
    assert blocks == 2 and estimate._params(what_if) < estimate._params(original) - 2 * 32 * 128


def test_exclude_leaves_the_pooler_out_and_names_each_block(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    path = tmp_path / "bert.onnx"
    train.export(transformers.BertForSequenceClassification(cfg).eval(), {"input_ids": torch.randint(0, 64, (1, 8))},
                 path, dynamo=False)
    out = CliRunner().invoke(main, ["estimate", str(path), "--runs", "2", "--warmup", "1", "--exclude", "*pooler*"])
    assert out.exit_code == 0, out.output
    assert "block 0: bert/encoder/layer.0/intermediate/dense" in out.output and "all (2)" in out.output
    assert "left out by --exclude: bert/pooler/dense" in out.output
    assert "warning: open dims guessed" in out.output  # no --input-shape: the sizes were lc-onnx's choice


def test_a_model_whose_chains_fold_already_says_to_optimize(tmp_path):
    m = stack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.prepare(m, (X,), init=0.97)
    path = tmp_path / "prepared.onnx"
    export(m, path, dynamo=False)
    out = CliRunner().invoke(main, ["estimate", str(path), "--runs", "2"])
    assert out.exit_code == 0 and "no block needs a fine-tune" in out.output and "run lc-onnx optimize" in out.output

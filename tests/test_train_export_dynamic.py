"""train.export opens the batch and sequence dims by default (as optimum does), through both torch exporters: the
file runs at other batch sizes and lengths and computes what the model does; `dynamic=False` keeps the example's."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

transformers = pytest.importorskip("transformers")


def dims(path) -> list[list]:
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]


def export(model, inputs, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.export(model, inputs, path, **kw)


def run(path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_token_model_takes_any_batch_and_length(tmp_path, dynamo):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    example = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    train.prepare(model, example)
    path = tmp_path / "bert.onnx"
    export(model, example, path, dynamo=dynamo)
    assert dims(path) == [["batch", "sequence"], ["batch", "sequence"]]
    for batch, length in ((1, 3), (3, 11)):  # also batch 1, which the dynamo exporter fixes when it is the example's
        feed = {"input_ids": torch.randint(0, 64, (batch, length)),
                "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        with torch.no_grad():
            want = model(**feed).last_hidden_state.numpy()
        got = run(path, {k: v.numpy() for k, v in feed.items()})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_float_input_opens_its_batch_and_dynamic_false_keeps_the_example(tmp_path, dynamo):
    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(2, 5, 16)
    train.prepare(model, (x,))
    path, fixed = tmp_path / "mlp.onnx", tmp_path / "fixed.onnx"
    export(model, (x,), path, dynamo=dynamo)
    export(model, (x,), fixed, dynamo=dynamo, dynamic=False)
    assert dims(path) == [["batch", 5, 16]] and dims(fixed) == [[2, 5, 16]]  # dim 1 may be channels: it stays
    y = torch.randn(3, 5, 16)
    with torch.no_grad():
        np.testing.assert_allclose(run(path, {"input_0": y.numpy()}), model(y).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="dimension|Got invalid dimensions"):
        run(fixed, {ort.InferenceSession(str(fixed)).get_inputs()[0].name: y.numpy()})

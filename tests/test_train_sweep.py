"""The training API called as users call it, with inputs nobody here wrote: each test is one bug that was found
in such a sweep (the input, and what must hold now)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def onnx_output(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["float32", "float16"])
def test_export_takes_one_tensor_as_prepare_does(tmp_path, dtype):
    # a lone tensor was unpacked into its rows: "forward() takes 2 positional arguments but 5 were given"
    model = Block().eval()
    assert list(train.prepare(model, X, init=0.5)) == ["act"]
    train.export(model, X, tmp_path / "m.onnx", dtype=dtype)
    x = X if dtype is None else X.half()
    with torch.no_grad():
        want = model(X).numpy()
    np.testing.assert_allclose(onnx_output(tmp_path / "m.onnx", x), want, rtol=1e-2 if dtype else 1e-5,
                               atol=1e-2 if dtype else 1e-6)


def prepared_at_one() -> nn.Module:
    model = Block().eval()
    train.prepare(model, (X,), init=1.0)
    return model


def test_a_nan_slope_is_not_collapsed():
    # NaN > threshold is False, so a diverged block was fused as if its slope were 1
    model = prepared_at_one()
    with torch.no_grad():
        model.act.weight.fill_(float("nan"))
    assert train.collapse(model, threshold=0.05) == [] and train.collapse(model, threshold=float("inf")) == []
    assert isinstance(model.act, train.LayerCollapsePReLU)


@pytest.mark.parametrize("threshold", [float("nan"), -0.1, None], ids=["nan", "negative", "none"])
def test_a_threshold_that_is_no_distance_is_one_clear_error(threshold):
    # threshold=nan fused every block whatever its slope; None failed inside a comparison
    model = prepared_at_one()
    with torch.no_grad():
        model.act.weight.fill_(0.2)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        train.collapse(model, threshold=threshold)
    assert isinstance(model.act, train.LayerCollapsePReLU)


class Nested(nn.Module):
    """Blocks named 'act' and 'inner.act': the first name is a substring of the second."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.inner = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), Block()

    def forward(self, x):
        return self.inner(self.fc2(self.act(self.fc1(x))))


def test_one_string_is_one_pattern_or_name():
    # a string was iterated: include="inner.*" matched every name (its '*'), exclude="inner.*" excluded all,
    # and only="inner.act" tested substrings, so it also fused the block "act"
    assert list(train.prepare(Nested().eval(), (X,), include="inner.*")) == ["inner.act"]
    assert list(train.prepare(Nested().eval(), (X,), exclude="inner.*")) == ["act"]
    model = Nested().eval()
    assert list(train.prepare(model, (X,), init=1.0)) == ["act", "inner.act"]
    assert train.collapse(model, only="inner.act") == ["inner.act"]
    assert list(train.blocks(model)) == ["act"]


def test_a_model_or_inputs_on_the_meta_device_are_one_clear_error():
    # meta inputs failed inside prepare's own layer check (Tensor.item() on meta), reported as the inputs' fault
    with torch.device("meta"):
        empty = Block()
    with pytest.raises(ValueError, match=r"weights are on the meta device \(no values; fc1.weight and 3 more\)"):
        train.prepare(empty, (X.to("meta"),))
    model = Block()
    with pytest.raises(ValueError, match="example_inputs are on the meta device"):
        train.prepare(model, (X.to("meta"),))
    assert isinstance(model.act, nn.GELU)


def test_prepare_again_keeps_a_block_whose_per_channel_slopes_were_trained_apart():
    # distinct slopes fail the elementwise probe, so a second prepare() dropped the block from its names
    model = nn.Sequential(Block(), Block()).eval()
    assert list(train.prepare(model, (X,), per_channel=True)) == ["0.act", "1.act"]
    with torch.no_grad():
        model[0].act.weight.copy_(torch.linspace(0.5, 1.0, 32))
    again = train.prepare(model, (X,), per_channel=True)
    assert list(again) == ["0.act", "1.act"] and [s.first for s in again.sites] == ["0.fc1", "1.fc1"]
    assert train.slopes(model)["0.act"] == 0.5


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_per_channel_slopes_on_3d_inputs_export_as_one_prelu_that_lc_onnx_folds(tmp_path, dynamo):
    # they exported as GreaterOrEqual/Mul/Where, which `lc-onnx optimize` cannot fold: every transformer MLP
    import onnx

    import lc_onnx

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    model = Block().eval()
    train.prepare(model, (x,), per_channel=True)
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(0.2, 1.0, 32))
        want = model(x).numpy()
    train.export(model, (x,), tmp_path / "m.onnx", dynamo=dynamo)
    exported = onnx.load(tmp_path / "m.onnx")
    assert [n.op_type for n in exported.graph.node if n.op_type not in ("MatMul", "Add", "Gemm")] == ["PRelu"]
    np.testing.assert_allclose(onnx_output(tmp_path / "m.onnx", x), want, rtol=1e-5, atol=1e-6)
    assert not model.act.exporting  # eager forward (with autograd) again
    with torch.no_grad():
        model.act.weight.fill_(1.0)
        want = model(x).numpy()
    train.export(model, (x,), tmp_path / "one.onnx", dynamo=dynamo, **({"custom_translation_table": None}
                                                                      if dynamo else {}))  # torch's default
    folded = lc_onnx.optimize(str(tmp_path / "one.onnx")).model
    assert "PRelu" not in [n.op_type for n in folded.graph.node]
    onnx.save(folded, tmp_path / "folded.onnx")
    np.testing.assert_allclose(onnx_output(tmp_path / "folded.onnx", x), want, rtol=1e-4, atol=1e-5)


def test_a_compiled_model_exports_with_the_legacy_exporter(tmp_path):
    # torch.compile's wrapper failed in the legacy exporter: "using FX to torch.jit.trace a dynamo-optimized function"
    model = Block().eval()
    train.prepare(model, (X,), init=0.5)
    train.export(torch.compile(model), (X,), tmp_path / "m.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(onnx_output(tmp_path / "m.onnx", X), model(X).numpy(), rtol=1e-5, atol=1e-6)

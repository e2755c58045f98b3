"""Hardening 3, the training side: blocks whose layers compute more than their weights, whose hidden width is read
by the forward, or whose weights are read outside their own call are never prepared (collapse would change what
they compute); each is said in one line."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)


def prepared(model: nn.Module, inputs=X) -> tuple[train.Prepared, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = train.prepare(model.eval(), inputs, init=1.0)
    return found, [str(w.message) for w in caught]


class LoraLinear(nn.Linear):
    """loralib's Linear: the weight's map plus a low-rank adapter path, B = 0 as LoRA initialises it."""

    def __init__(self, d_in: int, d_out: int, r: int = 4):
        super().__init__(d_in, d_out)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * 2.0


class LoraBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = LoraLinear(16, 32), nn.GELU(), LoraLinear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_item01_a_linear_subclass_with_its_own_forward_is_not_prepared_and_says_so():
    model = LoraBlock()
    found, said = prepared(model)
    assert list(found) == [] and not train.blocks(model)
    assert any("LoraLinear" in line and "lora_A, lora_B" in line for line in said), said


def test_item01_a_linear_subclass_keeping_linears_forward_is_still_a_layer():
    class Tagged(nn.Linear):  # MHA's NonDynamicallyQuantizableLinear: a subclass, nn.Linear's own forward
        pass

    model = nn.Sequential(Tagged(16, 32), nn.GELU(), Tagged(32, 16)).eval()
    found, _ = prepared(model)
    assert list(found) == ["1"]
    with torch.no_grad():
        before = model(*X)
        assert train.collapse(model) == ["1"]
        torch.testing.assert_close(model(*X), before)


class PeftBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _lora(model: nn.Module):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["fc1", "fc2"], lora_alpha=8))
    with torch.no_grad():  # as if the adapter had trained
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return lora


def test_item01_peft_lora_modules_are_not_prepared_as_they_are():
    lora = _lora(PeftBlock())
    found, _ = prepared(lora)
    assert list(found) == [] and not train.blocks(lora)


def test_item01_peft_lora_after_merge_and_unload_collapses_with_the_adapter_in():
    lora = _lora(PeftBlock()).eval()
    with torch.no_grad():
        adapted = lora(*X)
    merged = lora.merge_and_unload().eval()
    found, _ = prepared(merged)
    assert list(found) == ["act"]
    with torch.no_grad():
        for p in train.slope_parameters(merged):
            p.fill_(1.0)
        linear = merged.fc2(merged.fc1(X[0]))
        assert train.collapse(merged) == ["act"]
        torch.testing.assert_close(merged(*X), linear, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(linear, PeftBlock().eval()(*X))  # the adapter is in: not the base model
    assert adapted.shape == linear.shape


class WidthScaled(nn.Module):
    """muP-style: the hidden tensor's width sets a scale after the activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) / math.sqrt(h.shape[-1])


class SizeScaled(WidthScaled):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h)) * (h.size(-1) ** -0.5)


@pytest.mark.parametrize("cls", [WidthScaled, SizeScaled])
def test_item02_a_forward_reading_the_hidden_width_is_not_prepared_and_says_so(cls):
    model = cls()
    found, said = prepared(model)
    assert list(found) == [] and not train.blocks(model)
    assert any("shape" in line and "fc1" in line for line in said), said


def test_item02_a_shape_read_inside_the_layers_own_call_is_no_obstacle():
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D  # its forward reads x.size() to shape the output

    class GPT2Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.act, self.c_proj = Conv1D(32, 16), nn.GELU(), Conv1D(16, 32)

        def forward(self, x):
            return self.c_proj(self.act(self.c_fc(x)))

    model = GPT2Mlp()
    found, _ = prepared(model)
    assert list(found) == ["act"]
    with torch.no_grad():
        before = model(*X)
        train.collapse(model)
        torch.testing.assert_close(model(*X), before, rtol=1e-5, atol=1e-5)


class TiedAutoencoder(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, 16)

    def forward(self, x):
        code = self.fc2(self.act(self.fc1(x)))
        return F.linear(code, self.fc2.weight.t())  # the decoder reads the encoder's weight


@pytest.mark.parametrize("hidden", [32, 16])  # 16: the fused weight would even fit, silently wrong
def test_item03_a_weight_read_outside_its_layer_is_not_prepared_and_says_so(hidden):
    model = TiedAutoencoder(hidden)
    found, said = prepared(model)
    assert list(found) == [] and not train.blocks(model)
    assert any("fc2.weight" in line and "outside" in line for line in said), said


def test_item03_a_parameter_shared_with_another_module_is_not_prepared():
    model = PeftBlock()
    head = nn.Linear(32, 16)
    head.weight = model.fc2.weight  # tied as HF ties embeddings: one Parameter in two modules

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = model, head

        def forward(self, x):
            return self.block(x) + self.head(torch.ones(x.shape[0], 32))

    tied = Tied()
    found, said = prepared(tied)
    assert list(found) == [] and not train.blocks(tied)
    assert any("block.fc2.weight" in line for line in said), said


# the second hostile pass: state read by a subclass's own forward that changes after prepare, a global hook, and
# width reads through nbytes and the storage


class ScaledLinear(nn.Linear):
    """Its own forward reads a plain float, no registered state: recorded exact at 1.0, changed after."""

    scale = 1.0

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.scale


def test_item01_state_a_subclass_reads_that_changed_since_prepare_is_refused_by_collapse():
    model = nn.Sequential(ScaledLinear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    found, _ = prepared(model)
    assert list(found) == ["1"]
    model[0].scale = 0.5
    with pytest.raises(RuntimeError, match=r"0 \(ScaledLinear\), called now, does not compute its weights' map"):
        train.collapse(model)
    assert train.blocks(model)  # nothing fused


def test_item01_a_global_forward_hook_that_changes_a_layer_is_refused_by_collapse():
    model = PeftBlock().eval()
    prepared(model)
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: out * 1.5 if m is model.fc1 else None)
    try:
        with pytest.raises(RuntimeError, match="fc1 .*does not compute its weights' map"):
            train.collapse(model)
    finally:
        handle.remove()


class NbytesScaled(WidthScaled):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) / math.sqrt(h.nbytes)


class StorageScaled(WidthScaled):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) / math.sqrt(h.untyped_storage().nbytes())


@pytest.mark.parametrize("cls", [NbytesScaled, StorageScaled])
def test_item02_width_read_through_nbytes_or_the_storage_is_not_prepared(cls):
    model = cls()
    found, said = prepared(model)
    assert list(found) == [] and any("shape" in line for line in said), said

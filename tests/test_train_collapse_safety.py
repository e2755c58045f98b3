"""`collapse` never turns a model into another: blocks found by names alone are fused only once a recorded forward
pass proves them (or the user says to trust the names), and an `only` name that matches no block is an error."""

from __future__ import annotations

import contextlib
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402
from lc_onnx.train import layers  # noqa: E402

X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


class Mlp(nn.Module):
    """fc1 -> act -> fc2, the names the fallback looks for; subclasses put something between act and fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.norm = nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NormAfterAct(Mlp):
    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class ResidualAfterAct(Mlp):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)) + x)


def by_names(model: nn.Module) -> nn.Module:
    """`model` prepared without example inputs, at slope 1 (the activation is then the identity)."""
    with pytest.warns(UserWarning, match="module names"):
        found = train.prepare(model.eval(), init=1.0)
    assert list(found) == ["act"] and not found.verified
    return model


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*X)


@pytest.mark.parametrize("make", [NormAfterAct, ResidualAfterAct, Mlp], ids=lambda c: c.__name__)
def test_a_block_found_by_names_is_refused_without_example_inputs(make):
    model = by_names(make())
    before = output(model)
    with pytest.raises(RuntimeError, match=r"act: .*example_inputs.*trust_names=True"):
        train.collapse(model)
    assert isinstance(model.act, train.LayerCollapsePReLU)
    torch.testing.assert_close(output(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("make", [NormAfterAct, ResidualAfterAct], ids=lambda c: c.__name__)
def test_example_inputs_refuse_a_block_the_forward_pass_does_not_chain(make):
    model = by_names(make())
    before = output(model)
    with pytest.raises(RuntimeError, match="the forward pass on example_inputs does not run fc1 -> act -> fc2 alone"):
        train.collapse(model, example_inputs=X)
    torch.testing.assert_close(output(model), before, rtol=0, atol=0)


def test_example_inputs_verify_a_plain_block_which_then_collapses_exactly():
    model = by_names(Mlp())
    before = output(model)
    assert train.collapse(model, example_inputs=X) == ["act"]
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)
    assert isinstance(model.fc1, nn.Identity) and isinstance(model.fc2, nn.Linear)


def test_an_unverified_block_outside_the_threshold_is_no_error():
    model = by_names(NormAfterAct())
    with torch.no_grad():
        model.act.weight.fill_(0.5)
    assert train.collapse(model) == [] and train.collapse(model, example_inputs=X) == []


def test_prepare_with_example_inputs_verifies_blocks_it_had_found_by_names():
    model = by_names(Mlp())
    assert list(train.prepare(model, X)) == ["act"] and model.act.verified
    before = output(model)
    assert train.collapse(model) == ["act"]
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)


def test_prepare_with_example_inputs_leaves_a_wrong_name_guess_unverified():
    model = by_names(NormAfterAct())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(train.prepare(model, X)) == []
    assert not model.act.verified


def test_trust_names_fuses_as_named_what_the_names_say():
    model = by_names(Mlp())
    before = output(model)
    assert train.collapse(model, trust_names=True) == ["act"]
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)
    model = by_names(NormAfterAct())  # the user's word: the norm between is fused away
    assert train.collapse(model, trust_names=True) == ["act"] and isinstance(model.fc1, nn.Identity)


def test_example_inputs_verify_sequential_blocks_with_a_batchnorm_between():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(),
                          nn.Dropout(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
    with pytest.warns(UserWarning, match="module names"):
        assert list(train.prepare(model, init=1.0)) == ["2", "4"]
    before = output(model)
    assert train.collapse(model, example_inputs=X) == ["2", "4"]
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)


def test_a_verified_block_collapses_without_example_inputs():
    model = Mlp().eval()
    assert list(train.prepare(model, X, init=1.0)) == ["act"]
    before = output(model)
    assert train.collapse(model) == ["act"]
    torch.testing.assert_close(output(model), before, rtol=1e-5, atol=1e-5)


def two_blocks() -> nn.Module:
    model = nn.Sequential(Mlp(), Mlp()).eval()
    assert list(train.prepare(model, X, init=1.0)) == ["0.act", "1.act"]
    return model


def test_an_only_name_that_matches_no_block_is_an_error_naming_the_closest():
    model = two_blocks()
    with pytest.raises(ValueError, match=r"'0.acts' \(closest: 0\.act, 1\.act\); the prepared blocks are 0\.act, "
                                         r"1\.act$"):
        train.collapse(model, only=["1.act", "0.acts"])
    assert len(train.blocks(model)) == 2  # nothing fused
    with pytest.raises(ValueError, match=r"'mlp'; the prepared blocks are 0\.act, 1\.act$"):
        train.collapse(model, only="mlp")
    assert train.collapse(model, only="1.act") == ["1.act"]
    with pytest.raises(ValueError, match=r"'1.act'.*; the prepared blocks are 0\.act$"):  # collapsed already
        train.collapse(model, only="1.act")


# the check that a layer computes its weights' map: as tight as the dtype and device allow


def conv_block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_sites_are_found_in_every_floating_dtype(dtype):
    assert list(train.prepare(Mlp().eval().to(dtype), (X[0].to(dtype),))) == ["act"]
    model = conv_block().eval().to(dtype)
    assert list(train.prepare(model, (torch.randn(2, 4, 3, 3, dtype=dtype),))) == ["2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_hook_that_nudges_a_layer_by_1e_4_is_seen_in_float32_and_float64(dtype):
    model = Mlp().eval().to(dtype)
    model.fc2.register_forward_hook(lambda module, args, out: out * (1 + 1e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(train.prepare(model, (X[0].to(dtype),))) == []


def tolerance(module: nn.Module, device: str = "cpu", dtype=torch.float32) -> float:
    return layers.tolerance(module, dtype, torch.device(device))


@contextlib.contextmanager
def precision(flag, mode: str):
    before = flag.fp32_precision
    flag.fp32_precision = mode
    try:
        yield
    finally:
        flag.fp32_precision = before


def test_the_tolerance_follows_the_precision_float32_products_may_use():
    linear, conv, norm = nn.Linear(2, 2), nn.Conv2d(2, 2, 1), nn.BatchNorm1d(2)
    assert tolerance(linear) == tolerance(conv) == tolerance(linear, "cuda") == tolerance(norm, "cuda") == 1e-5
    assert tolerance(linear, dtype=torch.float64) < 1e-5 < tolerance(linear, dtype=torch.bfloat16)
    with precision(torch.backends.cudnn.conv, "tf32"), precision(torch.backends.cuda.matmul, "tf32"):
        assert tolerance(conv, "cuda") == tolerance(linear, "cuda") == 5e-3 and tolerance(linear) == 1e-5
    with precision(torch.backends.mkldnn.matmul, "bf16"):  # set_float32_matmul_precision("medium") on the CPU
        assert tolerance(linear) > 1e-2 and tolerance(conv) == 1e-5
    assert tolerance(linear) == 1e-5

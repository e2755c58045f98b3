"""`prepare(model, example_inputs)` trusts the data flow, not names: each site it finds collapses exactly, and each
near miss (a norm, a residual, a second consumer, a gate, a non-elementwise module in between) is left alone."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lc_onnx import train  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)


class Block(nn.Module):
    """fc1 -> act -> fc2 with extra modules a subclass's forward may use (or not)."""

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), act or nn.GELU(), nn.Linear(32, 16)
        self.ln, self.side, self.up = nn.LayerNorm(32), nn.Linear(32, 16), nn.Linear(16, 32)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def collapses_exactly(model: nn.Module, inputs=X, count: int = 1) -> None:
    """prepare(init=1) finds `count` sites; the prepared model equals the original with those activations
    replaced by the identity; collapse keeps that output."""
    model.eval()
    found = train.prepare(model, inputs, init=1.0)
    assert len(found) == count, list(found)
    with torch.no_grad():
        prepared = model(*inputs)
        assert train.collapse(model) == list(found)
        torch.testing.assert_close(model(*inputs), prepared, rtol=1e-5, atol=1e-5)


def no_site(model: nn.Module, inputs=X) -> None:
    found = train.prepare(model.eval(), inputs)
    assert list(found) == [] and not train.blocks(model)


def test_a_plain_block_is_a_site():
    collapses_exactly(Block())


def test_in_place_relu_and_eval_dropout_between_are_seen_through():
    collapses_exactly(nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.3), nn.ReLU(inplace=True), nn.Dropout(0.1),
                                    nn.Linear(32, 8)))


class FunctionalDropout(Block):
    def forward(self, x):  # OPT/BART/Whisper: F.dropout between the activation and fc2
        return self.fc2(F.dropout(self.act(self.fc1(x)), p=0.1, training=self.training))


def test_functional_dropout_between_is_seen_through():
    collapses_exactly(FunctionalDropout())


def test_batchnorm_between_folds_and_sequential_blocks_chain():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 16),
                          nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))
    with torch.no_grad():
        for bn in (model[1], model[6]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    collapses_exactly(model, count=2)
    assert sum(isinstance(m, nn.Linear) for m in model) == 1 and not any(
        isinstance(m, nn.BatchNorm1d) for m in model)


class QuickGelu(nn.Module):  # a custom class in no list of activations
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def test_a_custom_elementwise_activation_counts():
    collapses_exactly(Block(QuickGelu()))


class SharedAct(nn.Module):
    """One nn.GELU used by two blocks and once more on a path that is no site."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.act = (nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32),
                                                    nn.Linear(32, 16), nn.GELU())
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        y = self.b(self.act(self.a(x)))
        return self.d(self.act(self.c(y))) + self.act(self.norm(y))


def test_a_shared_activation_gets_one_slope_per_site_and_stays_itself_elsewhere():
    model = SharedAct().eval()
    original = copy.deepcopy(model)
    found = train.prepare(model, X, init=1.0)
    assert list(found) == ["act.sites.0", "act.sites.1"] and all(s.shared for s in found.sites)
    with torch.no_grad():
        model.act.sites["0"].weight.fill_(0.5)
        model.act.sites["1"].weight.fill_(0.25)
        x = X[0]
        y = original.b(F.prelu(original.a(x), torch.tensor([0.5])))
        want = original.d(F.prelu(original.c(y), torch.tensor([0.25]))) + F.gelu(original.norm(y))
        torch.testing.assert_close(model(x), want)
        model.act.sites["0"].weight.fill_(1.0)
        before = model(x)
        assert train.collapse(model) == ["act.sites.0"]  # the other is at 0.25
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        model.act.sites["1"].weight.fill_(1.0)
        before = model(x)
        assert train.collapse(model) == ["act.sites.1"]
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# near misses: the names say "MLP", the data flow says otherwise


class NormBetween(Block):
    def forward(self, x):
        return self.fc2(self.act(self.ln(self.fc1(x))))


class FanOut(Block):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) + self.side(h)


class HiddenResidual(Block):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) + h.mean(-1, keepdim=True)


class PreActivationUsed(Block):
    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h)) + h.mean(-1, keepdim=True)


class Gated(Block):
    def forward(self, x):  # Llama: down(act(gate(x)) * up(x))
        return self.fc2(self.act(self.fc1(x)) * self.up(x))


class HiddenIsOutput(Block):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h), h


class FirstLayerUsedTwice(Block):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + self.fc1(x)[:, :16]


class ReshapeBetween(Block):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)).view(-1, 8, 4).transpose(1, 2).reshape(-1, 32))


class Scale(nn.Module):  # per-channel: not one function of each element
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2, 32))

    def forward(self, x):
        return x * self.gamma


@pytest.mark.parametrize("model", [
    NormBetween(), FanOut(), HiddenResidual(), PreActivationUsed(), Gated(), HiddenIsOutput(),
    FirstLayerUsedTwice(), ReshapeBetween(), Block(nn.Softmax(-1)), Block(nn.LayerNorm(32, elementwise_affine=False)),
    Block(Scale()), Block(nn.Identity()), Block(nn.Dropout()),
], ids=lambda m: type(m).__name__ if type(m) is not Block else type(m.act).__name__)
def test_near_misses_are_no_sites(model):
    no_site(model)


def test_batchnorm1d_on_3d_input_is_no_pass_through():
    class Channels(Block):  # BatchNorm1d normalizes dim 1, which is not the features here
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.fc2(self.act(self.bn(self.fc1(x))))

    no_site(Channels(), (torch.randn(2, 5, 16),))


def test_names_alone_would_prepare_the_norm_case_that_data_flow_refuses():
    with pytest.warns(UserWarning, match="module names"):
        guessed = train.prepare(NormBetween())
    assert list(guessed) == ["act"] and not guessed.verified


class Functional(Block):
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def test_a_functional_activation_is_reported_not_swapped():
    model = Functional().eval()
    with pytest.warns(UserWarning, match="function call"):
        found = train.prepare(model, X)
    assert list(found) == []
    assert len(found.unswappable) == 1 and found.unswappable[0].startswith("fc1 -> gelu -> fc2")


def test_prepare_takes_keyword_inputs_and_keeps_training_mode():
    class Kw(Block):
        def forward(self, x=None, scale=1.0):
            return self.fc2(self.act(self.fc1(x))) * scale

    model = Kw().train()
    assert list(train.prepare(model, {"x": X[0], "scale": 2.0})) == ["act"]
    assert model.training and model.fc1.training


def test_prepare_is_idempotent():
    model = nn.Sequential(Block(), Block()).eval()
    first = train.prepare(model, X)
    acts = [model[0].act, model[1].act]
    assert list(train.prepare(model, X)) == list(first) == ["0.act", "1.act"]
    assert [model[0].act, model[1].act] == acts


def test_collapse_refuses_a_site_whose_modules_changed():
    model = Block().eval()
    train.prepare(model, X, init=1.0)
    model.fc2 = nn.Sequential(nn.Linear(32, 16))
    with pytest.raises(RuntimeError, match="changed since prepare"):
        train.collapse(model)
    model = Block().eval()
    train.prepare(model, X, init=1.0)
    model.fc1 = nn.Linear(16, 24)
    with pytest.raises(RuntimeError, match="changed since prepare"):
        train.collapse(model)


def test_collapse_works_after_the_model_is_wrapped():
    model = Block().eval()
    train.prepare(model, X, init=1.0)
    wrapped = nn.Sequential(nn.Identity(), nn.Sequential(model))
    with torch.no_grad():
        before = wrapped(X[0])
        assert train.collapse(wrapped) == ["1.0.act"]
        torch.testing.assert_close(wrapped(X[0]), before, rtol=1e-5, atol=1e-5)


def test_hf_conv1d_sites_collapse():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D

    class Gpt2Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.act, self.c_proj = conv1d(32, 16), nn.GELU(), conv1d(16, 32)
            with torch.no_grad():
                self.c_fc.bias.normal_()
                self.c_proj.bias.normal_()

        def forward(self, x):
            return self.c_proj(self.act(self.c_fc(x)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collapses_exactly(Gpt2Mlp(), (torch.randn(2, 3, 16),))


def test_inputs_the_model_cannot_take_are_one_clear_error():
    model = Block()
    with pytest.raises(ValueError, match="did not run on example_inputs"):
        train.prepare(model, (torch.randn(4, 3),))
    assert isinstance(model.act, nn.GELU) and model.training


def pointwise_block(conv=lambda cin, cout: nn.Conv2d(cin, cout, 1), norm=True) -> nn.Module:
    layers = [conv(8, 32)] + ([nn.BatchNorm2d(32)] if norm else []) + [nn.SiLU(), conv(32, 8)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model


IMAGE = (torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(8)),)


def test_pointwise_convolutions_with_batchnorm2d_collapse_into_one_conv():
    model = pointwise_block()
    collapses_exactly(model, IMAGE)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1) and not any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_per_channel_slopes_of_a_pointwise_conv_site_act_on_the_channels():
    model = pointwise_block(norm=False).eval()
    train.prepare(model, IMAGE, per_channel=True)
    act = model[1]
    assert act.num_parameters == 32
    with torch.no_grad():
        act.weight.copy_(torch.linspace(0, 1, 32))
        h = torch.randn(2, 32, 3, 3)
        torch.testing.assert_close(act(h), torch.where(h >= 0, h, h * torch.linspace(0, 1, 32)[:, None, None]))


@pytest.mark.parametrize("conv", [
    lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1),
    lambda cin, cout: nn.Conv2d(cin, cout, 1, stride=2),
    lambda cin, cout: nn.Conv2d(cin, cout, 1, padding=1),
    lambda cin, cout: nn.Conv2d(cin, cout, 1, groups=2),
], ids=["3x3", "stride2", "padded", "grouped"])
def test_convolutions_that_are_not_pointwise_are_no_sites(conv):
    no_site(pointwise_block(conv), IMAGE)


def test_a_linear_and_a_conv_do_not_pair():
    class Mixed(nn.Module):  # the Linear maps the last dim, the conv the channels: no single linear map
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.conv = nn.Linear(6, 6), nn.GELU(), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.conv(self.act(self.fc(x)))

    no_site(Mixed(), IMAGE)


class Reordered(nn.Module):
    """Two blocks in a row (a -> act1 -> b -> act2 -> c) registered back to front."""

    def __init__(self):
        super().__init__()
        self.c, self.act2, self.b, self.act1, self.a = (nn.Linear(32, 16), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                                                        nn.Linear(16, 32))

    def forward(self, x):
        return self.c(self.act2(self.b(self.act1(self.a(x)))))


def test_blocks_in_a_row_collapse_in_forward_order_whatever_their_registration_order():
    model = Reordered().eval()
    assert list(train.blocks(model)) == [] and list(train.prepare(model, X, init=1.0)) == ["act1", "act2"]
    assert list(train.blocks(model)) == ["act2", "act1"]  # named_modules order: registration
    with torch.no_grad():
        before = model(X[0])
        assert train.collapse(model) == ["act1", "act2"]
        torch.testing.assert_close(model(X[0]), before, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_a_changed_block_names_what_is_there_now():
    model = Block().eval()
    train.prepare(model, X, init=1.0)
    model.fc2 = nn.Identity()
    with pytest.raises(RuntimeError, match=r"\(fc2\) is now Identity"):
        train.collapse(model)


def test_a_refused_block_leaves_every_block_as_it_was():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.ReLU(), nn.BatchNorm1d(16),
                          nn.Linear(16, 4)).eval()
    assert list(train.prepare(model, X, init=1.0)) == ["1", "3"]
    model[4].train()  # the second block's BatchNorm would fold with batch statistics
    with pytest.raises(RuntimeError, match="eval"):
        train.collapse(model)
    assert [type(m).__name__ for m in model] == ["Linear", "LayerCollapsePReLU", "Linear", "LayerCollapsePReLU",
                                                 "BatchNorm1d", "Linear"]

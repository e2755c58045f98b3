"""Models built to trip `prepare`/`collapse`: each either collapses exactly (the output at slope 1 is kept) or is
left alone, with a line saying why where the site is real; none crashes later or computes something else."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from test_train_sites import SharedAct, collapses_exactly  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations  # noqa: E402

from lc_onnx import train  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)
SEQ = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3)),)


class Block(nn.Module):
    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), act or nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def no_site(model: nn.Module, inputs=X) -> train.Prepared:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = train.prepare(model.eval(), inputs)
    assert list(found) == [] and not train.blocks(model)
    return found


# a linear layer that does not compute what its weights say: collapse would fold the weights alone


def scaled_output(model):
    model.fc1.register_forward_hook(lambda module, args, out: out * 2)
    return model


def nudged_output(model):  # 1e-4 relative: far below 16-bit rounding, far above float32's
    model.fc1.register_forward_hook(lambda module, args, out: out + 1e-4 * out)
    return model


def scaled_input(model):
    model.fc1.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    return model


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def subclass(model):
    model.fc2 = ScaledLinear(32, 16)
    return model


def batch_statistics(model):  # without running stats a BatchNorm uses the batch's, even in eval
    return nn.Sequential(model.fc1, nn.BatchNorm1d(32, track_running_stats=False), model.act, model.fc2)


@pytest.mark.parametrize("change", [scaled_output, nudged_output, scaled_input, subclass, batch_statistics],
                         ids=lambda f: f.__name__)
def test_a_layer_whose_output_is_not_its_weights_map_is_no_site(change):
    no_site(change(Block()))


def test_a_hook_that_changes_nothing_and_a_parametrized_weight_keep_the_site():
    model = Block()
    hook = model.fc1.register_forward_hook(lambda module, args, out: None)
    model.fc2 = parametrizations.weight_norm(model.fc2)
    assert list(train.prepare(model.eval(), X, init=1.0)) == ["act"]
    with pytest.raises(RuntimeError, match="fc1 carries forward hook"):  # the fused layer would run without it
        train.collapse(model)
    hook.remove()
    collapses_exactly(model)


# a module registered under two names: a swap under one leaves the forward calling the other


class AliasedFirst(Block):
    def __init__(self):
        super().__init__()
        self.proj_in = self.fc1

    def forward(self, x):
        return self.fc2(self.act(self.proj_in(x)))


class AliasedAct(Block):
    def __init__(self):
        super().__init__()
        self.activation = self.act

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


@pytest.mark.parametrize("model", [AliasedFirst(), AliasedAct()], ids=lambda m: type(m).__name__)
def test_a_site_with_an_aliased_module_is_reported_not_prepared(model):
    found = no_site(model)
    assert len(found.unswappable) == 1 and "is also" in found.unswappable[0]


# nn.TransformerEncoderLayer: eval + no grad runs a fused kernel that calls no module


def test_transformer_encoder_layers_with_a_gelu_module_run_their_prelu_and_collapse():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, activation=nn.GELU(), batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    assert list(train.prepare(model, SEQ, init=0.5)) == ["layers.0.activation", "layers.1.activation"]
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    grad = model(*SEQ, src_key_padding_mask=mask)
    with torch.no_grad():  # the fast path would compute GELU here (and, once collapsed, read a missing weight)
        torch.testing.assert_close(model(*SEQ, src_key_padding_mask=mask)[~mask], grad[~mask])
        for act in train.blocks(model).values():
            act.weight.fill_(1.0)
        before = model(*SEQ)
        assert len(train.collapse(model)) == 2
        torch.testing.assert_close(model(*SEQ), before, rtol=1e-5, atol=1e-5)


def test_a_scripted_model_is_one_clear_error_and_a_scripted_part_is_reported():
    with pytest.raises(ValueError, match="before torch.jit.script"):
        train.prepare(torch.jit.script(Block()), X)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.jit.script(Block())

        def forward(self, x):
            return self.mlp(x)

    found = no_site(Outer())
    assert found.unswappable == ["mlp: a TorchScript module, which prepare() cannot see inside; prepare the model "
                                 "before torch.jit.script/trace"]


def test_prepare_twice_with_a_shared_activation_keeps_the_site_names():
    model = SharedAct().eval()
    assert list(train.prepare(model, X, init=0.5, include=["act.sites.0"])) == ["act.sites.0"]
    assert list(train.prepare(model, X, init=0.25, include=["act.sites.1"])) == ["act.sites.1"]
    assert list(train.prepare(model, X)) == ["act.sites.0", "act.sites.1"]
    assert train.slopes(model) == {"act.sites.0": 0.5, "act.sites.1": 0.25}
    assert isinstance(model.act.original, nn.GELU)


def test_a_prepared_activation_takes_its_input_by_keyword_as_torch_activations_do():
    class Keyword(Block):
        def forward(self, x):
            return self.fc2(self.act(input=self.fc1(x)))

    collapses_exactly(Keyword())
    model = SharedAct().eval()
    train.prepare(model, X)
    model.act(input=X[0])


def test_per_channel_slopes_run_on_an_unbatched_input():
    model = Block().eval()
    x = X[0][0]
    train.prepare(model, (x,), per_channel=True)
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(0.5, 1.5, 32))
        h = model.fc1(x)
        torch.testing.assert_close(model(x), model.fc2(torch.where(h >= 0, h, h * model.act.weight)))


def test_a_shared_activation_survives_deepcopy_and_save():
    import io

    model = SharedAct().eval()
    train.prepare(model, X, init=0.3)
    with torch.no_grad():
        want = model(X[0])
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(other(X[0]), want)

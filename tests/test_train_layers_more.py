"""More layer kinds in `lc_onnx.train`: pointwise Conv1d/Conv3d blocks (audio, TCN, video), each found from the
recorded data flow, exact at slope 1, collapsed into one pointwise Conv of the same kind and folded by
`lc_onnx.optimize` after either exporter; and the near misses that are no sites."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

CONV = {1: nn.Conv1d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}


def inputs(nd: int, channels: int = 8, seed: int = 7) -> tuple[torch.Tensor]:
    spatial = (9,) if nd == 1 else (3, 4, 5)
    return (torch.randn(2, channels, *spatial, generator=torch.Generator().manual_seed(seed)),)


def randomize_norms(model: nn.Module) -> nn.Module:
    """Running stats and affine parameters away from the identity, so a norm folded on the wrong dim shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, (lo, hi) in ((m.running_mean, (-1, 1)), (m.running_var, (0.5, 2)), (m.weight, (0.5, 2)),
                                    (m.bias, (-1, 1))):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model


def block(nd: int, norm: str = "before", conv=None) -> nn.Sequential:
    """conv(8 -> 32) [BN] -> GELU [BN] -> conv(32 -> 8), all pointwise unless `conv` says otherwise."""
    conv = conv or (lambda cin, cout: CONV[nd](cin, cout, 1))
    mods = [conv(8, 32)] + ([NORM[nd](32)] if norm == "before" else []) + [nn.GELU()] + (
        [NORM[nd](32)] if norm == "after" else []) + [conv(32, 8)]
    return randomize_norms(nn.Sequential(*mods)).eval()


def without_activation(model: nn.Module, act: str) -> nn.Module:
    plain = copy.deepcopy(model)
    parent, _, name = act.rpartition(".")
    setattr(plain.get_submodule(parent) if parent else plain, name, nn.Identity())
    return plain


def prepared_is_exact_and_collapses(model: nn.Module, x: tuple, names: list[str]) -> nn.Module:
    """prepare(init=1) finds `names`; the prepared model is bit-equal to the original with those activations
    replaced by the identity (PReLU at slope 1 returns x itself); collapse keeps the output."""
    plain = model
    for name in names:
        plain = without_activation(plain, name)
    found = train.prepare(model, x, init=1.0)
    assert list(found) == names
    with torch.no_grad():
        want = plain(*x)
        assert torch.equal(model(*x), want)
        assert train.collapse(model) == names
        torch.testing.assert_close(model(*x), want, rtol=1e-4, atol=1e-5)
    return model


def no_site(model: nn.Module, x: tuple) -> None:
    found = train.prepare(model.eval(), x)
    assert list(found) == [] and not train.blocks(model)


def onnx_output(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# pointwise Conv1d / Conv3d


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("norm", ["before", "after", "none"])
def test_pointwise_conv_blocks_are_sites_and_collapse_into_one_conv(nd, norm):
    model = block(nd, norm)
    found = train.prepare(copy.deepcopy(model), inputs(nd))
    site = found.sites[0]
    norms = {"before": ("1",), "after": ("2",), "none": ()}[norm]
    act = "2" if norm == "before" else "1"
    assert (site.first, site.act, site.second, site.batchnorms, site.channel_dim, site.width) == (
        "0", act, str(len(model) - 1), norms, 1, 32)
    prepared_is_exact_and_collapses(model, inputs(nd), [act])
    layers = [m for m in model if not isinstance(m, nn.Identity)]
    assert len(layers) == 1 and type(layers[0]) is CONV[nd] and layers[0].kernel_size == (1,) * nd


@pytest.mark.parametrize("nd", [1, 3])
def test_per_channel_slopes_of_conv1d_and_conv3d_act_on_the_channels(nd):
    model = block(nd, "none")
    train.prepare(model, inputs(nd), per_channel=True)
    act = model[1]
    slopes = torch.linspace(0, 1, 32)
    with torch.no_grad():
        act.weight.copy_(slopes)
        h = torch.randn(2, 32, *inputs(nd)[0].shape[2:])
        torch.testing.assert_close(act(h), torch.where(h >= 0, h, h * slopes.view(32, *(1,) * nd)))


@pytest.mark.parametrize("conv", [
    lambda cin, cout: nn.Conv1d(cin, cout, 1, padding_mode="reflect"),
    lambda cin, cout: nn.Conv1d(cin, cout, 1, padding_mode="circular"),
    lambda cin, cout: nn.Conv1d(cin, cout, 1, padding="same", padding_mode="replicate"),
    lambda cin, cout: nn.Conv1d(cin, cout, 1, dilation=3, bias=False),
], ids=["reflect", "circular", "same", "dilated-nobias"])
def test_pointwise_conv1d_with_any_padding_mode_or_dilation_is_a_site(conv):
    prepared_is_exact_and_collapses(block(1, "before", conv), inputs(1), ["2"])


class TemporalBlock(nn.Module):
    """A TCN/Conformer-style feed-forward over (N, C, T): x + pw2(drop(gelu(pw1(norm(x)))))."""

    def __init__(self):
        super().__init__()
        self.norm, self.pw1, self.act = nn.BatchNorm1d(8), nn.Conv1d(8, 32, 1), nn.GELU()
        self.drop, self.pw2 = nn.Dropout(0.1), nn.Conv1d(32, 8, 1)

    def forward(self, x):
        return x + self.pw2(self.drop(self.act(self.pw1(self.norm(x)))))


def test_a_tcn_residual_block_and_a_video_stack_collapse_block_by_block():
    model = randomize_norms(nn.Sequential(TemporalBlock(), nn.ReLU(), TemporalBlock())).eval()
    prepared_is_exact_and_collapses(model, inputs(1), ["0.act", "2.act"])
    video = nn.Sequential(nn.Conv3d(8, 16, 1), nn.ReLU(), nn.Conv3d(16, 16, 1), nn.SiLU(), nn.Conv3d(16, 8, 1))
    prepared_is_exact_and_collapses(video.eval(), inputs(3), ["1", "3"])
    assert sum(isinstance(m, nn.Conv3d) for m in video) == 1


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_conv1d_and_conv3d_blocks_export_and_fold_into_one_conv(tmp_path, nd, dynamo):
    import onnx

    import lc_onnx

    model = block(nd, "after")
    x = inputs(nd)
    train.prepare(model, x, init=1.0, per_channel=True)
    with torch.no_grad():
        want = model(*x).numpy()
    train.export(model, x, tmp_path / "m.onnx", dynamo=dynamo)
    assert "PRelu" in [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    folded = lc_onnx.optimize(str(tmp_path / "m.onnx")).model
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    onnx.save(folded, tmp_path / "folded.onnx")
    np.testing.assert_allclose(onnx_output(tmp_path / "folded.onnx", x[0]), want, rtol=1e-4, atol=1e-5)


class Residual(nn.Module):
    def __init__(self, nd: int):
        super().__init__()
        self.a, self.act, self.b = CONV[nd](8, 32, 1), nn.GELU(), CONV[nd](32, 8, 1)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.b(h + h.mean(1, keepdim=True))  # a residual inside the block


class ConvThenLinear(nn.Module):
    """Conv1d then a Linear that maps the last dim (T == 32 == hidden channels): the shapes fit, the maps do not."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv1d(8, 32, 1), nn.GELU(), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)))


class Conv1dThenConv2d(nn.Module):
    """A Conv2d reading a Conv1d's (N, C, T) output as one unbatched (C', H, W) image: N is its channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv1d(8, 32, 1), nn.GELU(), nn.Conv2d(2, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class LinearNormOverTime(nn.Module):
    """BatchNorm1d(32) on a Linear's (N, T=32, C=32) output normalizes T, not the features."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.act, self.fc2 = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x))))


class UnbatchedConv(nn.Module):
    """Conv1d on an unbatched (C, T=32) input: channels on dim 0, and BatchNorm1d(32) normalizes T."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.act, self.b = nn.Conv1d(8, 32, 1), nn.BatchNorm1d(32), nn.GELU(), nn.Conv1d(32, 8, 1)

    def forward(self, x):
        return self.b(self.act(self.bn(self.a(x))))


NEAR_MISSES = {
    "kernel3": lambda: (block(1, conv=lambda i, o: nn.Conv1d(i, o, 3, padding=1)), inputs(1)),
    "stride2": lambda: (block(1, conv=lambda i, o: nn.Conv1d(i, o, 1, stride=2)), inputs(1)),
    "groups2": lambda: (block(1, conv=lambda i, o: nn.Conv1d(i, o, 1, groups=2)), inputs(1)),
    "padded": lambda: (block(1, conv=lambda i, o: nn.Conv1d(i, o, 1, padding=1, padding_mode="reflect")),
                       inputs(1)),
    "3d-kernel-1x1x3": lambda: (block(3, conv=lambda i, o: nn.Conv3d(i, o, (1, 1, 3), padding=(0, 0, 1))),
                                inputs(3)),
    "3d-stride2": lambda: (block(3, conv=lambda i, o: nn.Conv3d(i, o, 1, stride=(1, 2, 1))), inputs(3)),
    "3d-groups2": lambda: (block(3, conv=lambda i, o: nn.Conv3d(i, o, 1, groups=2)), inputs(3)),
    "residual-1d": lambda: (Residual(1), inputs(1)),
    "residual-3d": lambda: (Residual(3), inputs(3)),
    "conv1d-then-linear": lambda: (ConvThenLinear(), (torch.randn(2, 8, 32),)),
    "conv1d-then-conv2d": lambda: (Conv1dThenConv2d(), (torch.randn(2, 8, 5),)),
    "bn-over-time": lambda: (randomize_norms(LinearNormOverTime()), (torch.randn(2, 32, 16),)),
    "unbatched-conv-bn-over-time": lambda: (randomize_norms(UnbatchedConv()), (torch.randn(8, 32),)),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses_of_pointwise_conv_blocks_are_no_sites(case):
    model, x = NEAR_MISSES[case]()
    no_site(model, x)


def test_per_channel_slopes_of_a_conv_block_found_by_names_act_on_the_channels():
    model = nn.Sequential(nn.Conv1d(8, 32, 1), nn.GELU(), nn.Conv1d(32, 8, 1)).eval()
    with pytest.warns(UserWarning, match="module names"):
        found = train.prepare(model, per_channel=True)
    assert found.sites[0].channel_dim == 1 and model[1].channel_dim == 1
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(0, 1, 32))
        h = torch.randn(2, 32, 9)  # T = 9: slopes on the last dim would not even broadcast
        torch.testing.assert_close(model[1](h), torch.where(h >= 0, h, h * torch.linspace(0, 1, 32)[:, None]))


# a model's own nn.PReLU between two linear layers


def prelu_block(kind: str, slopes: int) -> nn.Sequential:
    """layer(8 -> 32) -> nn.PReLU(slopes, trained apart) -> layer(32 -> 8); Conv kinds have BatchNorm before."""
    prelu = nn.PReLU(slopes)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.2, 0.6, slopes) if slopes > 1 else torch.tensor([0.3]))
    if kind == "linear":
        return nn.Sequential(nn.Linear(8, 32), prelu, nn.Linear(32, 8)).eval()
    nd = int(kind[4])
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    return randomize_norms(nn.Sequential(conv(8, 32, 1), norm(32), prelu, conv(32, 8, 1))).eval()


def prelu_inputs(kind: str) -> tuple[torch.Tensor]:
    spatial = {"linear": (), "conv1d": (9,), "conv2d": (5, 6), "conv3d": (3, 4, 5)}[kind]
    return (torch.randn(2, 8, *spatial, generator=torch.Generator().manual_seed(9)),)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("slopes", [1, 32], ids=["scalar", "per-channel"])
def test_a_models_own_prelu_is_a_site_that_keeps_its_trained_slopes(kind, slopes):
    model = prelu_block(kind, slopes)
    x = prelu_inputs(kind)
    original = copy.deepcopy(model)
    act = "2" if kind != "linear" else "1"
    found = train.prepare(model, x)
    assert list(found) == [act] and found.unswappable == []
    prelu = model.get_submodule(act)
    assert isinstance(prelu, train.LayerCollapsePReLU) and prelu.num_parameters == slopes
    torch.testing.assert_close(prelu.weight, original.get_submodule(act).weight, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(model(*x), original(*x))  # the prepared model computes what the original did
        prelu.weight.fill_(1.0)
        want = without_activation(original, act)(*x)
        assert torch.equal(model(*x), want)
        assert train.collapse(model) == [act]
        torch.testing.assert_close(model(*x), want, rtol=1e-4, atol=1e-5)


def test_keep_slopes_false_gives_a_prelu_init_and_per_channel_spreads_one_trained_slope():
    model = prelu_block("conv2d", 1)
    train.prepare(model, prelu_inputs("conv2d"), keep_slopes=False, init=0.05)
    assert model[2].weight.tolist() == [pytest.approx(0.05)]
    model = prelu_block("conv2d", 1)
    train.prepare(model, prelu_inputs("conv2d"), per_channel=True)
    assert model[2].num_parameters == 32 and model[2].weight.tolist() == [pytest.approx(0.3)] * 32


class SharedPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.act = (nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 32),
                                                    nn.Linear(32, 8), nn.PReLU(32, init=0.2))

    def forward(self, x):
        return self.d(self.act(self.c(self.b(self.act(self.a(x))))))


def test_a_shared_prelu_gives_each_site_its_own_copy_of_the_trained_slopes():
    model = SharedPReLU().eval()
    x = prelu_inputs("linear")
    with torch.no_grad():
        want = model(*x)
    assert list(train.prepare(model, x)) == ["act.sites.0", "act.sites.1"]
    assert model.act.sites["0"].weight is not model.act.sites["1"].weight
    assert model.act.sites["0"].weight.tolist() == [pytest.approx(0.2)] * 32
    with torch.no_grad():
        assert torch.equal(model(*x), want)


class PReLUOnTime(nn.Module):
    """nn.PReLU(32) after a Linear on (N, T, C): torch takes its slopes from dim 1, T (it raises unless T == C)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.PReLU(32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_per_channel_prelu_on_a_linears_time_dim_is_reported_not_prepared():
    with pytest.raises(ValueError, match="did not run on example_inputs.*parameter numbers"):
        train.prepare(PReLUOnTime(), (torch.randn(2, 5, 16),))  # T = 5 != 32: torch itself refuses
    model = PReLUOnTime().eval()  # equal slopes (0.25): the elementwise probe alone would have passed it
    with pytest.warns(UserWarning, match=r"fc1 -> act -> fc2: the nn.PReLU's 32 slopes act on dim 1 of its "
                                         r"\(2, 32, 32\) input"):
        found = train.prepare(model, (torch.randn(2, 32, 16),))
    assert list(found) == [] and type(model.act) is nn.PReLU and len(found.unswappable) == 1
    assert list(train.prepare(PReLUOnTime().eval(), (torch.randn(4, 16),))) == ["act"]  # 2-D: dim 1 is C


def test_names_leave_a_per_channel_prelu_after_a_linear_and_take_it_after_a_conv():
    with pytest.warns(UserWarning, match="module names"):
        assert list(train.prepare(PReLUOnTime())) == []
    model = prelu_block("conv1d", 32)
    with pytest.warns(UserWarning, match="module names"):
        assert list(train.prepare(nn.Sequential(model[0], model[2], model[3]))) == ["1"]


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv3d"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_prepared_per_channel_prelu_exports_and_folds(tmp_path, kind, dynamo):
    import onnx

    import lc_onnx

    model = prelu_block(kind, 32)
    x = prelu_inputs(kind)
    train.prepare(model, x)
    with torch.no_grad():
        for prelu in train.blocks(model).values():
            prelu.weight.fill_(1.0)
        want = model(*x).numpy()
    train.export(model, x, tmp_path / "m.onnx", dynamo=dynamo)
    folded = lc_onnx.optimize(str(tmp_path / "m.onnx")).model
    assert [n.op_type for n in folded.graph.node] in (["Conv"], ["Gemm"])
    onnx.save(folded, tmp_path / "folded.onnx")
    np.testing.assert_allclose(onnx_output(tmp_path / "folded.onnx", x[0]), want, rtol=1e-4, atol=1e-5)


# hooks on a swapped activation module


class Mlp(nn.Module):
    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), act or nn.GELU(), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


X = (torch.randn(4, 8, generator=torch.Generator().manual_seed(11)),)


def test_hooks_on_a_swapped_activation_are_not_carried_over_and_one_warning_names_them():
    model = Mlp().eval()
    seen = []
    model.act.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model.act.register_forward_pre_hook(lambda m, args: None)
    with pytest.warns(UserWarning, match=r"prepare: act \(GELU\) has 2 forward/backward hook\(s\)") as caught:
        prepared_is_exact_and_collapses(model, X, ["act"])
    assert sum("hook" in str(w.message) for w in caught) == 1 and caught[0].filename == __file__
    seen.clear()
    model(*X)
    assert seen == []  # the observer is gone with the GELU; the block is one Linear


def test_a_hook_that_changes_the_output_is_dropped_so_the_collapse_folds_what_the_prepared_model_computes():
    # the site was proven with the hook (a clamp after the GELU is still elementwise); carrying the clamp onto
    # the PReLU would make the block non-linear at slope 1 and the collapse wrong, so it goes, with a warning
    model = Mlp().eval()
    model.act.register_forward_hook(lambda m, args, out: out.clamp(max=0.1))
    with pytest.warns(UserWarning, match="1 forward/backward hook"):
        found = train.prepare(model, X, init=1.0)
    assert list(found) == ["act"] and not model.act._forward_hooks
    with torch.no_grad():
        want = model.fc2(model.fc1(X[0]))
        assert torch.equal(model(*X), want)
        train.collapse(model)
        torch.testing.assert_close(model(*X), want, rtol=1e-4, atol=1e-5)


class SharedHooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.act = (nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 32),
                                                    nn.Linear(32, 8), nn.GELU())

    def forward(self, x):
        return self.d(self.act(self.c(self.b(self.act(self.a(x))))))


def test_a_hooked_activation_shared_by_two_sites_warns_once_and_no_hooks_warn_nothing():
    model = SharedHooked().eval()
    model.act.register_forward_hook(lambda m, args, out: None)
    with pytest.warns(UserWarning, match=r"act \(GELU\) has 1 .*at its sites the PReLUs") as caught:
        assert list(train.prepare(model, X)) == ["act.sites.0", "act.sites.1"]
    assert sum("hook" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train.prepare(model, X)  # prepared before: nothing new to say
        train.prepare(Mlp().eval(), X)  # no hooks

"""Property test of the training side: over random torch models built from MLP blocks and their near misses,
`prepare` finds exactly the blocks whose structure is `layer -> act -> layer` alone, and `collapse` never changes
what the prepared model computes. A site found where the data flow does not prove it shows up as a changed output
(or a wrong site count)."""

from __future__ import annotations

import copy
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

EXAMPLES = int(os.environ.get("LC_FUZZ_EXAMPLES", 40))


class Elementwise(nn.Module):
    """An activation class no list names: x·σ(1.702x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "custom": Elementwise}
SITES = ("mlp", "dropout", "batchnorm", "residual")  # blocks that are sites
MISSES = ("norm_between", "hidden_reused", "gate", "fan_out", "scaled", "layer_reused", "listed")  # are not


class Block(nn.Module):
    """One block of `kind` on features of width d (hidden h); `act` its activation module (may be shared)."""

    def __init__(self, kind: str, d: int, h: int, act: nn.Module | None):
        super().__init__()
        self.kind = kind
        if act is not None:  # else the model's shared one, passed to forward
            self.act = act
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        if kind == "dropout":
            self.drop = nn.Dropout(0.3)
        if kind == "batchnorm":
            self.bn = nn.BatchNorm1d(h)
            with torch.no_grad():  # running stats that are not the identity
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.uniform_(-0.5, 0.5)
        if kind == "norm_between":
            self.norm = nn.LayerNorm(h)
        if kind == "listed":  # the forward calls the layers through a plain list, not their registered names
            self.steps = [self.fc1, self.fc2]
        if kind in ("gate", "fan_out"):
            self.fc3 = nn.Linear(d if kind == "gate" else h, h if kind == "gate" else d)

    def forward(self, x, act: nn.Module | None = None):
        act, k = act or self.act, self.kind
        if k == "mlp":
            return self.fc2(act(self.fc1(x)))
        if k == "dropout":
            return self.fc2(self.drop(act(self.fc1(x))))
        if k == "batchnorm":  # 2-D input: BatchNorm1d over the features
            return self.fc2(act(self.bn(self.fc1(x))))
        if k == "residual":
            return x + self.fc2(act(self.fc1(x)))
        if k == "norm_between":
            return self.fc2(self.norm(act(self.fc1(x))))
        if k == "hidden_reused":
            h = act(self.fc1(x))
            return self.fc2(h) + h.mean(-1, keepdim=True)
        if k == "gate":
            return self.fc2(act(self.fc1(x)) * self.fc3(x))
        if k == "fan_out":
            h = act(self.fc1(x))
            return self.fc2(h) + self.fc3(h)
        if k == "scaled":
            return self.fc2(act(self.fc1(x)) * 2.0)
        if k == "listed":
            return self.steps[1](act(self.steps[0](x)))
        if k == "layer_reused":  # fc1 also runs on another tensor: its weights are not the block's alone
            return self.fc2(act(self.fc1(x))) + self.fc2(self.fc1(x).flip(-1))
        raise AssertionError(k)


class Model(nn.Module):
    """Blocks in a row; with `shared`, one activation module (registered once, here) that every block calls."""

    def __init__(self, blocks: list[Block], shared: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if shared is not None:
            self.shared_act = shared

    def forward(self, x):
        act = getattr(self, "shared_act", None)
        for block in self.blocks:
            x = block(x, act)
        return x


@st.composite
def models(draw):
    rank = draw(st.sampled_from([2, 3]))
    d = draw(st.integers(2, 6))
    kinds = draw(st.lists(st.sampled_from(SITES + MISSES), min_size=1, max_size=4))
    if rank == 3:  # BatchNorm1d would normalize the wrong axis of (B, T, d)
        kinds = [k if k != "batchnorm" else "mlp" for k in kinds]
    shared = draw(st.booleans())
    act_name = draw(st.sampled_from(sorted(ACTS)))
    one = ACTS[act_name]()
    torch.manual_seed(draw(st.integers(0, 2**16)))
    blocks = [Block(k, d, draw(st.integers(2, 8)), None if shared else ACTS[act_name]()) for k in kinds]
    model = Model(blocks, one if shared else None).eval()
    x = torch.randn(3, d) if rank == 2 else torch.randn(2, 3, d)
    per_channel = draw(st.booleans())
    return model, x, kinds, per_channel, draw(st.booleans())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_prepare_finds_exactly_the_blocks_and_collapse_keeps_the_output(case):
    model, x, kinds, per_channel, train_mode = case
    before = prepared_then_collapsed(model, x, per_channel, sum(k in SITES for k in kinds), train_mode)
    with torch.no_grad():
        torch.testing.assert_close(at_identity(model, x), before, rtol=1e-5, atol=1e-6)


def prepared_then_collapsed(model: nn.Module, x, per_channel: bool, sites: int, train_mode: bool):
    """Prepare a copy of `model` (slope 1; in train mode if so drawn: prepare must leave its state alone), check it
    has `sites` blocks and that collapsing them keeps its output; that output (the prepared model's)."""
    prepared = copy.deepcopy(model).train(train_mode)
    names = train.prepare(prepared, (x,), init=1.0, per_channel=per_channel)
    prepared.eval()
    assert len(names) == sites, list(names)
    with torch.no_grad():
        before = prepared(x)
        assert sorted(train.collapse(prepared, threshold=0.05)) == sorted(names)
        torch.testing.assert_close(prepared(x), before, rtol=1e-4, atol=1e-5)
    return before


def at_identity(model: Model, x):
    """The model with the activation of every site block replaced by the identity."""
    out = x
    for block in model.blocks:
        act = getattr(model, "shared_act", None) or block.act
        out = block(out, nn.Identity() if block.kind in SITES else act)
    return out


CONV_SITES = ("conv", "conv_bn", "conv_residual")
CONV_MISSES = ("conv_3x3", "conv_groups", "conv_norm_between", "conv_fan_out")


class ConvBlock(nn.Module):
    """A block of pointwise convolutions on (B, C, H, W) features, or a near miss of one."""

    def __init__(self, kind: str, c: int, h: int, act: nn.Module):
        super().__init__()
        self.kind, self.act = kind, act
        first = dict(kernel_size=3, padding=1) if kind == "conv_3x3" else dict(kernel_size=1)
        groups = 2 if kind == "conv_groups" else 1
        self.fc1 = nn.Conv2d(c, h, groups=groups, **first)
        self.fc2 = nn.Conv2d(h, c, 1, groups=groups)
        if kind == "conv_bn":
            self.bn = nn.BatchNorm2d(h)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)
        if kind == "conv_norm_between":
            self.norm = nn.GroupNorm(1, h)
        if kind == "conv_fan_out":
            self.fc3 = nn.Conv2d(h, c, 1)

    def forward(self, x):
        k, act = self.kind, self.act
        if k == "conv_bn":
            return self.fc2(act(self.bn(self.fc1(x))))
        if k == "conv_residual":
            return x + self.fc2(act(self.fc1(x)))
        if k == "conv_norm_between":
            return self.fc2(self.norm(act(self.fc1(x))))
        if k == "conv_fan_out":
            h = act(self.fc1(x))
            return self.fc2(h) - self.fc3(h)
        return self.fc2(act(self.fc1(x)))  # conv, conv_3x3, conv_groups


@st.composite
def conv_models(draw):
    c = 2 * draw(st.integers(1, 3))  # even: groups=2 divides it
    kinds = draw(st.lists(st.sampled_from(CONV_SITES + CONV_MISSES), min_size=1, max_size=3))
    act_name = draw(st.sampled_from(sorted(ACTS)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    blocks = [ConvBlock(k, c, 2 * draw(st.integers(1, 4)), ACTS[act_name]()) for k in kinds]
    model = nn.Sequential(*blocks)
    if draw(st.booleans()):  # SyncBatchNorm in place of each BatchNorm2d: in eval it computes the same
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.eval(), torch.randn(2, c, 3, 3), kinds, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_models())
def test_pointwise_conv_blocks_are_found_exactly_and_collapse_keeps_the_output(case):
    model, x, kinds, per_channel, train_mode = case
    before = prepared_then_collapsed(model, x, per_channel, sum(k in CONV_SITES for k in kinds), train_mode)
    with torch.no_grad():  # at slope 1 the prepared model is the original with the sites' activations as identity
        for block in model:
            if block.kind in CONV_SITES:
                block.act = nn.Identity()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)

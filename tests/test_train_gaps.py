"""Gaps in the training side, closed: hooks that `collapse` would drop, SyncBatchNorm sites, an nn.LeakyReLU's own
slope, and BatchNorm2d/3d blocks found by names."""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


class Mlp(nn.Module):
    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), act or nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def run(model: nn.Module, inputs=X) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# 1. hooks registered after prepare: collapse would replace the hooked modules and drop the hooks


def doubled(module, args, out):
    return out * 2


class OffloadHook:
    """A callable object, as a library registers it (DeepSpeed ZeRO-3 hooks every module while training)."""

    def __call__(self, module, args):
        return None


class Recorder:
    def observe(self, module, args, out):
        return None


def prepared_at_slope_1(model: nn.Module, inputs=X) -> nn.Module:
    assert list(train.prepare(model.eval(), inputs, init=1.0))
    return model


def refused(model: nn.Module, match: str, inputs=X, **kwargs) -> None:
    """collapse raises one line matching `match` and leaves the model as it was."""
    before, blocks = run(model, inputs), dict(train.blocks(model))
    with pytest.raises(RuntimeError, match=match) as caught:
        train.collapse(model, **kwargs)
    assert "\n" not in str(caught.value)
    assert train.blocks(model) == blocks and torch.equal(run(model, inputs), before)


@pytest.mark.parametrize("where", ["fc1", "act", "fc2"])
def test_a_forward_hook_added_after_prepare_is_refused_with_its_name(where):
    model = prepared_at_slope_1(Mlp())
    handle = model.get_submodule(where).register_forward_hook(doubled)
    refused(model, rf"collapse: act: {where} carries forward hook test_train_gaps\.doubled, which .*remove them "
                   r"\(handle\.remove\(\)\) before collapse, or leave the block out with only=")
    handle.remove()
    before = run(model)
    assert train.collapse(model) == ["act"]
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


def test_pre_hooks_backward_hooks_objects_partials_and_bound_methods_are_named():
    cases = [
        (lambda m: m.fc1.register_forward_pre_hook(OffloadHook()), r"forward pre-hook test_train_gaps\.OffloadHook"),
        (lambda m: m.fc2.register_forward_hook(Recorder().observe), r"forward hook test_train_gaps\.Recorder\.observe"),
        (lambda m: m.fc2.register_forward_hook(functools.partial(doubled)), r"forward hook test_train_gaps\.doubled"),
        (lambda m: m.fc1.register_full_backward_hook(lambda *a: None), r"backward hook test_train_gaps\..*<lambda>"),
        (lambda m: m.fc1.register_full_backward_pre_hook(lambda *a: None), r"backward pre-hook test_train_gaps"),
    ]
    for register, match in cases:
        model = prepared_at_slope_1(Mlp())
        register(model)
        refused(model, match)


def test_a_forward_replaced_on_the_instance_is_refused():
    model = prepared_at_slope_1(Mlp())
    model.fc2.forward = functools.partial(nn.Linear.forward, model.fc2)
    refused(model, r"fc2 carries forward replaced on the instance by torch\.nn\.modules\.linear\.Linear\.forward")


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.one, self.two = Mlp(), Mlp()

    def forward(self, x):
        return self.two(self.one(x))


def test_a_hooked_block_stops_every_fusion_and_only_leaves_it_out():
    model = prepared_at_slope_1(TwoBlocks())
    model.two.fc1.register_forward_pre_hook(OffloadHook())
    refused(model, r"collapse: two\.act: two\.fc1 carries forward pre-hook")
    before = run(model)
    assert train.collapse(model, only="one.act") == ["one.act"]
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


def test_a_hook_on_a_batchnorm_of_the_block_or_on_a_shared_activation_is_refused():
    bn = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 16))
    bn[1].running_mean.uniform_(-1, 1)
    prepared_at_slope_1(bn)
    bn[1].register_forward_hook(doubled)
    refused(bn, r"collapse: 2: 1 carries forward hook")
    shared = prepared_at_slope_1(Chain())
    shared.act.register_forward_hook(doubled)
    refused(shared, r"collapse: act\.sites\.0: act carries forward hook")


class Chain(nn.Module):
    """One GELU in two blocks in a row: b is the second layer of the first block and the first of the next."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.GELU()

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


def test_the_library_s_own_site_tags_pass_and_move_to_the_fused_layer():
    # b's tag tells the shared activation that its output is the second block's: dropped with b, the second
    # block's PReLU would no longer run (the GELU would), and the model would change
    model = prepared_at_slope_1(Chain())
    with torch.no_grad():
        model.act.sites["1"].weight.fill_(0.5)
    before = run(model)
    assert train.collapse(model) == ["act.sites.0"]
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.act.sites["1"].weight.fill_(1.0)
    before = run(model)
    assert train.collapse(copy.deepcopy(model)) == ["act.sites.1"]
    assert train.collapse(model) == ["act.sites.1"]
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)


# 2. nn.SyncBatchNorm: in eval, with running stats, it computes what BatchNorm does (F.batch_norm, no sync)


def with_stats(model: nn.Module) -> nn.Module:
    """Running stats and affine parameters away from the identity, so a fold that skipped the norm would show."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def synced(model: nn.Module) -> nn.Module:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(with_stats(model)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    return model


SYNCED = {
    "linear": (lambda: nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 16)),
               (torch.randn(4, 16),)),
    "linear_bn_after_act": (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.BatchNorm1d(32),
                                                  nn.Linear(32, 16)), (torch.randn(4, 16),)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 3, 1)),
               (torch.randn(2, 3, 5, 5),)),
    "conv1d_both_sides": (lambda: nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8),
                                                nn.Conv1d(8, 3, 1)), (torch.randn(2, 3, 7),)),
}


@pytest.mark.parametrize("case", list(SYNCED))
def test_a_sync_batchnorm_block_is_found_and_collapses_to_the_same_output(case):
    make, inputs = SYNCED[case]
    model = synced(make())
    with torch.no_grad():
        original = model(*inputs)
    found = train.prepare(model, inputs, init=1.0)
    act = next(str(i) for i, m in enumerate(make()) if isinstance(m, (nn.GELU, nn.ReLU)))
    assert list(found) == [act] and found.sites[0].batchnorms
    with torch.no_grad():
        prepared = model(*inputs)
        assert train.collapse(model) == [act]
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        torch.testing.assert_close(model(*inputs), prepared, rtol=1e-4, atol=1e-5)
    assert original.shape == prepared.shape


def test_a_sync_batchnorm_over_positions_or_without_running_stats_is_no_site():
    over_t = synced(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(5), nn.GELU(), nn.Linear(32, 16)))
    assert list(train.prepare(over_t, (torch.randn(2, 5, 16),))) == []  # (N, T, C): it normalizes T
    batch_stats = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.GELU(),
                      nn.Linear(32, 16))).eval()
    assert list(train.prepare(batch_stats, X)) == []


def test_a_sync_batchnorm_in_training_mode_is_refused_by_collapse():
    model = synced(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 16)))
    assert list(train.prepare(model, X, init=1.0)) == ["2"]
    model.train()
    with pytest.raises(RuntimeError, match=r"put the model in eval\(\) before collapse"):
        train.collapse(model)


# 3. an nn.LeakyReLU is a PReLU with one fixed slope: it keeps it, as an nn.PReLU keeps its own


def slope_values(model: nn.Module) -> set[float]:
    return {round(float(v), 6) for m in train.blocks(model).values() for v in m.weight.detach()}


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_leaky_relu_keeps_its_negative_slope_and_the_prepared_model_computes_what_it_did(per_channel):
    model = Mlp(nn.LeakyReLU(0.2)).eval()
    want = run(model)
    assert list(train.prepare(model, X, per_channel=per_channel)) == ["act"]
    assert slope_values(model) == {0.2} and model.act.weight.numel() == (32 if per_channel else 1)
    torch.testing.assert_close(run(model), want, rtol=0, atol=0)


def test_keep_slopes_false_gives_a_leaky_relu_init():
    model = Mlp(nn.LeakyReLU(0.2, inplace=True)).eval()
    train.prepare(model, X, keep_slopes=False)
    assert slope_values(model) == {0.01}
    model = Mlp(nn.LeakyReLU(0.2)).eval()
    train.prepare(model, X, init=0.5, keep_slopes=False)
    assert slope_values(model) == {0.5}


class SharedLeaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.one, self.two, self.act = Mlp(), Mlp(), nn.LeakyReLU(0.3)

    def forward(self, x):
        return self.two.fc2(self.act(self.two.fc1(self.one.fc2(self.act(self.one.fc1(x))))))


def test_a_shared_or_name_found_leaky_relu_keeps_its_slope_too():
    model = SharedLeaky().eval()
    want = run(model)
    assert list(train.prepare(model, X)) == ["act.sites.0", "act.sites.1"]
    assert slope_values(model) == {0.3}
    torch.testing.assert_close(run(model), want, rtol=0, atol=0)
    by_names = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.3), nn.Linear(32, 16))
    with pytest.warns(UserWarning, match="module names"):
        assert list(train.prepare(by_names)) == ["1"]
    assert slope_values(by_names) == {0.3}


class OwnLeaky(nn.LeakyReLU):
    def forward(self, x):
        return super().forward(x) * 0.5  # elementwise, yet no PReLU with its negative_slope


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, lambda: OwnLeaky(0.2)],
                         ids=["gelu", "relu", "silu", "tanh", "leaky_subclass"])
def test_other_activations_get_init_whatever_keep_slopes_says(act):
    for keep in (True, False):
        model = Mlp(act()).eval()
        assert list(train.prepare(model, X, init=0.25, keep_slopes=keep)) == ["act"]
        assert slope_values(model) == {0.25}


# 4. names alone: BatchNorm2d/3d after the matching pointwise conv, Conv1d/Conv3d blocks


def pointwise(dims: int, norm_after_act: bool = False, sync: bool = False) -> tuple[nn.Module, tuple]:
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    mods = [conv(3, 8, 1), nn.GELU(), nn.Dropout(0.1), bn(8), conv(8, 3, 1)]
    if not norm_after_act:
        mods[1], mods[3] = mods[3], mods[1]  # conv, bn, dropout, act, conv
    model = with_stats(nn.Sequential(*mods)).eval()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval() if sync else model
    return model, (torch.randn(2, 3, *[3] * dims),)


NAMED = {"conv1d": (1,), "conv2d": (2,), "conv3d": (3,), "conv2d_bn_after_act": (2, True),
         "conv3d_sync": (3, False, True), "conv1d_sync_after_act": (1, True, True)}


def by_names(model: nn.Module) -> train.Prepared:
    with pytest.warns(UserWarning, match="module names"):
        found = train.prepare(model, init=1.0)
    assert not found.verified and all(not m.verified for m in train.blocks(model).values())
    return found


@pytest.mark.parametrize("case", list(NAMED))
def test_a_pointwise_conv_block_with_its_batchnorm_is_found_by_names_refused_then_verified(case):
    model, inputs = pointwise(*NAMED[case])
    act = next(n for n, m in model.named_children() if isinstance(m, nn.GELU))
    found = by_names(model)
    assert list(found) == [act] and found.sites[0].batchnorms == (("1",) if act == "3" else ("3",))
    assert found.sites[0].feeder == ("1" if act == "3" else "0")
    refused(model, r"collapse: .*prepared by module names \(no example inputs\)", inputs)
    prepared = run(model, inputs)
    assert train.collapse(model, example_inputs=inputs) == [act]
    assert [type(m) for m in model.modules() if not isinstance(m, (nn.Identity, nn.Dropout, nn.Sequential))] == [
        type(model[4])]
    torch.testing.assert_close(run(model, inputs), prepared, rtol=1e-5, atol=1e-5)


def test_prepare_with_inputs_verifies_a_name_found_conv_block_with_its_batchnorm():
    model, inputs = pointwise(2)
    assert list(by_names(model)) == ["3"]
    assert list(train.prepare(model, inputs)) == ["3"] and model[3].verified
    with torch.no_grad():
        model[3].weight.fill_(1.0)
    assert train.collapse(model) == ["3"]


@pytest.mark.parametrize("mods", [
    lambda: [nn.Linear(3, 8), nn.BatchNorm2d(8), nn.GELU(), nn.Linear(8, 3)],  # BatchNorm2d after a Linear
    lambda: [nn.Conv2d(3, 8, 1), nn.BatchNorm1d(8), nn.GELU(), nn.Conv2d(8, 3, 1)],  # BatchNorm1d after a Conv2d
    lambda: [nn.Conv3d(3, 8, 1), nn.BatchNorm2d(8), nn.GELU(), nn.Conv3d(8, 3, 1)],
    lambda: [nn.Conv2d(3, 8, 1), nn.GELU(), nn.Conv1d(8, 3, 1)],  # layers of two kinds never fuse
    lambda: [nn.Conv2d(3, 8, 1), nn.GELU(), nn.Linear(8, 3)],
    lambda: [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 3, 1)],  # not pointwise
], ids=["bn2d_after_linear", "bn1d_after_conv2d", "bn2d_after_conv3d", "conv2d_conv1d", "conv2d_linear", "conv3x3"])
def test_names_find_no_block_whose_norm_or_second_layer_does_not_fit(mods):
    with pytest.warns(UserWarning, match="module names"):
        assert list(train.prepare(nn.Sequential(*mods()))) == []


def test_an_accelerate_hook_is_named_and_refused():
    """accelerate's device-map and offload hooks replace the module's forward on the instance (README)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    train.prepare(model, (torch.randn(2, 4),), init=1.0)
    hooks.add_hook_to_module(model[0], hooks.ModelHook())
    with pytest.raises(RuntimeError, match=r"forward replaced on the instance by accelerate\.hooks"):
        train.collapse(model)
    assert isinstance(model[0], nn.Linear) and train.blocks(model)


@pytest.mark.parametrize("layer", ["linear_subclass", "hf_conv1d"])
def test_chained_blocks_collapse_one_call_at_a_time(layer):
    """The fused layer is an nn.Linear in the place of the next block's first layer (an HF Conv1D or a Linear
    subclass): a later collapse of that block took it for a module changed since prepare()."""
    if layer == "hf_conv1d":
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

        def make(i, o):
            return conv1d(o, i)
    else:
        class Sub(nn.Linear):
            pass

        def make(i, o):
            return Sub(i, o)
    torch.manual_seed(0)
    model = nn.Sequential(make(4, 8), nn.GELU(), make(8, 6), nn.GELU(), make(6, 4)).eval()
    x = torch.randn(3, 4)
    names = train.prepare(model, (x,), init=1.0)
    with torch.no_grad():
        want = model(x)
        assert [train.collapse(model, only=n) for n in names] == [["1"], ["3"]]
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    assert not train.blocks(model)


def test_a_first_layer_replaced_by_one_of_another_width_is_still_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    train.prepare(model, (torch.randn(2, 4),), init=1.0)
    model[0] = nn.Linear(4, 9)
    with pytest.raises(RuntimeError, match="changed since prepare"):
        train.collapse(model)


def test_a_shared_activation_also_run_on_the_block_input_keeps_that_call_after_collapse():
    """After collapse the block's feeder is an identity; its site tag named the block's input tensor itself, so the
    activation's other call on that same tensor took the site's identity instead of the activation."""

    class SideCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

        def forward(self, x):
            hidden = self.fc1(x)
            side = self.act(x)  # not a site: the block's input
            return self.fc2(self.act(hidden)) + side

    torch.manual_seed(0)
    model, x = SideCall().eval(), torch.randn(3, 4)
    assert list(train.prepare(model, (x,), init=1.0)) == ["act.sites.0"]
    with torch.no_grad():
        before = model(x)
        assert train.collapse(model) == ["act.sites.0"]
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_a_hook_on_a_dropout_between_the_layers_is_refused():
    """A Dropout hands the hidden tensor on unchanged, so the recorded data flow does not see it; a hook put on it
    after prepare would run on the block's input once the block is fused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 4)).eval()
    assert list(train.prepare(model, (torch.randn(3, 4),), init=1.0)) == ["1"]
    assert model[1].layout.passing == ("2",)
    handle = model[2].register_forward_hook(lambda m, i, o: o.clamp(max=0.05))
    with pytest.raises(RuntimeError, match=r"1: 2 carries forward hook"):
        train.collapse(model)
    handle.remove()
    assert train.collapse(model) == ["1"]


def test_a_legacy_weight_norm_is_refused_with_the_function_that_takes_it_off():
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 8)), nn.GELU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 4)
    train.prepare(model, (x,), init=1.0)
    with pytest.raises(RuntimeError, match=r"take it off with torch\.nn\.utils\.remove_weight_norm"):
        train.collapse(model)
    nn.utils.remove_weight_norm(model[0])
    with torch.no_grad():
        before = model(x)
        assert train.collapse(model) == ["1"]
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_prepare_leaves_a_model_in_train_mode_as_it_was():
    """The second pass (reach) hands each call to the module itself; a BatchNorm there ran in train mode and
    updated its running stats (and a batch of one failed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.Conv2d(8, 3, 1))
    x = torch.randn(1, 3, 4, 4)
    stats = copy.deepcopy(model[1].state_dict())
    assert list(train.prepare(model, (x,))) == ["2"] and model.training
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, stats[key]), key


def test_a_layer_of_the_same_width_but_another_forward_swapped_in_after_prepare_is_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    train.prepare(model, (torch.randn(2, 4),), init=1.0)
    model[2] = Scaled(8, 4)
    with pytest.raises(RuntimeError, match="is now Scaled, not the Linear"):
        train.collapse(model)


def test_prepare_again_after_a_partial_collapse_takes_no_identity_for_an_activation():
    """A shared activation's collapsed block leaves an AliasIdentity (an op: a view); prepare again took it for an
    activation between two Linears and put a PReLU there, dropping its site tag."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 8),
                                                      nn.Linear(8, 4))
            self.act = nn.GELU()

        def forward(self, x):
            return self.fc4(self.act(self.fc3(self.fc2(self.act(self.fc1(x))))))

    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(3, 4)
    assert sorted(train.prepare(model, (x,), init=1.0)) == ["act.sites.0", "act.sites.1"]
    with torch.no_grad():
        want = model(x)
        assert train.collapse(model, only="act.sites.1") == ["act.sites.1"]
        assert list(train.prepare(model, (x,), init=1.0)) == ["act.sites.0"]
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_a_dropout_held_outside_the_block_does_not_move_its_root():
    """The block may be collapsed on its own module after prepare (re-rooted); a Dropout the model holds at its
    root and calls inside the block moved the layout's root up."""

    class Block(nn.Module):
        def __init__(self, drop):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)
            object.__setattr__(self, "drop", drop)  # the model's, not registered here

        def forward(self, x):
            return self.fc2(self.drop(self.act(self.fc1(x))))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)
            self.blocks = nn.ModuleList([Block(self.drop)])

        def forward(self, x):
            return self.blocks[0](x)

    model = Outer().eval()
    assert list(train.prepare(model, (torch.randn(2, 4),), init=1.0)) == ["blocks.0.act"]
    assert train.collapse(model.blocks[0]) == ["act"]


def test_a_hook_on_a_dropout_between_name_found_layers_is_refused_even_when_trusting_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 4)).eval()
    with pytest.warns(UserWarning, match="finds sites by module names"):
        train.prepare(model, init=1.0)
    model[2].register_forward_hook(lambda m, i, o: o.clamp(max=0.05))
    with pytest.raises(RuntimeError, match="1: 2 carries forward hook"):
        train.collapse(model, trust_names=True)


def test_a_dropout_between_the_layers_deleted_since_prepare_is_the_changed_model_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.drop, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(self.drop(self.act(self.fc1(x))))

    model = Block().eval()
    train.prepare(model, (torch.randn(2, 4),), init=1.0)
    del model.drop
    with pytest.raises(RuntimeError, match="drop, a module of this block, is gone"):
        train.collapse(model)

"""`reach.unreached`: the forward reaches a module through its registered name, or holds it elsewhere too."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx.train import reach  # noqa: E402

X = torch.randn(3, 4)


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Listed(Named):
    """The forward calls the modules through a plain list, which the module tree does not know."""

    def __init__(self, listed: tuple[str, ...]):
        super().__init__()
        self.steps = [getattr(self, n) if n in listed else n for n in ("fc1", "act", "fc2")]

    def forward(self, x):
        for step in self.steps:
            x = (getattr(self, step) if isinstance(step, str) else step)(x)
        return x


class Partial(Named):
    def __init__(self):
        super().__init__()
        self.call_act = functools.partial(self.act.forward)

    def forward(self, x):
        return self.fc2(self.call_act(self.fc1(x)))


def test_modules_called_by_name_are_reached_and_the_model_is_left_as_it_was():
    model = Named()
    before = dict(model.named_modules())
    assert reach.unreached(model, (X,), ["fc1", "act", "fc2"]) == set()
    assert dict(model.named_modules()) == before  # the same objects back under their names
    assert type(model.fc1) is nn.Linear


@pytest.mark.parametrize("listed", [("act",), ("fc1",), ("fc1", "act", "fc2")])
def test_modules_the_forward_holds_elsewhere_are_not_reached(listed):
    assert reach.unreached(Listed(listed), (X,), ["fc1", "act", "fc2"]) == set(listed)


def test_a_bound_forward_held_in_a_partial_is_not_reached():
    assert reach.unreached(Partial(), (X,), ["fc1", "act", "fc2"]) == {"act"}


def test_the_stand_in_runs_the_module_itself_with_its_hooks_type_and_attributes(monkeypatch):
    """The pass with stand-ins computes what the model does (hooks included), and the forward sees the module's
    class and parameters through them."""
    model = Named()
    model.fc1.register_forward_hook(lambda m, i, o: o * 2)
    want = model(X)
    seen = {}

    def run(m, inputs):
        seen["types"] = (isinstance(m.act, nn.GELU), m.fc1.weight is weight, m.fc2.in_features)
        seen["out"] = m(*inputs)
        return seen["out"]

    weight = model.fc1.weight
    monkeypatch.setattr(reach, "run", run)
    assert reach.unreached(model, (X,), ["fc1", "act", "fc2"]) == set()
    assert seen["types"] == (True, True, 8) and torch.equal(seen["out"], want)


class Slotted(nn.Linear):
    __slots__ = ("scale",)

    def __init__(self, *args):
        super().__init__(*args)
        self.scale = 1.0

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_module_called_by_name_with_a_hooked_forward_or_slots_is_reached():
    """accelerate's hooks replace `forward` on the instance (device maps put them there before prepare); a class
    with __slots__ keeps values outside __dict__."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = Named()
    hooks.add_hook_to_module(model.act, hooks.ModelHook())
    model.fc2 = Slotted(8, 4)
    assert reach.unreached(model, (X,), ["fc1", "act", "fc2"]) == set()


class HalfListed(Named):
    """The activation once by name and once through a list; or the block twice, the second time with fc1 from a
    list: a swap by name takes for some calls only."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.fc3, self.fc4 = how, nn.Linear(4, 8), nn.Linear(8, 4)
        self.held = [self.act] if how == "act" else [self.fc1]

    def forward(self, x):
        x = self.fc2(self.act(self.fc1(x)))
        if self.how == "act":
            return self.fc4(self.held[0](self.fc3(x)))
        return self.fc2(self.act(self.held[0](x)))


@pytest.mark.parametrize("how", ["act", "fc1"])
def test_a_module_called_by_name_once_and_through_a_list_once_is_not_reached(how):
    assert reach.unreached(HalfListed(how), (X,), ["fc1", "act", "fc2"]) == {how}


@pytest.mark.parametrize("how", ["act", "fc1"])
def test_prepare_leaves_blocks_reached_by_name_for_some_calls_only(how):
    from lc_onnx import train

    torch.manual_seed(0)
    model = HalfListed(how).eval()
    want = model(X)
    with pytest.warns(UserWarning, match="through its registered name"):
        prepared = train.prepare(model, (X,), init=1.0)
    train.collapse(model)
    assert how not in " ".join(prepared) and torch.allclose(model(X), want, atol=1e-6)


def test_modes_and_fastpath_are_restored_after_an_error():
    class Broken(Named):
        def forward(self, x):
            raise RuntimeError("no")

    model = Broken().train()
    with pytest.raises(ValueError, match=r"not a second time.*\(RuntimeError: no\)"):
        reach.unreached(model, (X,), ["act"])
    assert model.training and type(model.act) is nn.GELU


@pytest.mark.parametrize("listed", [("act",), ("fc1",), ("fc2",), ("fc1", "act", "fc2")])
def test_prepare_leaves_a_block_the_forward_holds_elsewhere_and_says_why(listed):
    """A swap by name does not take where the forward calls the module through a list: the PReLU would never run
    (the slopes train for nothing), or collapse would replace only part of the block (a wrong model)."""
    from lc_onnx import train

    torch.manual_seed(0)
    model = Listed(listed).eval()
    want = model(X)
    with pytest.warns(UserWarning, match=r"does not call .*through its registered name"):
        prepared = train.prepare(model, (X,), init=1.0)
    assert list(prepared) == [] and len(prepared.unswappable) == 1
    assert type(model.act) is nn.GELU and torch.equal(model(X), want)
    assert train.collapse(model) == [] and torch.equal(model(X), want)


def test_prepare_still_takes_the_block_reached_by_name():
    from lc_onnx import train

    model = Named().eval()
    assert list(train.prepare(model, (X,), init=1.0)) == ["act"]

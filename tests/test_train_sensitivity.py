"""sensitivity: each block linearized alone, then cumulatively from the least harmful, on the user's metric; and
collapse's greedy budget: blocks within the threshold fold while the metric stays within max_drop."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

X = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))


class Block(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)
        with torch.no_grad():  # GELU is near linear for small inputs, far from it for large ones
            self.fc1.weight.mul_(scale)
            self.fc1.bias.mul_(scale)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def model(scales=(3.0, 0.01, 1.0)) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(s) for s in scales]).eval()


def closeness(reference: torch.Tensor):
    """A metric, higher is better: minus the mean squared distance to the original model's output."""
    def eval_fn(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(X) - reference).square().mean())
    return eval_fn


def test_sensitivity_of_a_model_not_prepared_orders_blocks_by_harm_and_leaves_it_as_it_was():
    m = model()
    with torch.no_grad():
        before = m(X)
    result = train.sensitivity(m, closeness(before), (X[:4],))
    assert result.baseline == 0.0
    assert result.order == ["1.act", "2.act", "0.act"]  # the block of tiny inputs hurts least, the large one most
    assert result.drop(result.alone["1.act"]) < 1e-4 < 0.1 < result.drop(result.alone["0.act"])
    drops = [result.drop(v) for v in result.cumulative]
    assert drops == sorted(drops) and drops[-1] > 0
    assert "1.act" in result.table().splitlines()[2]
    assert not train.blocks(m) and all(isinstance(b.act, nn.GELU) for b in m)
    with torch.no_grad():
        torch.testing.assert_close(m(X), before, rtol=0, atol=0)


def test_sensitivity_of_a_prepared_model_puts_its_slopes_back(tmp_path):
    m = model()
    with torch.no_grad():
        before = m(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.prepare(m, (X[:4],), init=0.5)
    slopes = train.slopes(m)
    result = train.sensitivity(m, closeness(before))
    assert set(result.order) == set(slopes) and train.slopes(m) == slopes
    pytest.importorskip("matplotlib")
    result.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_collapse_with_a_budget_folds_the_harmless_block_and_leaves_the_costly_one_saying_why():
    m = model((3.0, 0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.prepare(m, (X[:4],), init=1.0)
    with torch.no_grad():
        m[0].act.weight.fill_(0.97)  # within the threshold, but its block's inputs are large: the fold costs
        m[1].act.weight.fill_(0.97)  # the same slope where inputs are tiny: the fold costs nothing
        prepared = m(X)
    with pytest.warns(UserWarning, match=r"left 0.act: folding it moves the metric by .*over max_drop 0.0001"):
        done = train.collapse(m, threshold=0.05, eval_fn=closeness(prepared), max_drop=1e-4)
    assert done == ["1.act"] and list(done.left) == ["0.act"] and done.left["0.act"] > 1e-4
    assert list(train.blocks(m)) == ["0.act"] and abs(train.slopes(m)["0.act"] - 0.97) < 1e-6  # left as it was


def test_collapse_takes_eval_fn_and_max_drop_together():
    m = model((1.0,))
    with pytest.raises(ValueError, match="go together"):
        train.collapse(m, eval_fn=lambda _: 0.0)

"""Which blocks to collapse, measured on the user's own metric before any fine-tune: each block linearized alone
(its activation made the identity, as a slope of 1 makes it), then cumulatively in the order that hurts least —
the paper's layer-wise collapse curve (its Figure 4) for this model. And the greedy budget `collapse` takes:
fold blocks while the metric stays within `max_drop`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lc_onnx.train.prelu import LayerCollapsePReLU, SharedActivation
from lc_onnx.train.reach import set_module
from lc_onnx.train.regularize import blocks


@dataclass
class Sensitivity:
    """`baseline`: the metric of the model as it is. `alone[name]`: with only that block linearized. `order`: the
    blocks from least to most harmful alone, and `cumulative[i]`: the metric with the first i + 1 of them
    linearized together. `higher_is_better` tells which way a drop goes."""

    baseline: float
    alone: dict[str, float]
    order: list[str]
    cumulative: list[float]
    higher_is_better: bool = True
    skipped: list[str] = field(default_factory=list)  # sites that cannot be linearized alone (shared activation)

    def drop(self, value: float) -> float:
        """How much worse `value` is than the baseline (positive: worse)."""
        return _drop(self.baseline, value, self.higher_is_better)

    def table(self) -> str:
        width = max([len("block"), *map(len, self.order)])
        lines = [f"baseline {self.baseline:.6g}",
                 f"{'#':>3}  {'block':<{width}}  {'alone':>10}  {'drop alone':>10}  {'cumulative':>10}  {'drop':>10}"]
        for i, (name, value) in enumerate(zip(self.order, self.cumulative, strict=True)):
            lines.append(f"{i + 1:>3}  {name:<{width}}  {self.alone[name]:>10.6g}  {self.drop(self.alone[name]):>10.4g}"
                         f"  {value:>10.6g}  {self.drop(value):>10.4g}")
        lines += [f"not measured: {s}" for s in self.skipped]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """The cumulative curve (metric against blocks linearized) as a PNG (needs matplotlib)."""
        from lc_onnx import plots

        if not plots.available():
            raise ImportError("Sensitivity.plot needs matplotlib: pip install 'lc-onnx[plot]'")
        plots.sensitivity_plot(self.baseline, self.cumulative, path)


def _drop(baseline: float, value: float, higher_is_better: bool) -> float:
    return baseline - value if higher_is_better else value - baseline


@contextlib.contextmanager
def linearized(model: nn.Module, names: list[str]) -> Iterator[None]:
    """The named sites computed as if their activation were the identity while the block runs: a prepared block's
    slopes set to 1, or a plain activation module (by its name in the model) swapped for nn.Identity; then all back
    as they were."""
    prepared = blocks(model)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    swapped: list[tuple[str, nn.Module]] = []
    try:
        with torch.no_grad():
            for name in names:
                if name in prepared:
                    w = prepared[name].weight
                    kept.append((w, w.detach().clone()))
                    w.fill_(1.0)
                else:
                    swapped.append((name, model.get_submodule(name)))
                    set_module(model, name, nn.Identity())
        yield
    finally:
        with torch.no_grad():
            for w, value in kept:
                w.copy_(value)
        for name, module in swapped:
            set_module(model, name, module)


def _sites(model: nn.Module, example_inputs) -> tuple[list[str], list[str]]:
    """The blocks to measure: the prepared ones, or, for a model not prepared, the sites `prepare` would take
    (found on `example_inputs`, the model left as it is). A plain activation shared by several sites cannot be
    linearized at one of them alone: those are listed apart."""
    prepared = blocks(model)
    if prepared:
        return list(prepared), []
    if example_inputs is None:
        raise ValueError("sensitivity: the model has no prepared block; pass example_inputs to find its sites")
    from lc_onnx.train.reach import proven_sites

    found, _ = proven_sites(model, example_inputs)
    alone = [s.act for s in found if not s.shared and not isinstance(model.get_submodule(s.act), SharedActivation)]
    return list(dict.fromkeys(alone)), [s.name for s in found if s.shared]


@torch.no_grad()
def sensitivity(model: nn.Module, eval_fn: Callable[[nn.Module], float], example_inputs=None, *,
                higher_is_better: bool = True) -> Sensitivity:
    """The metric `eval_fn(model)` with each block linearized alone, then cumulatively from the least harmful
    (2n + 1 evaluations for n blocks). A prepared model's blocks are its PReLUs (slope set to 1); a model not yet
    prepared is measured at the sites `prepare(model, example_inputs)` would take, with its own activations
    elsewhere (what a fine-tune starts from). The model is left as it was. Use it to choose `include=` for the
    fine-tune, and to see how much the regularizer must recover."""
    names, skipped = _sites(model, example_inputs)
    baseline = float(eval_fn(model))
    alone = {}
    for name in names:
        with linearized(model, [name]):
            alone[name] = float(eval_fn(model))
    order = sorted(names, key=lambda n: _drop(baseline, alone[n], higher_is_better))
    cumulative = []
    for i in range(len(order)):
        with linearized(model, order[: i + 1]):
            cumulative.append(float(eval_fn(model)))
    return Sensitivity(baseline, alone, order, cumulative, higher_is_better, skipped)


@torch.no_grad()
def within_budget(model: nn.Module, candidates: list[str], eval_fn: Callable[[nn.Module], float], max_drop: float,
                  higher_is_better: bool = True) -> tuple[list[str], dict[str, float]]:
    """Greedy: the candidates (prepared block names) taken in order, each kept if the metric with it and those
    kept before linearized stays within `max_drop` of the model as it is. A block's collapse computes what its
    slope at exactly 1 computes, so each trial sets slopes to 1 and puts them back. Returns the blocks kept and,
    for each left, the drop it would have caused."""
    baseline = float(eval_fn(model))
    kept: list[str] = []
    left: dict[str, float] = {}
    for name in candidates:
        if not isinstance(blocks(model).get(name), LayerCollapsePReLU):
            continue
        with linearized(model, [*kept, name]):
            value = float(eval_fn(model))
        drop = _drop(baseline, value, higher_is_better)
        if drop <= max_drop:
            kept.append(name)
        else:
            left[name] = drop
    return kept, left

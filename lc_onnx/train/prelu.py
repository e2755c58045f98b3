"""The modules `prepare` puts in place of an activation: a PReLU that knows its site, and, for one
activation module called at several sites, a switch that gives each site its own PReLU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SiteLayout:
    """Where a site's modules are, as paths relative to the lowest module holding them all, which lies
    `up` levels above the PReLU itself (so the model may be wrapped or re-rooted after `prepare`).
    `slot` is the module the collapse replaces by the identity; `feeder` the one whose output the
    activation reads (a shared activation learns its site from it); `batchnorms` the BatchNorm
    layers between the two linear layers, in order; `fingerprint` the (path, type, weight shape) of
    every module the collapse touches, so it can refuse a site that changed since `prepare`; `order` where
    the forward pass reaches it, so blocks in a row collapse front to back whatever their registration order."""

    up: int
    first: str
    second: str
    slot: str
    feeder: str
    batchnorms: tuple[str, ...] = ()
    fingerprint: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    order: int = 0  # where the forward pass reaches the block: `collapse` goes in this order
    passing: tuple[str, ...] = ()  # modules that hand a tensor of the block on unchanged (eval Dropout, Identity)


@torch.library.custom_op("lc_onnx::prelu_last_dim", mutates_args=())
def prelu_last_dim(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """PReLU with one slope per entry of the last dim. Used only while `export` runs, which writes it as one
    ONNX PRelu (the slope broadcasts to the last dim there); torch's own prelu takes channels from dim 1."""
    return torch.where(x >= 0, x, x * slope)


@prelu_last_dim.register_fake
def _(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class LayerCollapsePReLU(nn.PReLU):
    """nn.PReLU that remembers the linear layers around it, so `collapse` can fuse them. Scalar slope as in
    the paper; per-channel slopes act on the layers' feature dim: the last (Linear), or 1 (pointwise ConvNd)."""

    exporting = False  # set by `export` while it runs (a class default, so models pickled before have it)

    def __init__(self, num_parameters: int, init: float, layout: SiteLayout, verified: bool = True,
                 channel_dim: int = -1):
        super().__init__(num_parameters=num_parameters, init=init)
        self.layout, self.verified, self.channel_dim = layout, verified, channel_dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as torch's and HF's activations name it
        x = input
        if self.num_parameters == 1 or x.dim() == 2 or self.channel_dim == 1:
            return super().forward(x)
        if self.exporting:  # torch.where would export as Where/Mul, which `lc-onnx optimize` cannot fold
            return prelu_last_dim(x, self.weight)
        return torch.where(x >= 0, x, x * self.weight)  # nn.PReLU's channels are dim 1; ours the last dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, between {self.layout.first} and {self.layout.second}"


class SharedActivation(nn.Module):
    """One activation module that the forward pass calls at several places (`self.act` used by two
    blocks). Each site gets its own PReLU in `sites`; the site of a call is told by a forward hook on the
    module that feeds it (`SiteTag`); calls from anywhere else keep the original activation."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.sites = nn.ModuleDict()
        self._pending: dict[int, tuple[torch.Tensor, str]] = {}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        tagged = self._pending.pop(id(x), None)
        if tagged is not None and tagged[0] is x:
            return self.sites[tagged[1]](x)
        return self.original(x)

    def expect(self, tensor: torch.Tensor, key: str) -> None:
        if len(self._pending) > 64:  # tags whose tensor never reached us (another code path): forget them
            self._pending.clear()
        self._pending[id(tensor)] = (tensor, key)


class SiteTag:
    """Forward hook on a site's feeder: tells the shared activation which site its next input belongs to.
    A class, not a closure, so a prepared model can still be pickled (torch.save, deepcopy)."""

    def __init__(self, shared: SharedActivation, key: str):
        self.shared, self.key = shared, key

    def __call__(self, module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):
            self.shared.expect(output, self.key)


def tag_feeder(feeder: nn.Module, shared: SharedActivation, key: str) -> None:
    feeder.register_forward_hook(SiteTag(shared, key))

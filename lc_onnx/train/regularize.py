"""The LayerCollapse regularizer λ·Σ(α−1)², the slopes' own step size, and what the slopes are now."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

from lc_onnx.train.prelu import LayerCollapsePReLU


def blocks(model: nn.Module) -> dict[str, LayerCollapsePReLU]:
    """The prepared activations by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LayerCollapsePReLU)}


def regularizer(model: nn.Module) -> torch.Tensor:
    """Σ over prepared blocks of (α − 1)² (mean over channels when per-channel); add λ times it to the loss."""
    return penalty(blocks(model).values())


def penalty(acts: Iterable[LayerCollapsePReLU]) -> torch.Tensor:
    """`regularizer` over these blocks (the slope-stepping core keeps them, rather than walk the model a step).
    Under FSDP2 a plain tensor too, from each slope gathered whole (`full`), that backprops into each rank's shard:
    every rank adds it to its loss, so the gathers run on every rank."""
    terms = [((full(m.weight) - 1.0) ** 2).mean() for m in acts]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP2's `fully_shard`, tensor parallel). Free without torch.distributed.tensor
    imported: no DTensor exists then (importing it costs 0.6 s)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """`t`'s whole value as a plain tensor: a DTensor gathered from every rank's shard (differentiable, its
    gradient going back to this rank's shard; a collective, so every rank of its mesh must call it), else `t`."""
    return t.full_tensor() if sharded(t) else t


def slope_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in blocks(model).values()]


def param_groups(model: nn.Module, lr: float, slope_lr: float = 2e-2, weight_decay: float = 0.01) -> list[dict]:
    """Optimizer groups with the slopes apart: their own step size (with Adam a slope moves about `lr` a
    step whatever the gradient, so 1e-3 cannot carry it from 0.01 to 1 in a short run) and no weight decay
    (which would pull them toward 0). `slope_lr` 2e-2 is the callback's default: with λ = 1 the README's digits
    MLP has every slope within 0.03 of 1 after 100 steps and 0.006 after 600; at 1e-2 (the default before)
    they were 0.25 away after 100 steps and 0.03 after 300."""
    slopes_ = {id(p) for p in slope_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in slopes_ and p.requires_grad]
    return [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": slope_parameters(model), "lr": slope_lr, "weight_decay": 0.0},
    ]


@torch.no_grad()
def decoupled_step(model: nn.Module, lr: float, lam: float) -> None:
    """The paper's decoupled update, after each optimizer step: α ← α − lr·λ·2(α − 1)."""
    decoupled_update(slope_parameters(model), lr, lam)


@torch.no_grad()
def decoupled_update(params: Iterable[torch.Tensor], lr: float, lam: float) -> None:
    """`decoupled_step` on these slopes."""
    for p in params:
        p.sub_(lr * lam * 2.0 * (p - 1.0))


def slopes(model: nn.Module) -> dict[str, float]:
    """Each prepared block's slope (the one farthest from 1 when per-channel). Under FSDP2 (DTensor slopes) each
    slope is gathered from the ranks' shards, a collective: call it on every rank, never under `if rank == 0`
    (that rank would wait for the others forever); every rank gets the same values."""
    out = {}
    for name, m in blocks(model).items():
        w = full(m.weight.detach()).double()
        out[name] = float(w[(w - 1).abs().argmax()])
    return out

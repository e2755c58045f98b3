"""The torch side of LayerCollapse: swap MLP activations for PReLU, regularize slopes toward 1, collapse, export.

    names = prepare(model)                                   # activation between two linear layers -> PReLU
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3))    # slopes get their own step size, no decay
    loss = ce + 0.2 * regularizer(model)                     # λ·Σ(α−1)²
    collapse(model, threshold=0.05)                          # blocks within 0.05 of slope 1 -> one Linear
    export(model, (x,), "model.onnx")                        # then `lc-onnx optimize` sees the PRelu chains

This is the only module of lc_onnx that imports torch (`pip install lc-onnx[train]`).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import torch
from torch import nn

# (first linear, activation, second linear), as attribute paths inside one module: timm/HF naming
ATTRIBUTE_PATTERNS = [
    ("fc1", "act", "fc2"),  # timm Mlp, HF ViT-like MLPs
    ("c_fc", "act", "c_proj"),  # HF GPT-2
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),  # HF BERT, RoBERTa, ViT
    ("lin1", "activation", "lin2"),  # HF DistilBERT
    ("fc_in", "act", "fc_out"),  # HF GPT-J
    ("dense_h_to_4h", "act", "dense_4h_to_h"),  # HF GPT-NeoX style
]
PASS_THROUGH = (nn.Dropout, nn.Identity, nn.BatchNorm1d)  # allowed between the layers in nn.Sequential
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Tanh, nn.Mish, nn.ReLU6, nn.Hardswish)


class LayerCollapsePReLU(nn.PReLU):
    """nn.PReLU that remembers the two linear layers around it (paths relative to a common parent),
    so `collapse` can fuse them. Scalar slope as in the paper; per-channel acts on the last dim."""

    def __init__(self, num_parameters: int, init: float, first: str, second: str, depth: int,
                 between: tuple[str, ...] = ()):
        super().__init__(num_parameters=num_parameters, init=init)
        self.first, self.second, self.depth, self.between = first, second, depth, between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_parameters == 1 or x.dim() <= 2:
            return super().forward(x)
        return torch.where(x >= 0, x, x * self.weight)  # nn.PReLU's channels are dim 1; ours are the last dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, between {self.first} and {self.second}"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _is_activation(m: nn.Module) -> bool:
    if isinstance(m, LayerCollapsePReLU):
        return False
    return isinstance(m, ACTIVATIONS) or type(m).__module__.startswith("transformers.activations")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, module)


def _out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.nf


@dataclass
class _Site:
    parent: str  # qualified name of the module holding all three
    first: str
    act: str
    second: str
    between: tuple[str, ...] = ()  # Dropout/Identity/BatchNorm1d paths in a Sequential run


def _qualify(parent: str, rel: str) -> str:
    return f"{parent}.{rel}" if parent else rel


def _find_sites(model: nn.Module) -> list[_Site]:
    sites, seen = [], set()
    for pname, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            kids = list(module.named_children())
            for i, (first, m) in enumerate(kids):
                if not _is_linear(m):
                    continue
                j, between, act = i + 1, [], None
                while j < len(kids) and (isinstance(kids[j][1], PASS_THROUGH) or (act is None and (
                        _is_activation(kids[j][1]) or isinstance(kids[j][1], LayerCollapsePReLU)))):
                    if isinstance(kids[j][1], PASS_THROUGH):
                        between.append(kids[j][0])
                    else:
                        act = kids[j][0]
                    j += 1
                if act and j < len(kids) and _is_linear(kids[j][1]):
                    sites.append(_Site(pname, first, act, kids[j][0], tuple(between)))
        for first, act, second in ATTRIBUTE_PATTERNS:
            f, a, s = (_get(module, p) for p in (first, act, second))
            if f is not None and a is not None and s is not None and _is_linear(f) and _is_linear(s) and (
                    _is_activation(a) or isinstance(a, LayerCollapsePReLU)):
                sites.append(_Site(pname, first, act, second))
    unique = []
    for site in sites:
        key = _qualify(site.parent, site.act)
        if key not in seen:
            seen.add(key)
            unique.append(site)
    return unique


def _selected(name: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def prepare(model: nn.Module, *, init: float = 0.01, per_channel: bool = False,
            include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Replace, in place, every activation between two linear layers (nn.Linear or HF Conv1D) with a
    LayerCollapsePReLU; returns the activations' qualified names. `include`/`exclude` are fnmatch
    patterns on those names. Already prepared blocks are kept as they are."""
    names = []
    for site in _find_sites(model):
        name = _qualify(site.parent, site.act)
        if not _selected(name, include, exclude):
            continue
        parent = _get(model, site.parent)
        old = _get(parent, site.act)
        if not isinstance(old, LayerCollapsePReLU):
            width = _out_features(_get(parent, site.first)) if per_channel else 1
            depth = site.act.count(".") + 1
            ref = next((p for p in parent.parameters()), None)
            act = LayerCollapsePReLU(width, init, site.first, site.second, depth, site.between)
            if ref is not None:
                act.to(device=ref.device, dtype=ref.dtype)
            _set(parent, site.act, act)
        names.append(name)
    return names


def blocks(model: nn.Module) -> dict[str, LayerCollapsePReLU]:
    """The prepared activations by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LayerCollapsePReLU)}


def regularizer(model: nn.Module) -> torch.Tensor:
    """Σ over prepared blocks of (α − 1)² (mean over channels when per-channel); add λ times it to the loss."""
    terms = [((m.weight - 1.0) ** 2).mean() for m in blocks(model).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def slope_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in blocks(model).values()]


def param_groups(model: nn.Module, lr: float, slope_lr: float = 1e-2, weight_decay: float = 0.01) -> list[dict]:
    """Optimizer groups with the slopes apart: their own step size (with Adam a slope moves about `lr` a
    step whatever the gradient, so 1e-3 cannot carry it from 0.01 to 1 in a short run) and no weight decay
    (which would pull them toward 0)."""
    slopes = {id(p) for p in slope_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in slopes and p.requires_grad]
    return [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": slope_parameters(model), "lr": slope_lr, "weight_decay": 0.0},
    ]


@torch.no_grad()
def decoupled_step(model: nn.Module, lr: float, lam: float) -> None:
    """The paper's decoupled update, after each optimizer step: α ← α − lr·λ·2(α − 1)."""
    for p in slope_parameters(model):
        p.sub_(lr * lam * 2.0 * (p - 1.0))


def slopes(model: nn.Module) -> dict[str, float]:
    """Each prepared block's slope (the one farthest from 1 when per-channel)."""
    out = {}
    for name, m in blocks(model).items():
        w = m.weight.detach().double()
        out[name] = float(w[(w - 1).abs().argmax()])
    return out


def _as_affine(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) in float64 with y = x·Wᵀ + b, for nn.Linear, HF Conv1D and eval-mode BatchNorm1d."""
    if isinstance(m, nn.Linear):
        b = m.bias if m.bias is not None else torch.zeros(m.out_features)
        return m.weight.double(), b.double()
    if isinstance(m, nn.BatchNorm1d):
        mean = m.running_mean if m.running_mean is not None else torch.zeros(m.num_features)
        var = m.running_var if m.running_var is not None else torch.ones(m.num_features)
        scale = 1.0 / torch.sqrt(var.double() + m.eps)
        if m.affine:
            scale = scale * m.weight.double()
        shift = -mean.double() * scale + (m.bias.double() if m.affine else 0.0)
        return torch.diag(scale), shift
    return m.weight.double().T, m.bias.double()  # Conv1D: y = x·W + b


@torch.no_grad()
def collapse(model: nn.Module, threshold: float = 0.05, only: list[str] | None = None) -> list[str]:
    """Replace each block whose slope is within `threshold` of 1 by one nn.Linear
    (W = W2·W1, b = W2·b1 + b2, BatchNorm between folded in); returns the names collapsed. The others
    stay; `slopes(model)` says where they are. `only` limits it to those block names."""
    done = []
    for name, act in blocks(model).items():
        if float((act.weight.detach() - 1).abs().max()) > threshold or (only is not None and name not in only):
            continue
        parent_name = ".".join(name.split(".")[: -act.depth])
        parent = _get(model, parent_name)
        first, second = _get(parent, act.first), _get(parent, act.second)
        between = [_get(parent, p) for p in act.between]
        if any(isinstance(m, nn.BatchNorm1d) and m.training for m in between):
            raise RuntimeError(f"{name}: put the model in eval() before collapse (BatchNorm uses running stats)")
        order = [first] + [m for m in between if isinstance(m, nn.BatchNorm1d)] + [second]
        w, b = _as_affine(order[0])
        for m in order[1:]:
            wm, bm = _as_affine(m)
            w, b = wm @ w, wm @ b + bm
        ref = second.weight
        fused = nn.Linear(w.shape[1], w.shape[0], device=ref.device, dtype=ref.dtype)
        fused.weight.copy_(w.to(ref.dtype))
        fused.bias.copy_(b.to(ref.dtype))
        # the fused layer takes the second layer's place, so a chain of blocks collapses front to back
        _set(parent, act.second, fused)
        for path in (act.first, *act.between):
            _set(parent, path, nn.Identity())
        _set(parent, ".".join(name.split(".")[-act.depth:]), nn.Identity())
        done.append(name)
    return done


def export(model: nn.Module, example_args: tuple, path: str | os.PathLike, *, dynamo: bool = False, **kw) -> None:
    """torch.onnx.export in eval mode with settings that keep PRelu chains visible to `lc-onnx optimize`:
    opset 17 for the legacy exporter, one file (no external data) for the new one unless asked."""
    model.eval()
    if dynamo:
        kw.setdefault("external_data", False)
    else:
        kw.setdefault("opset_version", 17)
    torch.onnx.export(model, example_args, str(path), dynamo=dynamo, **kw)

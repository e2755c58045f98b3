"""The fallback when `prepare` gets no example inputs: sites guessed from names and nn.Sequential order.
Nothing here proves that the forward pass chains these modules (a LayerNorm or a residual in between would
go unseen), so `prepare` warns when it uses it."""

from __future__ import annotations

from torch import nn

from lc_onnx.train.layers import feature_dim, is_batchnorm, is_linear, kind, out_features
from lc_onnx.train.prelu import LayerCollapsePReLU
from lc_onnx.train.sites import Site

# (first linear, activation, second linear), as attribute paths inside one module: timm/HF naming
ATTRIBUTE_PATTERNS = [
    ("fc1", "act", "fc2"),  # timm Mlp
    ("c_fc", "act", "c_proj"),  # HF GPT-2
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),  # HF BERT, RoBERTa
    ("lin1", "activation", "lin2"),  # HF DistilBERT
    ("fc_in", "act", "fc_out"),  # HF GPT-J
    ("dense_h_to_4h", "act", "dense_4h_to_h"),  # HF GPT-NeoX style
]
PASS_THROUGH = (nn.Dropout, nn.Identity)  # allowed between the layers in nn.Sequential, as is a BatchNorm that fits
NORM_AFTER = {"dense": nn.BatchNorm1d, "conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d, "conv3d": nn.BatchNorm3d}
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Tanh, nn.Mish, nn.ReLU6, nn.Hardswish)


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, (*ACTIVATIONS, LayerCollapsePReLU)) or type(m).__module__.startswith(
        "transformers.activations")


def _slopes_on_features(act: nn.Module, first: nn.Module) -> bool:
    """An nn.PReLU with per-channel slopes takes them from dim 1 of its input: the channels after a conv, but
    after a Linear the features only on 2-D inputs, which names cannot tell (on (N, T, C) they are per T)."""
    return not (type(act) is nn.PReLU and act.num_parameters > 1 and feature_dim(first) == -1)


def _norm_fits(norm: nn.Module, first: nn.Module) -> bool:
    """A BatchNorm over the first layer's features as far as classes tell: BatchNorm1d after a Linear (on 2-D
    inputs, which names cannot check) or a Conv1d, BatchNorm2d after a Conv2d, BatchNorm3d after a Conv3d, and a
    SyncBatchNorm (any rank) after any of them."""
    return is_batchnorm(norm) and isinstance(norm, (nn.SyncBatchNorm, NORM_AFTER[kind(first)]))


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _qualify(parent: str, rel: str) -> str:
    return f"{parent}.{rel}" if parent else rel


def _site(model: nn.Module, parent: str, first: str, act: str, second: str, norms=(), feeder: str = "",
          passing=()) -> Site:
    q = [_qualify(parent, p) for p in (first, act, second, feeder or first)]
    first_layer = model.get_submodule(q[0])
    return Site(q[1], q[0], q[2], tuple(_qualify(parent, n) for n in norms), q[3], out_features(first_layer),
                feature_dim(first_layer),  # per-channel slopes of a conv block on its channels
                passing=tuple(_qualify(parent, n) for n in passing))


def _in_sequence(kids: list[tuple[str, nn.Module]], i: int) -> tuple[str, list[str], str, str, list[str]] | None:
    """(activation, norms, feeder, second layer, Dropout/Identity between) of a block that starts at the linear
    layer kids[i]: an activation, Dropout/Identity and fitting BatchNorms after it, then a linear layer of the
    same kind."""
    first = kids[i][1]
    act, norms, feeder, passing = None, [], kids[i][0], []
    for name, child in kids[i + 1:]:
        if isinstance(child, PASS_THROUGH):
            passing.append(name)
            continue
        if _norm_fits(child, first):
            norms.append(name)
            feeder = name if act is None else feeder  # the module whose output the activation reads
        elif act is None and _is_activation(child):
            act = name
        elif act is not None and is_linear(child) and kind(child) == kind(first):
            return act, norms, feeder, name, passing
        else:
            return None
    return None


def find(model: nn.Module) -> list[Site]:
    sites: dict[str, Site] = {}
    for pname, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            kids = list(module.named_children())
            for i, (first, m) in enumerate(kids):
                block = _in_sequence(kids, i) if is_linear(m) else None
                if block and _slopes_on_features(module.get_submodule(block[0]), m):
                    act, norms, feeder, second, passing = block
                    site = _site(model, pname, first, act, second, norms, feeder, passing)
                    sites.setdefault(site.act, site)
        for first, act, second in ATTRIBUTE_PATTERNS:
            f, a, s = (_get(module, p) for p in (first, act, second))
            if f is not None and a is not None and s is not None and is_linear(f) and is_linear(s) and (
                    kind(f) == kind(s) and _is_activation(a) and _slopes_on_features(a, f)):
                site = _site(model, pname, first, act, second)
                sites.setdefault(site.act, site)
    return list(sites.values())

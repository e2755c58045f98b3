"""`prepare`: put a LayerCollapsePReLU in place of each site's activation."""

from __future__ import annotations

import fnmatch
import warnings

import torch
from torch import nn

from lc_onnx.train import layers, names, pretrained, reach, sites, wrapped
from lc_onnx.train.prelu import LayerCollapsePReLU, SharedActivation, SiteLayout, tag_feeder
from lc_onnx.train.reach import set_module
from lc_onnx.train.sites import Site


class Prepared(list):
    """The names of the prepared blocks (a list, as `slopes` and `collapse` name them), and:
    `sites` (each one's modules), `unswappable` (a line for each site it could not prepare: an activation
    called as a function, a module with two names, a TorchScript part) and `verified` (whether the sites come
    from a recorded forward pass rather than from names)."""

    def __init__(self, names_: list[str], sites_: list[Site], unswappable: list[str], verified: bool):
        super().__init__(names_)
        self.sites, self.unswappable, self.verified = sites_, unswappable, verified


def one_or_many(value: str | list[str] | None) -> list[str] | None:
    """A list of names or patterns; one string is one (iterating it would give its characters, and a '*' among
    them matches every name)."""
    return [value] if isinstance(value, str) else value


def _selected(name: str, include, exclude) -> bool:
    include, exclude = one_or_many(include), one_or_many(exclude)
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def _parts(path: str) -> list[str]:
    return path.split(".") if path else []


def no_fused_feed_forward(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer, in eval mode without grad, computes its feed-forward in one fused kernel
    when its activation is ReLU/GELU, and never calls the activation module; nn.TransformerEncoder's
    nested-tensor path relies on that kernel. Turn both off where a prepared activation must run."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(m.activation, (LayerCollapsePReLU,
                                                                                   SharedActivation)):
            m.activation_relu_or_gelu = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and not all(layer.activation_relu_or_gelu for layer in m.layers):
            m.use_nested_tensor = False


def fingerprint(root: nn.Module, path: str, role: str) -> tuple[str, str, tuple[int, ...]]:
    """What `collapse` needs unchanged at `path`: the module's type and the width it has on the hidden side."""
    m = root.get_submodule(path) if path else root
    if role == "first":
        width = (layers.out_features(m),)
    elif role == "second":
        width = (layers.in_features(m),)
    else:
        width = (m.num_features,)
    return path, type(m).__name__, width


def layout(site: Site, model: nn.Module) -> SiteLayout:
    """The site's paths relative to the lowest module that holds all of them."""
    parents = [_parts(p)[:-1] for p in (site.first, site.act, site.second, *site.batchnorms)]
    common = []
    for level in zip(*parents, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])

    def rel(path: str) -> str:
        return ".".join(_parts(path)[len(common):])

    up = len(_parts(site.name)) - len(common)
    prints = (fingerprint(model, site.first, "first"), fingerprint(model, site.second, "second"),
              *(fingerprint(model, n, "norm") for n in site.batchnorms))
    prints = tuple((rel(p), t, w) for p, t, w in prints)
    return SiteLayout(up, rel(site.first), rel(site.second), rel(site.name), rel(site.feeder),
                      tuple(rel(n) for n in site.batchnorms), prints, site.order,
                      tuple(rel(n) for n in site.passing if _parts(n)[:len(common)] == common))


def prepare(model: nn.Module, example_inputs=None, *, init: float = 0.01, per_channel: bool = False,
            include: str | list[str] | None = None, exclude: str | list[str] | None = None,
            keep_slopes: bool = True) -> Prepared:
    """Replace, in place, the activation of every LayerCollapse site with a LayerCollapsePReLU (slope `init`;
    one per hidden unit with `per_channel`) and return the names of the prepared blocks. A site whose activation
    is already an nn.PReLU keeps its trained slopes (one, or one per channel as it had them), and one that is an
    nn.LeakyReLU gets its `negative_slope` (the prepared model computes what the original did), unless
    `keep_slopes=False`, which gives it `init` as any other. Hooks on a replaced activation module are not
    carried over to its PReLU: one warning per module says how many.

    With `example_inputs` (a tuple of positional inputs, or a dict of keyword inputs as HF models take them)
    the model runs once in eval mode and a site is an activation module whose input is exactly one linear
    layer's output and whose output feeds exactly one linear layer and nothing else (see `sites`): an MLP's,
    and a head's too, such as BERT's pooler `dense -> tanh -> classifier` (`exclude="*pooler*"` keeps it). Without
    them, sites are guessed from names, with a warning, and `collapse` refuses them until verified.
    `include`/`exclude` are fnmatch patterns on the names (one pattern or a list). Blocks prepared before are
    kept as they are; one found by names before is marked verified if the recorded pass shows the same site."""
    wrapped.refuse_wrapped(model)
    if example_inputs is None:
        warnings.warn("prepare() without example_inputs finds sites by module names, which cannot show that "
                      "the forward pass really chains them (collapse() refuses them unless it gets example_inputs "
                      "or trust_names=True); pass example_inputs to verify them", stacklevel=2)
        found, unswappable = names.find(model), []
    else:
        found, unswappable = reach.proven_sites(model, example_inputs)
        for line in unswappable:
            warnings.warn(line, stacklevel=2)
    chosen, warned = [], set()
    for site in found:
        if not _selected(site.name, include, exclude):
            continue
        _warn_dropped_hooks(model, site, warned)
        install(model, site, init, per_channel, verified=example_inputs is not None, keep_slopes=keep_slopes)
        chosen.append(site)
    no_fused_feed_forward(model)
    if chosen:  # a transformers model carries it into config.json: `train.from_pretrained` replays it
        pretrained.note(model, "prepare", sites=[
            pretrained.site_entry(s, model.get_submodule(s.name).num_parameters, example_inputs is not None)
            for s in chosen])
    return Prepared([s.name for s in chosen], chosen, unswappable, example_inputs is not None)


HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _warn_dropped_hooks(model: nn.Module, site: Site, warned: set[int]) -> None:
    """Hooks on an activation module do not run on the PReLU put in its place. They are not carried over: one
    that changes the output (a clamp, a scale) would make the block something collapse does not fold; one that
    only observes would see the PReLU. So one warning per module, naming it, for the user to act on."""
    current = model.get_submodule(site.act)
    if isinstance(current, (LayerCollapsePReLU, SharedActivation)) or id(current) in warned:
        return  # prepared before: its hooks were reported then
    count = sum(len(getattr(current, d, {})) for d in HOOK_DICTS)
    if not count:
        return
    warned.add(id(current))
    where = "at its sites the PReLUs in its place do" if site.shared else "the PReLU in its place does"
    warnings.warn(f"prepare: {site.act} ({type(current).__name__}) has {count} forward/backward hook(s), which "
                  f"{where} not run (a hook that changes the output would make the block non-linear, so they are "
                  "not carried over); register the ones that only observe on the new module", stacklevel=3)


def _same_modules(a: SiteLayout, b: SiteLayout) -> bool:
    return (a.up, a.first, a.second, a.batchnorms) == (b.up, b.first, b.second, b.batchnorms)


def own_slopes(activation: nn.Module) -> torch.Tensor | None:
    """The slopes of an activation that is a PReLU already, so the prepared model computes what it did: an
    nn.PReLU's, or an nn.LeakyReLU's `negative_slope` (a PReLU with one fixed slope). Torch's own classes only:
    a subclass's forward may compute anything."""
    if sites.is_torch_prelu(activation):
        return activation.weight.detach()
    if isinstance(activation, nn.LeakyReLU) and type(activation).forward is nn.LeakyReLU.forward:
        return torch.tensor([float(activation.negative_slope)])
    return None


def _new_prelu(model: nn.Module, site: Site, original: nn.Module, init: float, per_channel: bool, verified: bool,
               keep_slopes: bool) -> LayerCollapsePReLU:
    """The site's PReLU, in the first layer's device and dtype: slopes `init`, or the activation's own slopes."""
    ref = model.get_submodule(site.first).weight
    kept = own_slopes(original) if keep_slopes else None
    if kept is not None and kept.numel() not in (1, site.width):  # not one per hidden unit: a names guess
        kept = None
    count = site.width if per_channel or kept is not None and kept.numel() > 1 else 1
    act = LayerCollapsePReLU(count, init, layout(site, model), verified, site.channel_dim)
    act.to(device=ref.device, dtype=ref.dtype)
    if kept is not None:  # per-channel slopes lie on the features: `sites` proved it
        with torch.no_grad():
            act.weight.copy_(kept.expand(count))
    return act


def install(model: nn.Module, site: Site, init: float = 0.01, per_channel: bool = False, verified: bool = True,
            keep_slopes: bool = True) -> None:
    """The site's PReLU in place of its activation (in a SharedActivation where the module serves several
    sites), unless an earlier `prepare` put it there."""
    current = model.get_submodule(site.act)
    if isinstance(current, LayerCollapsePReLU):
        if verified and _same_modules(current.layout, layout(site, model)):  # found by names before, proven now
            current.verified = True
        return
    original = current.original if isinstance(current, SharedActivation) else current
    act = _new_prelu(model, site, original, init, per_channel, verified, keep_slopes)
    if not site.shared:
        set_module(model, site.act, act)
        return
    if not isinstance(current, SharedActivation):
        current = SharedActivation(current)
        set_module(model, site.act, current)
    if site.key in current.sites:  # prepared before
        return
    current.sites[site.key] = act
    tag_feeder(model.get_submodule(site.feeder), current, site.key)

"""`collapse`: fuse each prepared block whose slope is within a threshold of 1 into one layer. It fuses
exactly the modules `prepare` recorded, and refuses a site whose modules changed since, whose modules carry hooks
(other than its own site tags) that the fused layer would run without, or one found by names alone that no
recorded forward pass proves."""

from __future__ import annotations

import difflib
import numbers
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lc_onnx.train import layers, pretrained, reach, wrapped
from lc_onnx.train.layers import affine, fused, is_linear
from lc_onnx.train.prelu import LayerCollapsePReLU, SharedActivation, SiteLayout, SiteTag
from lc_onnx.train.prepare import HOOK_DICTS, fingerprint, layout, one_or_many
from lc_onnx.train.reach import set_module
from lc_onnx.train.regularize import blocks, sharded
from lc_onnx.train.sensitivity import within_budget


def _check(name: str, base: nn.Module, act: LayerCollapsePReLU) -> None:
    """Refuse a site whose modules are no longer the ones `prepare` recorded."""
    roles = ["first", "second"] + ["norm"] * len(act.layout.batchnorms)
    for (path, kind, width), role in zip(act.layout.fingerprint, roles, strict=True):
        try:
            module = base.get_submodule(path) if path else base
        except AttributeError:
            module = None
        try:
            now = fingerprint(base, path, role) if module is not None else None
        except (AttributeError, TypeError):  # no weight / features: an Identity, say
            now = None
        # a layer an earlier collapse fused in place of the next block's first (an HF Conv1D, a Linear subclass)
        # is of torch's own class: the block's own collapse made it, so it is no change
        ours = now is not None and getattr(module, "lc_fused", False) and (now[0], now[2]) == (path, width)
        ok = (now == (path, kind, width) or ours) and (role == "norm" or is_linear(module))
        if not ok:
            found = type(module).__name__ if module is not None else "nothing"
            raise RuntimeError(f"{name}: the {role} module of this block ({path}) is now {found}, not the "
                               f"{kind} with {width[0]} hidden features that prepare() recorded; the model "
                               "changed since prepare(), so the block cannot be collapsed safely")


HOOK_KINDS = dict(zip(HOOK_DICTS, ("forward pre-hook", "forward hook", "backward pre-hook", "backward hook"),
                      strict=True))


def hook_name(hook) -> str:
    """Where a hook comes from, `module.qualname` of its function or class, so a user can tell whose it is."""
    target = getattr(hook, "func", hook)  # functools.partial
    target = getattr(target, "__func__", target)  # a bound method
    if not hasattr(target, "__qualname__"):  # a callable object
        target = type(target)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


# torch's legacy weight reparametrizations are forward pre-hooks with a function of their own to take them off
REMOVERS = {"WeightNorm": "torch.nn.utils.remove_weight_norm", "SpectralNorm": "torch.nn.utils.remove_spectral_norm"}


def foreign_hooks(module: nn.Module) -> list[str]:
    """The hooks on `module` other than the library's own site tags, and a forward replaced on the instance: the
    fused layer would run without them."""
    found = [f"{kind} {hook_name(hook)}" + (f" (take it off with {REMOVERS[type(hook).__name__]}(module))"
                                             if type(hook).__name__ in REMOVERS else "")
             for attr, kind in HOOK_KINDS.items()
             for hook in getattr(module, attr, {}).values() if not isinstance(hook, SiteTag)]
    if "forward" in vars(module):
        found.append(f"forward replaced on the instance by {hook_name(vars(module)['forward'])}")
    return found


@torch.no_grad()
def _check_maps(name: str, base: nn.Module, act: LayerCollapsePReLU) -> None:
    """Refuse a block whose layers, called now, do not compute their weights' map: state a subclass's own forward
    reads changed since `prepare` (an adapter trained from zero, a scale set after), or a global hook changes the
    output. One call of each layer on a small seeded input; what the recorded pass saw is no longer enough."""
    g = torch.Generator().manual_seed(0)
    for path in (act.layout.first, act.layout.second):
        layer = base.get_submodule(path)
        ref = layer.weight
        features = layers.in_features(layer)
        shape = (2, features) if not isinstance(layer, layers.CONVS) else (2, features, *([1] * len(layer.kernel_size)))
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=ref.device, dtype=ref.dtype)
        training = layer.training
        layer.eval()
        try:
            y = layer(x)
        finally:
            layer.train(training)
        if not isinstance(y, torch.Tensor) or not layers.reproduces(layer, x, y):
            raise RuntimeError(f"collapse: {name}: {path} ({type(layer).__name__}), called now, does not compute its "
                               "weights' map (its own forward reads state that changed since prepare, such as an "
                               "adapter or a scale, or a global hook changes its output), so fusing its weights would "
                               "change the model; merge that state into the weights first, or leave the block out "
                               "with only=[...]")


def _check_hooks(name: str, base: nn.Module, base_path: str, act: LayerCollapsePReLU) -> None:
    """Refuse a block whose modules carry hooks: collapse replaces them, so a hook that changes an output (a
    user's, or a library's registered while training) would be dropped and the fused layer compute something else."""
    lay = act.layout
    paths = [lay.first, *lay.batchnorms, lay.slot, lay.second, *getattr(lay, "passing", ())]  # not in old pickles
    holder = lay.slot.rpartition(".")[0].rpartition(".")[0]  # "act" of "act.sites.0"
    if "." in lay.slot and isinstance(base.get_submodule(holder), SharedActivation):  # it runs at this site too
        paths.append(holder)
    for path in paths:
        try:
            module = base.get_submodule(path)
        except AttributeError:
            raise RuntimeError(f"{name}: {path}, a module of this block, is gone; the model changed since prepare(), "
                               "so the block cannot be collapsed safely") from None
        hooks = foreign_hooks(module)
        if hooks:
            where = ".".join(p for p in (base_path, path) if p)
            raise RuntimeError(f"collapse: {name}: {where} carries {_listed(hooks)}, which the fused layer would "
                               "run without (a hook that changes an output would make the block compute something "
                               "else); remove them (handle.remove()) before collapse, or leave the block out with "
                               "only=[...]")


def _paths(name: str, act: LayerCollapsePReLU) -> tuple[str, tuple[str, ...]]:
    """The block's base module path and its (first, second, *batchnorms) paths, all relative to the model."""
    base = ".".join(name.split(".")[: len(name.split(".")) - act.layout.up])
    lay = act.layout
    return base, tuple(f"{base}.{p}" if base else p for p in (lay.first, lay.second, *lay.batchnorms))


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _check_only(only: list[str], known: list[str]) -> None:
    """A name in `only` that no block has (a typo, a block collapsed before) would silently fuse nothing."""
    unknown = [n for n in only if n not in known]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], known, n=3)
    hint = f" (closest: {', '.join(close)})" if close else ""
    now = f"the prepared blocks are {_listed(known, 8)}" if known else "the model has no prepared blocks"
    raise ValueError(f"collapse: only names no prepared block: {_listed([repr(n) for n in unknown])}{hint}; {now}")


def _verify(model: nn.Module, unverified: list[tuple[str, LayerCollapsePReLU]], example_inputs,
            trust_names: bool) -> None:
    """Blocks `prepare` found by names alone: a norm or a residual between their layers would make the fused
    layer compute something else, so they are fused only where a forward pass on `example_inputs` shows the same
    site (recorded as `prepare` does), or when the user trusts the names."""
    if not unverified or trust_names and example_inputs is None:
        return
    names = [name for name, _ in unverified]
    if example_inputs is None:
        raise RuntimeError(f"collapse: {_listed(names)}: prepared by module names (no example inputs), which do "
                           "not show that the forward pass runs their layers in a row; pass example_inputs to "
                           "collapse() or prepare() to verify them, or trust_names=True to fuse them as named")
    found = reach.proven_sites(model, example_inputs)[0]
    proven = {(s.name, (s.first, s.second, *s.batchnorms)) for s in found}
    chains = {name: _paths(name, act)[1] for name, act in unverified}
    wrong = [f"{p[0]} -> {name} -> {p[1]}" for name, p in chains.items() if (name, p) not in proven]
    if wrong:
        raise RuntimeError(f"collapse: the forward pass on example_inputs does not run {_listed(wrong)} alone "
                           "(something else uses or changes the tensors between them), so fusing would change the "
                           "model; leave them out with only=[...]")
    by_name = {s.name: s for s in found}
    for name, act in unverified:
        act.verified = True
        act.layout = layout(by_name[name], model)  # as recorded: its order, and the modules passed between


def verify(model: nn.Module, example_inputs) -> None:
    """Mark the blocks `prepare` found by names alone verified where a forward pass on `example_inputs` shows
    the same sites (as `collapse(..., example_inputs=...)` does); RuntimeError, naming them, where it does not."""
    _verify(model, [(name, act) for name, act in blocks(model).items() if not act.verified], example_inputs, False)


class Collapsed(list):
    """The names of the blocks collapsed (a list), and `left`: for each block within the threshold that a
    `max_drop` budget kept, the metric drop folding it would have caused."""

    def __init__(self, names: list[str], left: dict[str, float] | None = None):
        super().__init__(names)
        self.left = left or {}


@torch.no_grad()
def collapse(model: nn.Module, threshold: float = 0.05, only: str | list[str] | None = None, *,
             example_inputs=None, trust_names: bool = False, eval_fn=None, max_drop: float | None = None,
             higher_is_better: bool = True) -> Collapsed:
    """Replace each block whose slope is within `threshold` of 1 by one layer of the second's kind (nn.Linear,
    or a pointwise nn.Conv1d/2d/3d): W = W2·W1, b = W2·b1 + b2, BatchNorm between folded in. Returns the names
    collapsed; the others stay; `slopes(model)` says where they are. `only` limits it to that block name or
    those (a name that is no prepared block is an error).
    A NaN slope is never within the threshold.
    Blocks `prepare` found by names (no example inputs) are verified first on `example_inputs` (as `prepare`
    takes them) and refused if the recorded pass does not show them; without example inputs they are refused
    unless `trust_names=True`. A block whose modules carry hooks (a user's or a library's, registered after
    `prepare`) is refused too, naming them. A refusal raises before anything is fused.
    With `eval_fn(model) -> float` and `max_drop`, the blocks within the threshold are taken from the slope
    nearest 1, each kept while the metric with it and those kept before folded stays within `max_drop` of the
    model's now (a fold computes what a slope of exactly 1 does, so each trial sets slopes to 1, then puts them
    back); the others stay, each with its drop in the result's `left` and in one warning.
    A model sharded by FSDP2's `fully_shard` is refused (on every rank alike, without a collective): fusing its
    shards in place would break FSDP; `collapse_sharded` collapses an unsharded copy."""
    if any(sharded(p) for p in model.parameters()):
        raise RuntimeError("collapse: the model is sharded (FSDP2's fully_shard: its parameters are DTensors), and "
                           "fusing shards in place would break FSDP; call lc_onnx.train.collapse_sharded(model, "
                           "make_model) on every rank instead: it gathers the full state dict (torch.distributed."
                           "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
                           "full_state_dict=True))) into make_model(), an unsharded model prepared as this one was, "
                           "on rank 0, and collapses it there")
    if not (isinstance(threshold, numbers.Real) and threshold >= 0):  # NaN too: it would fuse every block
        raise ValueError(f"collapse: threshold must be a number >= 0 (the largest |slope - 1| to fuse), "
                         f"got {threshold!r}")
    if (eval_fn is None) != (max_drop is None):
        raise ValueError("collapse: eval_fn and max_drop go together (the metric, and how far it may drop)")
    if max_drop is not None and not (isinstance(max_drop, numbers.Real) and max_drop >= 0):
        raise ValueError(f"collapse: max_drop must be a number >= 0, got {max_drop!r}")
    only = one_or_many(only)
    if only is not None:
        _check_only(list(only), list(blocks(model)))
    chosen = []
    # in forward order: a block whose second layer is the next block's first must fold before that one
    for name, act in sorted(blocks(model).items(), key=lambda item: item[1].layout.order):
        # written so that NaN (a diverged slope) compares as outside
        within = float((act.weight.detach() - 1).abs().max()) <= threshold
        if not within or (only is not None and name not in only):
            continue
        base_path = _paths(name, act)[0]
        chosen.append((name, act, base_path, model.get_submodule(base_path) if base_path else model))
    # every block is checked before any is fused, so a refusal leaves the model as it was
    _verify(model, [(name, act) for name, act, _, _ in chosen if not act.verified], example_inputs, trust_names)
    for name, act, base_path, base in chosen:
        _check(name, base, act)
        _check_hooks(name, base, base_path, act)
        _check_maps(name, base, act)
        if any(base.get_submodule(p).training for p in act.layout.batchnorms):
            raise RuntimeError(f"{name}: put the model in eval() before collapse (BatchNorm uses running stats)")
    left: dict[str, float] = {}
    if eval_fn is not None and chosen:
        nearest = sorted(chosen, key=lambda c: float((c[1].weight.detach() - 1).abs().max()))
        kept, left = within_budget(model, [c[0] for c in nearest], eval_fn, max_drop, higher_is_better)
        chosen = [c for c in chosen if c[0] in kept]
        for name, drop in left.items():
            warnings.warn(f"collapse: left {name}: folding it moves the metric by {drop:.4g}, over max_drop "
                          f"{max_drop:g}", stacklevel=2)
    replaced = [p for _, act, _, base in chosen for path in (act.layout.first, act.layout.second,
                                                              *act.layout.batchnorms, act.layout.slot)
                for p in base.get_submodule(path).parameters()]
    for _, act, _, base in chosen:
        _fuse(base, act.layout)
    done = [name for name, *_ in chosen]
    if done:
        wrapped.guard_stale(model, replaced, done)  # an optimizer or DDP wrapper built before would train the old
        pretrained.note(model, "collapse", blocks=done)  # into a transformers config: `from_pretrained` replays it
    return Collapsed(done, left)


def collapse_sharded(model: nn.Module, make_model: Callable[[], nn.Module], threshold: float = 0.05,
                     **kwargs) -> tuple[nn.Module | None, Collapsed]:
    """`collapse` for a model FSDP2's `fully_shard` sharded, which cannot be fused in place: its full state dict is
    gathered to rank 0's CPU and loaded (strictly) into `make_model()` there, an unsharded model prepared as `model`
    was before `fully_shard`; that copy is put in eval mode and collapsed (`threshold` and `kwargs` as `collapse`
    takes them). A collective: call it on every rank. Returns (the collapsed copy, the names) on rank 0 and (None,
    the same names) on the others; an error on rank 0 is raised on every rank. `model` is left as it was."""
    distributed = wrapped._distributed()
    if distributed:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # one process: nothing is sharded
        state = model.state_dict()
    rank0 = not distributed or dist.get_rank() == 0
    copy, done, failure = None, None, None
    if rank0:
        try:
            copy = make_model()
            if any(sharded(p) for p in copy.parameters()):
                raise ValueError("collapse_sharded: make_model() returned a sharded model; it must build the model "
                                 "unsharded, prepared as `model` was before fully_shard")
            copy.load_state_dict(state)
            copy.eval()
            done = collapse(copy, threshold, **kwargs)
        except Exception as error:  # said to every rank, which would otherwise wait for rank 0 forever
            failure = error
    if distributed:  # the names, or rank 0's error as text (any exception pickles as that)
        said = [None if not rank0 else (list(done), done.left) if failure is None
                else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(said, src=0)
        if not rank0 and isinstance(said[0], str):
            raise RuntimeError(f"collapse_sharded failed on rank 0: {said[0]}")
        if not rank0:
            done = Collapsed(*said[0])
    if failure is not None:
        raise failure
    return copy, done


def fuse_blocks(model: nn.Module, names: list[str]) -> None:
    """Fuse the named prepared blocks as they are, in this order, unchecked: `from_pretrained`'s replay of a
    collapse on a model just rebuilt from its config (the fused weights are loaded after)."""
    acts = blocks(model)
    missing = [n for n in names if n not in acts]
    if missing:
        raise ValueError(f"collapse: {_listed(missing)}: no prepared block of that name to fuse")
    for name in names:
        base_path = _paths(name, acts[name])[0]
        _fuse(model.get_submodule(base_path) if base_path else model, acts[name].layout)


def _fuse(base: nn.Module, lay: SiteLayout) -> None:
    """W = W2·W1 (BatchNorms between folded), in the second layer's place; the rest become identities."""
    first, second = base.get_submodule(lay.first), base.get_submodule(lay.second)
    w, b = affine(first)
    for m in (*(base.get_submodule(p) for p in lay.batchnorms), second):
        wm, bm = affine(m)
        w, b = wm @ w, wm @ b + bm
    # the fused layer takes the second layer's place, so a chain of blocks collapses front to back
    _replace(base, lay.second, fused(w, b, like=second))
    for path in (lay.first, *lay.batchnorms, lay.slot):
        _replace(base, path, nn.Identity())


def _replace(base: nn.Module, path: str, new: nn.Module) -> None:
    """`new` in the place of the module at `path`, with its site tags: a shared activation learns from them which
    site a call is for, this block's (its feeder became an identity) or the next block's (fed by the second layer).
    A tagged identity hands on a new tensor object (a view): a tag names a tensor by its identity, and the
    block's input itself may reach the shared activation elsewhere, where the tag must not apply."""
    tags = [h for h in base.get_submodule(path)._forward_hooks.values() if isinstance(h, SiteTag)]
    if tags and type(new) is nn.Identity:
        new = AliasIdentity()
    for hook in tags:
        new.register_forward_hook(hook)
    set_module(base, path, new)


class AliasIdentity(nn.Identity):
    """The identity, returning a view of its input (a new tensor object; no node in an ONNX export)."""

    def forward(self, x):
        return torch.ops.aten.alias(x)

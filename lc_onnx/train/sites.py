"""LayerCollapse sites from a recorded forward pass: an activation module whose input is exactly the output
of one linear layer (nn.Linear, HF Conv1D, pointwise Conv1d/2d/3d) and whose output goes only into exactly one linear
layer (through eval-mode Dropout and Identity, which pass the same tensor on, and a BatchNorm over the layers'
feature dim, which folds). Any other use of a tensor in
between — a residual, a norm, a second consumer, a gate multiply, a model output — means no site.

As torch's own Conv+BN fusion skips a pair whose intermediate has other users, this trusts the data flow,
never module names: a module called `fc1` next to one called `act` is no evidence that one feeds the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from lc_onnx.train import layers
from lc_onnx.train.prelu import LayerCollapsePReLU, SharedActivation
from lc_onnx.train.trace import Call, Record


@dataclass(frozen=True)
class Site:
    """One block `first → [batchnorms] → act → [batchnorms] → second`, as qualified module paths."""

    act: str
    first: str
    second: str
    batchnorms: tuple[str, ...] = ()
    feeder: str = ""  # the module whose output the activation reads (first, or a BatchNorm after it)
    width: int = 0  # hidden features, the first layer's outputs
    channel_dim: int = -1  # the dim they lie on: -1, or 1 for pointwise convolutions (batched inputs)
    shared: bool = False  # the activation module is also called elsewhere: it needs a per-site switch
    key: str = "0"  # this site's index among those of a shared activation
    order: int = 0  # when the forward pass reaches it: blocks chained in a row collapse front to back
    passing: tuple[str, ...] = ()  # modules called on a tensor of the block that hand it on unchanged (Dropout)

    @property
    def name(self) -> str:
        return f"{self.act}.sites.{self.key}" if self.shared else self.act


def _is_batchnorm(call: Call) -> bool:
    return layers.is_batchnorm(call.module) and call.exact


def _is_layer(call: Call) -> bool:
    """A linear layer whose output was its weights' map of its input (no hook or override changed it); the
    only modules it may call are those computing a parametrized weight (weight_norm, spectral_norm)."""
    return layers.is_linear(call.module) and call.exact and (call.children == 0 or is_parametrized(call.module))


def _fits(first: Call, second: Call, norms: list[Call]) -> bool:
    """Both layers are of one kind, so they map the same dim of same-rank tensors (Linear/Conv1D the last, a
    pointwise ConvNd the channels of an N-d input: a Conv1d and a Conv2d never pair), and each norm between
    normalizes that dim."""
    dim = layers.feature_dim(first.module)
    return layers.kind(first.module) == layers.kind(second.module) and all(
        layers.norm_fits(n.module, n.inputs[0].dim(), dim) for n in norms)


def _has(items: list[torch.Tensor], t: torch.Tensor) -> bool:
    return any(i is t for i in items)


@dataclass
class _Occurrence:
    first: Call
    before: list[Call]  # BatchNorm calls between the first layer and the activation
    act: Call
    after: list[Call]  # between the activation and the second layer
    second: Call


def _back(rec: Record, consumer: Call, t: torch.Tensor) -> tuple[Call, list[Call]] | None:
    """The linear call whose output reaches `consumer` (through BatchNorms), if `t` is used nowhere else."""
    norms: list[Call] = []
    while True:
        producer = rec.creator(t)
        if producer is None or not _has(producer.outputs, t) or _has(rec.model_outputs, t):
            return None
        in_place = _has(consumer.outputs, t)  # ReLU(inplace=True): the uses after it are the next layer's
        for use in rec.uses_of(t):
            if not (producer.spans(use) or consumer.spans(use) or in_place and use >= consumer.end):
                return None
        if _is_layer(producer):
            return producer, norms[::-1]
        if not _is_batchnorm(producer):
            return None
        norms.append(producer)
        consumer, t = producer, producer.inputs[0]


def _forward(rec: Record, producer: Call, t: torch.Tensor) -> tuple[Call, list[Call]] | None:
    """The linear call that alone reads `t` (through BatchNorms), if `t` is used nowhere else."""
    norms: list[Call] = []
    while True:
        if _has(rec.model_outputs, t):
            return None
        later = [u for u in rec.uses_of(t) if u >= producer.end]
        if not later or rec.ops[later[0]].call is None:
            return None
        consumer = rec.calls[rec.ops[later[0]].call]
        if not consumer.inputs or consumer.inputs[0] is not t or not all(consumer.spans(u) for u in later):
            return None
        if _is_layer(consumer):
            return consumer, norms
        if not _is_batchnorm(consumer):
            return None
        norms.append(consumer)
        producer, t = consumer, consumer.outputs[0]


def _activation_call(rec: Record, call: Call) -> bool:
    """A leaf module call that maps one floating tensor to one of the same shape, doing some work. A
    SharedActivation left by an earlier `prepare` counts as the activation it wraps (so its sites keep their
    keys), and the modules inside it do not."""
    if call.parent is not None and isinstance(rec.calls[call.parent].module, SharedActivation):
        return False
    if (call.children and not isinstance(call.module, SharedActivation) or call.start == call.end
            or len(call.inputs) != 1 or len(call.outputs) != 1 or isinstance(call.module, nn.Identity)):
        return False
    x, y = call.inputs[0], call.outputs[0]
    return x.is_floating_point() and x.shape == y.shape and x.numel() > 1 and not layers.is_linear(call.module)


@torch.no_grad()
def elementwise(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` applies one function to each element alone: permuting the input's elements permutes
    the output's the same way (true of GELU, SiLU, BLOOM's own gelu; false of LayerNorm, Softmax,
    per-channel scales)."""
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0)).to(x.device)
    try:
        base = module(x.clone()).reshape(-1)
        moved = module(x.clone().reshape(-1)[perm].reshape(x.shape)).reshape(-1)
    except Exception:  # noqa: BLE001 - a module that cannot run alone is no activation we can swap
        return False
    return moved.shape == base.shape and torch.allclose(moved, base[perm], rtol=1e-4, atol=1e-6)


def is_torch_prelu(module: nn.Module) -> bool:
    """torch's own nn.PReLU (a subclass with its own forward may compute anything: it is probed as any module)."""
    return isinstance(module, nn.PReLU) and type(module).forward is nn.PReLU.forward


def prelu_on_features(module: nn.PReLU, x: torch.Tensor, dim: int) -> bool:
    """Whether an nn.PReLU's slopes act on the site's features alone: one slope, or one per entry of dim 1, where
    torch puts them whatever the rank, and that dim is the features: the channels of a batched conv input (dim
    1) or the units of a 2-D Linear input. On a Linear's (N, T, C) output they are per position T (torch runs it
    only when T == C), which no folded layer computes."""
    if module.num_parameters == 1:
        return True
    return x.dim() >= 2 and (dim == 1 or x.dim() == 2) and x.shape[1] == module.num_parameters


def is_activation(module: nn.Module, x: torch.Tensor, dim: int = -1) -> bool:
    """Elementwise; a PReLU an earlier `prepare` put there (per-channel slopes, once trained apart, are no
    longer one function of each element, yet they act on the layers' features alone, so the site stays); or a
    model's own nn.PReLU whose slopes act on the features `dim` of the site (decided from its layout, not probed:
    trained per-channel slopes fail the probe, and equal ones on the wrong dim would pass it)."""
    if isinstance(module, LayerCollapsePReLU):
        return True
    if is_torch_prelu(module):
        return prelu_on_features(module, x, dim)
    return elementwise(module, x)


def find(rec: Record) -> tuple[list[Site], list[str]]:
    """Sites in the record, and one line for each site that cannot be prepared: an activation called as a
    function between two linear layers (no module to swap), a module of a site registered under two names
    (swapping one name would leave the other), a TorchScript submodule (no hooks see inside it), an nn.PReLU
    whose per-channel slopes are not on the layers' features, a layer subclass with its own forward, a hidden
    width or a weight the forward reads outside the block."""
    occurrences, overridden = [], []
    for call in rec.calls:
        if not _activation_call(rec, call):
            continue
        overridden += _overridden_neighbours(rec, call)
        back = _back(rec, call, call.inputs[0])
        ahead = _forward(rec, call, call.outputs[0]) if back else None
        if back and ahead and _fits(back[0], ahead[0], back[1] + ahead[1]):
            occurrences.append(_Occurrence(back[0], back[1], call, ahead[1], ahead[0]))
    found, reported = _group(rec, occurrences)
    opaque = [f"{name}: a TorchScript module, which prepare() cannot see inside; prepare the model before "
              "torch.jit.script/trace" for name in rec.opaque]
    return found, _functional(rec) + list(dict.fromkeys(overridden)) + reported + opaque


def _overridden_neighbours(rec: Record, act: Call) -> list[str]:
    """A line for a layer subclass with its own forward (a LoRA Linear) that feeds `act` or reads its output:
    it is no linear layer to fold, and the user may want to merge it first."""
    around = [rec.creator(act.inputs[0])]
    later = [u for u in rec.uses_of(act.outputs[0]) if u >= act.end]
    if later and rec.ops[later[0]].call is not None:
        around.append(rec.calls[rec.ops[later[0]].call])
    return [f"{c.name} ({type(c.module).__name__}) -> {act.name}: {c.name} is a subclass of "
            f"{type(c.module).__mro__[1].__name__} whose own forward also reads "
            f"{', '.join(layers.extra_state(c.module))}, so it may compute more than its weights (a LoRA adapter "
            "path) and its block is not prepared (merge that into the weights first, as peft's merge_and_unload "
            "does)"
            for c in around if c is not None and (layers.is_dense(c.module) or layers.is_pointwise_conv(c.module))
            and layers.extra_state(c.module)]


def _group(rec: Record, occurrences: list[_Occurrence]) -> tuple[list[Site], list[str]]:
    """One site per (first, norms, act, second) modules, kept only when every call of its linear layers
    and norms is one of its occurrences (a layer also used elsewhere cannot be fused away) and none of its
    modules has a second name (an alias), which a swap under the first would miss; a line for each alias and
    each nn.PReLU whose slopes are not on the features."""
    groups: dict[tuple, list[_Occurrence]] = {}
    for occ in occurrences:
        mods = (occ.first, *occ.before, occ.act, *occ.after, occ.second)
        groups.setdefault(tuple(id(c.module) for c in mods), []).append(occ)
    probed: dict[tuple[int, int], bool] = {}
    reported: list[str] = []
    sites_of_act: dict[int, list[_Occurrence]] = {}
    for occs in groups.values():
        occ = occs[0]
        fused = [occ.first, *occ.before, *occ.after, occ.second]
        if any(len(rec.calls_of[id(c.module)]) != len(occs) for c in fused):
            continue
        if len({id(c.module) for c in fused}) != len(fused):
            continue
        aliases = [rec.paths[id(c.module)] for c in (*fused, occ.act) if len(rec.paths[id(c.module)]) > 1]
        if aliases:
            reported.append(f"{occ.first.name} -> {occ.act.name} -> {occ.second.name}: {aliases[0][0]} is also "
                           f"{', '.join(aliases[0][1:])} in the model, and the forward may call either name, "
                           "so it is not prepared (register the module once)")
            continue
        outside = _read_outside(rec, occs)
        if outside:
            reported.append(f"{occ.first.name} -> {occ.act.name} -> {occ.second.name}: {outside}, so it is not "
                            "prepared")
            continue
        act, dim = occ.act.module, layers.feature_dim(occ.first.module)
        if (id(act), dim) not in probed:
            probed[id(act), dim] = is_activation(act, occ.act.inputs[0], dim)
            if not probed[id(act), dim] and is_torch_prelu(act):
                reported.append(_prelu_off_features(occ))
        if probed[id(act), dim]:
            sites_of_act.setdefault(id(act), []).extend(occs)
    sites = []
    for occs in sites_of_act.values():
        calls_of_act = len(rec.calls_of[id(occs[0].act.module)])
        firsts = list(dict.fromkeys(id(o.first.module) for o in occs))
        shared = calls_of_act != len(occs) or len(firsts) > 1
        for key, first in enumerate(firsts):
            occ = next(o for o in occs if id(o.first.module) == first)
            feeder = (occ.before[-1] if occ.before else occ.first).name
            site = Site(occ.act.name, occ.first.name, occ.second.name,
                        tuple(c.name for c in (*occ.before, *occ.after)), feeder,
                        layers.out_features(occ.first.module), layers.feature_dim(occ.first.module), shared,
                        str(key), occ.act.index, _passing(rec, occ))
            sites.append(site)
    return sorted(sites, key=lambda site: site.order), reported


def _passing_calls(rec: Record, occ: _Occurrence) -> list[Call]:
    """Module calls between the two layers on a tensor of the block that hand that same tensor on (eval
    Dropout, Identity): they run no op, so the data flow does not see them, but `collapse` must check them for
    hooks, which would run on the block's input once it is fused."""
    own = {c.index for c in (occ.first, *occ.before, occ.act, *occ.after, occ.second)}
    return [c for c in rec.calls[occ.first.index + 1:occ.second.index]
            if c.index not in own and len(c.inputs) == len(c.outputs) == 1 and _has(_hidden(occ), c.inputs[0])
            and c.outputs[0] is c.inputs[0]]


def _hidden(occ: _Occurrence) -> list[torch.Tensor]:
    """The tensors between the two layers: the ones a collapse removes."""
    return [c.outputs[0] for c in (occ.first, *occ.before, occ.act, *occ.after)]


def _passing(rec: Record, occ: _Occurrence) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c.name for c in _passing_calls(rec, occ)))


def _read_outside(rec: Record, occs: list[_Occurrence]) -> str:
    """Why the block's own calls are not all that depends on what collapse changes: the forward reads a hidden
    tensor's shape elsewhere (`h.shape[-1]` for a 1/sqrt(width) scale: the fused block has no such width), or
    reads a fused layer's weight elsewhere (a tied decoder's `fc2.weight.t()`: the weight is gone, or replaced by
    the fused one). "" when neither."""
    for occ in occs:
        own = {c.index for c in (occ.first, *occ.before, occ.act, *occ.after, occ.second, *_passing_calls(rec, occ))}
        for t, producer in zip(_hidden(occ), (occ.first, *occ.before, occ.act, *occ.after), strict=True):
            if any(not rec.within(c, own) for c in rec.shape_reads.get(id(t), [])):
                return (f"the forward reads the shape of {producer.name}'s output outside the block (h.shape, "
                        "h.size()), so the hidden width matters to what follows, and collapse removes it")
    for c in (occs[0].first, *occs[0].before, *occs[0].after, occs[0].second):
        calls = set(rec.calls_of[id(c.module)])
        for name, t in [*c.module.named_parameters(), *c.module.named_buffers()]:
            if any(not rec.within(rec.ops[u].call, calls) for u in rec.uses_of(t)):
                return (f"{c.name}.{name} is read outside {c.name}'s own call (a tied weight, a second module "
                        "holding the same parameter), which collapse would leave reading a weight that is gone")
    return ""


def _prelu_off_features(occ: _Occurrence) -> str:
    shape = tuple(occ.act.inputs[0].shape)
    return (f"{occ.first.name} -> {occ.act.name} -> {occ.second.name}: the nn.PReLU's "
            f"{occ.act.module.num_parameters} slopes act on dim 1 of its {shape} input (torch's channel dim), not "
            "on the layers' features (the last dim), so it is not prepared (use one slope, or put it where dim 1 "
            "is the features)")


def _functional(rec: Record) -> list[str]:
    """Single pointwise ops (F.gelu, torch.relu, …) run directly in a module's forward between two linear
    layers: the site is real, but there is no module to swap."""
    found = []
    for op in rec.ops:
        if torch.Tag.pointwise not in getattr(op.func, "tags", ()) or len(op.inputs) != 1 or len(op.outputs) != 1:
            continue
        if op.call is None or rec.calls[op.call].children == 0:  # inside a leaf: an activation module's own op
            continue
        x, y = op.inputs[0], op.outputs[0]
        if not x.is_floating_point() or x.shape != y.shape or x is y:
            continue
        stand_in = Call(-1, rec.calls[op.call].module, rec.calls[op.call].name, None, op.index, op.index + 1,
                        [x], [y])
        back = _back(rec, stand_in, x)
        ahead = _forward(rec, stand_in, y) if back else None
        if back and ahead and _fits(back[0], ahead[0], back[1] + ahead[1]):
            name = str(op.func).split(".")[1] if "." in str(op.func) else str(op.func)
            found.append(f"{back[0].name} -> {name} -> {ahead[0].name}: the activation is a function call in "
                         f"the forward of {rec.calls[op.call].name or 'the model'}, not a module, so it cannot be "
                         "swapped for a PReLU (make it an nn.Module attribute)")
    return list(dict.fromkeys(found))

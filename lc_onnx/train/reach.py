"""Whether the forward pass reaches a module through its registered name. `prepare` swaps modules by name and
`collapse` replaces them by name; a forward that holds a module elsewhere too (a plain list, a closure, a
functools.partial) keeps calling the old object, so the swap does nothing or, worse, only part of a block is
replaced and the collapsed model computes something else. The recorded pass cannot tell: it sees the object,
not the way to it. So each module is put back under its name as a stand-in (same class, same parameters,
buffers and hooks) that counts the calls it gets, and the model runs once more: a module called, even once,
other than through its name is not reached."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lc_onnx.train import sites, trace
from lc_onnx.train.sites import Site
from lc_onnx.train.trace import first_line, run  # run: the call the recorded pass made


def _stand_in(module: nn.Module, path: str, by_name: Counter) -> nn.Module:
    """An object of a subclass of the module's class, sharing its state, that counts a call under `path` and
    hands it to the module itself (its hooks, a forward replaced on the instance, a compiled call all run)."""
    cls = type(module)

    def __call__(self, *args, **kwargs):
        by_name[path] += 1
        return module(*args, **kwargs)

    def __getattr__(self, name):  # what the shared __dict__ lacks: slots, and nn.Module's own lookups
        return getattr(module, name)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__getattr__": __getattr__, "__module__": cls.__module__})
    stand_in = sub.__new__(sub)
    stand_in.__dict__.update(module.__dict__)  # the same parameter, buffer, submodule and hook dicts
    return stand_in


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """`module` in the place of the one at `path` (a dotted name) under `root`."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def unreached(model: nn.Module, example_inputs, paths: list[str]) -> set[str]:
    """The paths among `paths` whose module the forward calls, any time, other than through that name (or not
    at all), run as the recorded pass ran (eval mode, no grad): each call is counted twice, by a stand-in under
    the name and by a pre-hook on the module itself. The model is left as it was."""
    by_name: Counter = Counter()
    calls: Counter = Counter()
    originals = {p: model.get_submodule(p) for p in dict.fromkeys(paths)}
    # the originals run (the stand-ins hand them each call) and `run` puts only what it finds in eval mode: put
    # them there first, or a BatchNorm in a model in train mode would update its running stats
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        model.eval()
        handles += [m.register_forward_pre_hook(lambda *_, p=p: calls.update([p]), prepend=True)
                    for p, m in originals.items()]
        for p, m in originals.items():
            set_module(model, p, _stand_in(m, p, by_name))
        with torch.no_grad():
            run(model, example_inputs)
    except Exception as e:
        raise ValueError(f"the model ran on example_inputs once but not a second time, with the site modules "
                         f"under their names as stand-ins that count their calls ({type(e).__name__}: "
                         f"{first_line(e)})") from e
    finally:
        for h in handles:
            h.remove()
        for p, m in originals.items():
            set_module(model, p, m)
        for m, training in modes.items():
            m.training = training
    return {p for p in originals if not calls[p] or by_name[p] < calls[p]}


def proven_sites(model: nn.Module, example_inputs) -> tuple[list[Site], list[str]]:
    """The sites a recorded forward pass proves (`sites.find`) whose modules it also reaches through their
    names, and a line for each site or activation it cannot prepare."""
    found, lines = sites.find(trace.record(model, example_inputs))
    kept, aliased = _by_name(model, example_inputs, found)
    return kept, lines + aliased


def _by_name(model: nn.Module, example_inputs, found: list[Site]) -> tuple[list[Site], list[str]]:
    """The sites whose modules the forward calls through their registered names, and a line for each other:
    prepare swaps the activation by name and collapse replaces the layers by name, which does not take where
    the forward holds the module elsewhere too (then the PReLU never runs, or only part of the block is fused)."""
    def paths(s: Site) -> list[str]:
        return [s.first, *s.batchnorms, s.act, s.second]

    missed = unreached(model, example_inputs, [p for s in found for p in paths(s)]) if found else set()
    kept, lines = [], []
    for s in found:
        lost = [p for p in paths(s) if p in missed]
        if lost:
            lines.append(f"{s.first} -> {s.act} -> {s.second}: the forward does not call {', '.join(lost)} through "
                         f"its registered name (it holds the module elsewhere too: a plain list, a closure, a "
                         f"partial), so a swap by name would not take; not prepared")
        else:
            kept.append(s)
    return kept, lines

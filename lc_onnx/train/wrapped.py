"""The order with distributed engines: `prepare` the bare model, then wrap it (DDP, FSDP's `fully_shard`,
`accelerator.prepare`, Lightning's strategy). A wrapper built before `prepare` never sees the new slopes: DDP's
reducer does not average their gradients, so the ranks drift apart and collapse different blocks, silently. And
after `collapse`, an optimizer or a DDP wrapper built before it still holds the replaced layers' parameters:
training on would leave the fused layers frozen (and the ranks apart). Both are said in one line instead."""

from __future__ import annotations

import gc

import torch
from torch import nn

WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _fsdp1() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return ()
    return (FullyShardedDataParallel,)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _holders(model: nn.Module) -> list[nn.Module]:
    """Wrappers (DDP, DataParallel, FSDP) that hold `model` or a module inside it."""
    kinds = WRAPPERS + _fsdp1()
    inside = {id(m) for m in model.modules()}
    # issubclass(type(...)): isinstance would also ask each object's __class__, which deprecated proxies warn on
    return [obj for obj in gc.get_objects() if issubclass(type(obj), kinds) and obj is not model
            and id(getattr(obj, "module", None)) in inside]


def why_wrapped(model: nn.Module) -> str:
    """Why `model` is already wrapped for distributed training, or ""."""
    if isinstance(model, WRAPPERS + _fsdp1()):
        return f"the model is a {type(model).__name__}"
    if any(_is_dtensor(p) for p in model.parameters()):
        return "its parameters are DTensors (FSDP's fully_shard or tensor parallel sharded it)"
    if getattr(model, "_is_accelerate_prepared", False):
        return "accelerator.prepare() has prepared it"
    held = _holders(model)
    if held:
        gc.collect()  # a wrapper the user dropped may only be waiting for the cycle collector
        held = _holders(model)
    if held:
        return f"a {type(held[0]).__name__} wraps it (its gradient sync would not see the new slopes)"
    return ""


def refuse_wrapped(model: nn.Module) -> None:
    reason = why_wrapped(model)
    if reason:
        raise ValueError(f"prepare: {reason}; prepare the bare model first, then wrap it (DDP, fully_shard, "
                         "accelerator.prepare, Lightning's strategy): a wrapper made before prepare never syncs the "
                         "slopes, and the ranks drift apart")


class _Stale:
    """A hook on an optimizer's step or a wrapper's forward that stops training on after `collapse` replaced
    parameters it holds (a class, so a model or optimizer with it still pickles)."""

    def __init__(self, what: str, blocks: list[str]):
        self.what, self.blocks = what, blocks

    def __call__(self, *args, **kwargs):
        shown = ", ".join(self.blocks[:3]) + (f" and {len(self.blocks) - 3} more" if len(self.blocks) > 3 else "")
        raise RuntimeError(f"{self.what} was built before collapse() fused {shown}, and still holds the replaced "
                           "layers' parameters (the fused layers would not train, and DDP ranks would drift); build "
                           "a new optimizer (and DDP wrapper, or Trainer) for the collapsed model")


def guard_stale(model: nn.Module, replaced: list[nn.Parameter], blocks: list[str]) -> None:
    """Make each optimizer holding a parameter in `replaced`, and each wrapper holding `model`, refuse the next
    step or forward with one line: training on with them would silently freeze the fused layers."""
    ids = {id(p) for p in replaced}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.optim.Optimizer) and any(
                id(p) in ids for group in obj.param_groups for p in group["params"]):
            obj.register_step_pre_hook(_Stale(f"the optimizer {type(obj).__name__}", blocks))
    for wrapper in _holders(model) + ([model] if isinstance(model, WRAPPERS + _fsdp1()) else []):
        wrapper.register_forward_pre_hook(_Stale(f"the {type(wrapper).__name__} wrapper", blocks))

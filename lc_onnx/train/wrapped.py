"""The order with distributed engines: `prepare` the bare model, then wrap it (DDP, FSDP's `fully_shard`,
`accelerator.prepare`, Lightning's strategy). A wrapper built before `prepare` never sees the new slopes: DDP's
reducer does not average their gradients, so the ranks drift apart and collapse different blocks, silently. And
after `collapse`, an optimizer or a DDP wrapper built before it still holds the replaced layers' parameters:
training on would leave the fused layers frozen (and the ranks apart). Both are said in one line instead."""

from __future__ import annotations

import gc

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from lc_onnx.train.regularize import sharded

WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)  # a module holding a model of its own


def _fsdp1() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return ()
    return (FullyShardedDataParallel,)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _holders(model: nn.Module) -> list[nn.Module]:
    """Wrappers (DDP, DataParallel, FSDP) that hold `model` or a module inside it."""
    kinds = WRAPPERS + _fsdp1()
    inside = {id(m) for m in model.modules()}
    # issubclass(type(...)): isinstance would also ask each object's __class__, which deprecated proxies warn on
    return [obj for obj in gc.get_objects() if issubclass(type(obj), kinds) and obj is not model
            and id(getattr(obj, "module", None)) in inside]


def why_wrapped(model: nn.Module) -> str:
    """Why `model` is already wrapped for distributed training, or ""."""
    if isinstance(model, WRAPPERS):
        return f"the model is a {type(model).__name__}"
    if getattr(model, "_is_accelerate_prepared", False):
        return "accelerator.prepare() has prepared it"
    if not _distributed():  # DDP, FSDP and DTensors need a process group; DataParallel replicates the module
        return ""
    if isinstance(model, _fsdp1()):
        return f"the model is a {type(model).__name__}"
    if any(sharded(p) for p in model.parameters()):
        return "its parameters are DTensors (FSDP's fully_shard or tensor parallel sharded it)"
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
    """A forward pre-hook on a DDP wrapper built before `collapse` (a class, so the model still pickles)."""

    def __init__(self, what: str, blocks: list[str]):
        self.what, self.blocks = what, blocks

    def __call__(self, *args, **kwargs):
        raise RuntimeError(_stale_message(self.what, self.blocks))


def _stale_message(what: str, blocks: list[str]) -> str:
    shown = ", ".join(blocks[:3]) + (f" and {len(blocks) - 3} more" if len(blocks) > 3 else "")
    return (f"{what} was built before collapse() fused {shown}, and still holds the replaced layers' parameters "
            "(the fused layers would not train, and DDP ranks would drift); build a new optimizer (and DDP wrapper, "
            "or Trainer) for the collapsed model")


_REPLACED = WeakIdKeyDictionary()  # parameter -> the blocks whose collapse replaced it (gone with the parameter)
_hook = None


def _check_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A global optimizer step pre-hook: refuse a step of an optimizer that holds a replaced parameter."""
    if not _REPLACED:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            blocks = _REPLACED.get(p)
            if blocks is not None:
                raise RuntimeError(_stale_message(f"the optimizer {type(optimizer).__name__}", blocks))


def guard_stale(model: nn.Module, replaced: list[nn.Parameter], blocks: list[str]) -> None:
    """Make each optimizer holding a parameter in `replaced`, and each DDP wrapper holding `model`, refuse the next
    step or forward with one line: training on with them would silently freeze the fused layers. Optimizers are
    checked by one global step pre-hook (only while replaced parameters are alive); wrappers exist only under an
    initialized process group, and only then are they looked for."""
    global _hook
    for p in replaced:
        _REPLACED[p] = blocks
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_step)
    wrappers = _holders(model) if _distributed() else []
    for wrapper in wrappers + ([model] if isinstance(model, WRAPPERS) else []):
        wrapper.register_forward_pre_hook(_Stale(f"the {type(wrapper).__name__} wrapper", blocks))

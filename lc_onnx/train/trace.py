"""Record one forward pass: every module call (its span, inputs and outputs), every ATen op run inside it
(which tensors it read and wrote), and whether each linear layer's or BatchNorm's output is the affine map of
its input that its weights say (what `collapse` would fold). HF models often cannot be traced symbolically, so
the record comes from forward hooks on all modules plus a TorchDispatchMode; tensors are told apart by identity
and kept alive for the record's lifetime, so no id is reused."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from lc_onnx.train import layers


def map_tensors(fn, value):
    """`value` (example inputs: a tensor, or tensors in tuples, lists and dicts) with `fn` applied to each tensor."""
    return tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, value)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a model's own error can run over many)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def tensors(value) -> list[torch.Tensor]:
    """The tensors in nested args, kwargs, tuples, dicts and HF ModelOutputs."""
    if hasattr(value, "to_tuple") and callable(value.to_tuple):  # transformers.utils.ModelOutput
        value = value.to_tuple()
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


@dataclass
class Call:
    index: int
    module: nn.Module
    name: str
    parent: int | None
    start: int  # first op index inside the call
    end: int = -1  # one past the last op index
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    children: int = 0  # module calls made directly inside this one
    exact: bool = False  # a linear layer or BatchNorm whose output is its own affine map of its input

    def spans(self, op: int) -> bool:
        return self.start <= op < self.end


@dataclass
class Op:
    index: int
    func: object  # an OpOverload
    call: int | None  # innermost module call running when it ran
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


@dataclass
class Record:
    calls: list[Call]
    ops: list[Op]
    model_outputs: list[torch.Tensor]
    created: dict[int, int]  # id(tensor) -> index of the op that first wrote it
    uses: dict[int, list[int]]  # id(tensor) -> indices of the ops that read it
    calls_of: dict[int, list[int]]  # id(module) -> its call indices
    paths: dict[int, list[str]]  # id(module) -> every name it has in the model (more than one: an alias)
    opaque: list[str]  # TorchScript submodules: hooks cannot see inside them
    shape_reads: dict[int, list[int | None]] = field(default_factory=dict)  # id(tensor) -> the innermost calls
    # running when its shape, size or element count was read (no ATen op runs for that, so `ops` misses it)

    def creator(self, t: torch.Tensor) -> Call | None:
        """The innermost module call during which the op that made `t` ran."""
        op = self.created.get(id(t))
        if op is None or self.ops[op].call is None:
            return None
        return self.calls[self.ops[op].call]

    def uses_of(self, t: torch.Tensor) -> list[int]:
        return self.uses.get(id(t), [])

    def within(self, call: int | None, outer: set[int]) -> bool:
        """Whether module call `call` is one of `outer` or runs inside one of them."""
        while call is not None:
            if call in outer:
                return True
            call = self.calls[call].parent
        return False


# reading these tells the forward a tensor's width: a collapse that changes the width changes what follows
# Tensor methods, and torch.numel; nbytes and the storage tell the width too
_SHAPE_METHODS = {"size", "numel", "nelement", "__len__", "stride", "untyped_storage", "storage"}


class _ShapeRecorder(TorchFunctionMode):
    """Which module call reads which tensor's shape (`h.shape[-1]`, `h.size(-1)`): no ATen op runs for it."""

    def __init__(self, stack: list[int], reads: dict[int, list[int | None]], kept: list[torch.Tensor]):
        super().__init__()
        self.stack, self.reads, self.kept, self.paused = stack, reads, kept, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and args and isinstance(args[0], torch.Tensor) and (
                getattr(func, "__name__", None) in _SHAPE_METHODS
                or getattr(func, "__self__", None) in (torch._C.TensorBase.shape, torch._C.TensorBase.nbytes)):
            self.reads.setdefault(id(args[0]), []).append(self.stack[-1] if self.stack else None)
            self.kept.append(args[0])  # alive for the record's lifetime, so its id is not reused
        return func(*args, **(kwargs or {}))


class _OpRecorder(TorchDispatchMode):
    def __init__(self, stack: list[int], ops: list[Op]):
        super().__init__()
        self.stack, self.ops, self.paused = stack, ops, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:  # paused: the recorder's own checks, not the model's ops
            self.ops.append(Op(len(self.ops), func, self.stack[-1] if self.stack else None,
                               tensors((args, kwargs)), tensors(out)))
        return out


def _check_not_meta(model: nn.Module, example_inputs) -> None:
    """A meta tensor has a shape and no values: the pass would fail inside a layer, or in our own checks."""
    held = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, t in held if t.is_meta]
    if meta:
        raise ValueError(f"the model runs once on example_inputs, and its weights are on the meta device (no values; "
                         f"{meta[0]} and {len(meta) - 1} more): load them first (model.to_empty(device=...) and "
                         "load_state_dict, or from_pretrained without a meta device)")
    if any(t.is_meta for t in tensors(example_inputs)):
        raise ValueError("the model runs once on example_inputs, and example_inputs are on the meta device "
                         "(no values): pass real tensors on the model's device")


def run(model: nn.Module, example_inputs):
    """`model` called once in eval mode on a tuple of positional inputs, a dict of keyword inputs or one tensor,
    with torch's fused transformer kernels off (they call no submodules); its modes are restored after."""
    modes = {m: m.training for m in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if isinstance(example_inputs, dict):
            return model(**example_inputs)
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes.items():
            m.train(training)


@torch.no_grad()
def record(model: nn.Module, example_inputs) -> Record:
    """Run `model` once in eval mode on `example_inputs` (a tuple of positional inputs, a dict of keyword
    inputs, or one tensor) and return what ran. The model's train/eval modes are restored."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("prepare() records an eager model's forward pass; call it before torch.jit.script/trace")
    _check_not_meta(model, example_inputs)
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    names = {id(m): n for n, m in model.named_modules()}
    calls: list[Call] = []
    ops: list[Op] = []
    stack: list[int] = []
    recorder = _OpRecorder(stack, ops)
    shape_reads: dict[int, list[int | None]] = {}
    kept: list[torch.Tensor] = []
    shapes = _ShapeRecorder(stack, shape_reads, kept)

    def before(module, args, kwargs):
        if id(module) not in names:  # a module outside the model (a hook's own)
            return
        call = Call(len(calls), module, names[id(module)], stack[-1] if stack else None, len(ops),
                    inputs=tensors((args, kwargs)))
        if stack:
            calls[stack[-1]].children += 1
        calls.append(call)
        stack.append(call.index)

    def after(module, args, kwargs, output):
        if id(module) not in names or not stack:
            return
        call = calls[stack.pop()]
        call.end, call.outputs = len(ops), tensors(output)
        if (layers.is_linear(module) or layers.is_batchnorm(module)) and len(call.inputs) == len(call.outputs) == 1:
            # checked now: an in-place activation may overwrite the output later in the pass
            recorder.paused = shapes.paused = True
            try:
                call.exact = layers.reproduces(module, call.inputs[0], call.outputs[0])
            finally:
                recorder.paused = shapes.paused = False

    scripted = [m for m in model.modules() if isinstance(m, torch.jit.ScriptModule)]  # they take no Python hooks
    hooked = [m for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
    # prepended, so the inputs recorded are those before any hook of the model's own changes them
    handles = [m.register_forward_pre_hook(before, with_kwargs=True, prepend=True) for m in hooked]
    handles += [m.register_forward_hook(after, with_kwargs=True, always_call=True) for m in hooked]
    try:
        with shapes, recorder:
            out = run(model, example_inputs)
    except Exception as e:
        raise ValueError(f"the model did not run on example_inputs ({type(e).__name__}: {first_line(e)}); pass a tuple "
                         "of positional inputs or a dict of keyword inputs that model(...) accepts") from e
    finally:
        for h in handles:
            h.remove()
    created: dict[int, int] = {}
    uses: dict[int, list[int]] = {}
    for op in ops:
        for t in op.inputs:
            uses.setdefault(id(t), []).append(op.index)
        for t in op.outputs:
            created.setdefault(id(t), op.index)
    calls_of: dict[int, list[int]] = {}
    for call in calls:
        calls_of.setdefault(id(call.module), []).append(call.index)
    opaque = [names[id(m)] for m in scripted if not isinstance(model.get_submodule(names[id(m)].rpartition(".")[0]),
                                                                torch.jit.ScriptModule)]
    return Record(calls, ops, tensors(out), created, uses, calls_of, paths, opaque, shape_reads)

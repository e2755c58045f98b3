"""`export`: torch.onnx.export with settings that keep the PRelu chains visible to `lc-onnx optimize`, and
that get Hugging Face models through both torch exporters."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import torch
from torch import nn

from lc_onnx.train.prelu import LayerCollapsePReLU
from lc_onnx.train.trace import map_tensors


def export(model: nn.Module, example_inputs: tuple | dict | torch.Tensor, path: str | os.PathLike, *,
           dynamo: bool = False, attn_implementation: str | None = "eager", dtype: torch.dtype | None = None,
           dynamic: bool = True, **kw) -> None:
    """torch.onnx.export in eval mode: opset 17 for the legacy exporter, one file (no external data) for the
    new one unless asked. `example_inputs` is, as `prepare` takes it, a tuple (or list) of positional inputs, a
    dict of keyword inputs (HF style) or one tensor.

    `dtype` (torch.float16, torch.bfloat16, ...) exports the model in that floating dtype: its floating
    parameters and buffers, and the floating example inputs, are cast for the export only (the model gets its
    own tensors back after, not a round trip through the lower precision).

    For transformers models, during the export only (the model is restored after): `use_cache` is off (a cache
    object is not an ONNX output); the attention is `attn_implementation` ("eager": sdpa exports to the same
    MatMul/Softmax ops but fails in torch.export's decompositions for T5 and Swin and, with grouped KV heads as in
    Llama, in the legacy exporter; None keeps the model's); with `dynamo=False` transformers' packed-sequence
    check (torch.diff on position ids, which opset 17 cannot export, reached when no attention_mask is given) is
    off, so each row is one sequence.

    `dynamic` (the default) opens the batch dim (0) of every tensor input and the sequence dim (1) of token ids
    and masks (integer inputs of rank 2), as optimum does, so the file takes any batch and length; other dims
    (image sizes, a float input's length or channels) stay as exported. `dynamic=False` keeps the example's shapes, and
    `dynamic_axes=`/`dynamic_shapes=` in `kw` name the open dims yourself. Give an example batch of 2 or more
    (the dynamo exporter fixes dims of size 1)."""
    example_inputs = _as_inputs(example_inputs)
    model = _uncompiled(model)
    if isinstance(example_inputs, dict) and "kwargs" in kw:
        raise TypeError("export: pass keyword inputs either as the example_inputs dict or as kwargs=, not both")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"export: dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
    if dtype is not None:
        example_inputs = _cast_inputs(example_inputs, dtype)
    training = model.training
    model.eval()
    if dynamo:
        kw.setdefault("external_data", False)
    else:
        kw.setdefault("opset_version", 17)
    try:
        with _hf_settings(model, dynamo, attn_implementation), _cast_model(model, dtype), _prelu_ops(model):
            target, args = model, example_inputs if not isinstance(example_inputs, dict) else ()
            if isinstance(example_inputs, dict):
                names = _output_names(model, example_inputs)
                if names is not None:
                    kw.setdefault("output_names", names)
                kw.setdefault("input_names", list(example_inputs))
                if dynamo:
                    kw["kwargs"] = dict(example_inputs)
                else:
                    # the legacy exporter fills a keyword call up to the whole signature, so defaults such as
                    # HF's `logits_to_keep` would become graph inputs: call with exactly these keywords
                    target, args = _KeywordCall(model, list(example_inputs)), tuple(example_inputs.values())
            if dynamic and "dynamic_axes" not in kw and "dynamic_shapes" not in kw:
                _open_axes(example_inputs, kw, dynamo)
            try:
                if dynamo:
                    kw["custom_translation_table"] = {**_prelu_translation(),
                                                      **(kw.get("custom_translation_table") or {})}
                torch.onnx.export(target, args, str(path), dynamo=dynamo, **kw)
            except Exception as e:
                impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
                if impl in (None, "eager"):
                    raise
                first = _summary(e)
                raise RuntimeError(f"export: torch.onnx.export (dynamo={dynamo}) failed on {type(model).__name__} "
                                   f"with {impl} attention ({first}); pass attn_implementation='eager'") from e
    finally:
        model.train(training)


def _open_axes(inputs: tuple | dict, kw: dict, dynamo: bool) -> None:
    """Open each tensor input's batch dim, and the sequence dim of token ids and masks (integers of rank 2): a
    float input's dim 1 may be a length or a conv's channels, so it stays. Sequence dims of one example length
    share a name (ids and their mask); other lengths get their own (T5's encoder and decoder ids). The legacy
    exporter takes `dynamic_axes` by input name (positional inputs are named `input_0`, ... unless `input_names`
    names them); the dynamo exporter `dynamic_shapes` of named dims, shaped like the inputs. A non-tensor
    positional input leaves the shapes as they are (the graph's inputs would not follow that order)."""
    if not isinstance(inputs, dict):
        if not all(isinstance(v, torch.Tensor) for v in inputs):
            return
        kw.setdefault("input_names", [f"input_{i}" for i in range(len(inputs))])
    lengths: dict[int, str] = {}

    def axes(t) -> dict[int, str]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return {}
        if t.dim() == 2 and not (t.is_floating_point() or t.is_complex()):
            return {0: "batch", 1: lengths.setdefault(t.shape[1], "sequence" + (f"_{len(lengths)}" if lengths else ""))}
        return {0: "batch"}

    named = {k: axes(v) for k, v in (inputs.items() if isinstance(inputs, dict) else
                                      zip(kw["input_names"], inputs, strict=False))}
    if not dynamo:
        kw["dynamic_axes"] = {k: v for k, v in named.items() if v}
        return
    dims = {name: torch.export.Dim(name) for name in {n for v in named.values() for n in v.values()}}
    shapes = {k: {i: dims[n] for i, n in v.items()} or None for k, v in named.items()}
    kw["dynamic_shapes"] = shapes if isinstance(inputs, dict) else tuple(shapes.values())


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped: the legacy exporter cannot trace the wrapper ("using FX to
    torch.jit.trace a dynamo-optimized function"), and both exporters trace the eager code anyway."""
    return model._orig_mod if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod") else model


def _as_inputs(example_inputs) -> tuple | dict:
    """A dict of keyword inputs or a tuple of positional ones; one tensor is one input (not its rows)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return example_inputs if isinstance(example_inputs, dict) else tuple(example_inputs)


def _cast_inputs(inputs: tuple | dict, dtype: torch.dtype) -> tuple | dict:
    """The example inputs with every floating tensor in `dtype` (token ids, masks of ints stay as they are)."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, inputs)


@contextlib.contextmanager
def _cast_model(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Every floating parameter and buffer in `dtype` while the block runs (each tensor once: tied weights stay
    tied), then the original tensors back."""
    if dtype is None:
        yield
        return
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.dtype != dtype and id(t) not in kept:
            kept[id(t)] = (t, t.data)
    try:
        with torch.no_grad():
            for t, data in kept.values():
                t.data = data.to(dtype)
        yield
    finally:
        for t, data in kept.values():
            t.data = data


@contextlib.contextmanager
def _prelu_ops(model: nn.Module) -> Iterator[None]:
    """Per-channel slopes on the last dim (a Linear site on 3-D or larger inputs) export as one ONNX PRelu while
    the block runs, not as Where(x >= 0, x, x * slope)."""
    acts = [m for m in model.modules() if isinstance(m, LayerCollapsePReLU)]
    torch.onnx.register_custom_op_symbolic("lc_onnx::prelu_last_dim", _prelu_symbolic, 9)  # the legacy exporter
    for act in acts:
        act.exporting = True
    try:
        yield
    finally:
        for act in acts:
            act.exporting = False


def _prelu_symbolic(g, x, slope):
    return g.op("PRelu", x, slope)


def _prelu_translation() -> dict:
    """The dynamo exporter's translation of the op (onnxscript comes with that exporter)."""
    from onnxscript import opset18 as op

    def prelu(x, slope):
        return op.PRelu(x, slope)
    return {torch.ops.lc_onnx.prelu_last_dim.default: prelu}


def _summary(e: Exception) -> str:
    """One line of an exporter error: the underlying exception's line where torch.onnx gives a long report."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines()]
    lines = [x for x in lines if x]
    if "## Exception summary" in lines and lines.index("## Exception summary") + 1 < len(lines):
        return lines[lines.index("## Exception summary") + 1][:200]
    return lines[0][:200] if lines else type(e).__name__


class _KeywordCall(nn.Module):
    """`model(**dict(zip(keys, args)))`, for the legacy exporter, which takes positional inputs."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args):
        out = self.model(**dict(zip(self.keys, args, strict=True)))
        return tuple(out.values()) if isinstance(out, dict) else out


def _output_names(model: nn.Module, inputs: dict) -> list[str] | None:
    """The keys of an HF ModelOutput (`logits`, `last_hidden_state`, ...) when every value is one tensor."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return list(out.keys())
    return None


def _configs(model: nn.Module) -> list:
    """The transformers configs of the model and its submodels (each once)."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextlib.contextmanager
def _hf_settings(model: nn.Module, dynamo: bool, attn_implementation: str | None) -> Iterator[None]:
    configs = _configs(model)
    if not configs:
        yield
        return
    attn = [(c, c._attn_implementation_internal) for c in configs]
    cached = [c for c in configs if getattr(c, "use_cache", None) is True]
    patched = None
    try:
        for c in cached:
            c.use_cache = False
        if attn_implementation is not None:
            # the model itself or, in a wrapper, each transformers model inside it
            for m in model.modules():
                if hasattr(m, "set_attn_implementation") and hasattr(m, "config") \
                        and getattr(m.config, "_attn_implementation", None) != attn_implementation:
                    m.set_attn_implementation(attn_implementation)
        if not dynamo:
            patched = _no_packed_sequence_check()
        yield
    finally:
        if patched is not None:
            patched()
        for c in cached:
            c.use_cache = True
        for c, impl in attn:
            c._attn_implementation_internal = impl


def _no_packed_sequence_check():
    """Make transformers' packed-sequence detection say "not packed" (what it says in eager mode for a batch of
    ordinary rows); it returns the undo. Under jit tracing it always builds the check from torch.diff."""
    try:
        from transformers import masking_utils
    except ImportError:
        return None
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        return None
    masking_utils.find_packed_sequence_indices = lambda position_ids: None

    def undo():
        masking_utils.find_packed_sequence_indices = original
    return undo

"""`lc-onnx estimate`: what a LayerCollapse fine-tune would buy on this machine, measured before doing it. Each
`linear → activation → linear` block whose only obstacle is its activation is folded as if the activation were
the identity (the what-if graph: `passes.what_if`), and those graphs — one block at a time, and the last quarter,
half and all of them (the paper's layer-wise view) — are timed against the original with `bench`'s interleaved
timer. A what-if graph computes something else: it is never written as an optimized model; when kept for a look,
its file name and its metadata say what it is."""

from __future__ import annotations

import fnmatch
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

import passes.what_if
from lc_onnx import api, bench, io, shapes
from lc_onnx.errors import InputError

WHAT_IF_KEY = "lc_onnx.what_if"
WHAT_IF_NOTE = ("what-if model from lc-onnx estimate: activations taken out of its MLP blocks, so it computes "
                "something else; for timing only, never an optimized model")


def what_if(model: onnx.ModelProto, only: set[int] | None = None,
            tol: float = api.DEFAULT_TOL) -> tuple[onnx.ModelProto, int]:
    """The model with the blocks numbered in `only` (all when None) linearized and folded, with every chain
    lc-onnx folds at `tol` today, marked as a what-if in its metadata (and not stamped as lc-onnx's output); and
    how many such blocks the model has (chains within `tol` are none: they fold as they are)."""
    folded, blocks, _ = _what_if(model, only, tol)
    return folded, len(blocks)


def _what_if(model: onnx.ModelProto, only: set[int] | None,
             tol: float) -> tuple[onnx.ModelProto, list[list[str]], int]:
    """`what_if`, with each block's node names (in the blocks' order), and how many rewrites the fold made (with
    `only` empty: what lc-onnx folds now)."""
    graph, annotated, _ = api._import(api._open(model))
    found = passes.what_if.linearize(graph, only, tol)
    shapes.unannotate(annotated)
    linear = gs.export_onnx(graph, do_type_check=False)
    linear.ir_version = model.ir_version
    del linear.opset_import[:]
    linear.opset_import.extend(model.opset_import)
    result = api.optimize(linear, tol=tol, validate=False)
    folded = result.model
    kept = [p for p in folded.metadata_props if p.key != api.STAMP_KEY]
    del folded.metadata_props[:]
    folded.metadata_props.extend(kept)
    folded.metadata_props.add(key=WHAT_IF_KEY, value=WHAT_IF_NOTE)
    return folded, [b.names for b in found], len(result.report.rewrites)


def is_what_if(model: onnx.ModelProto) -> bool:
    return any(p.key == WHAT_IF_KEY for p in model.metadata_props)


def _params(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in io.all_tensors(model))


@dataclass
class Estimate:
    """Per variant (the original first): its label, blocks folded, params, MACs and latency against the original."""

    rows: list[dict] = field(default_factory=list)
    blocks: int = 0
    settings: str = ""
    folds_today: int = 0  # rewrites lc-onnx makes now (chains within --tol fold as they are)
    excluded: list[str] = field(default_factory=list)  # blocks left out by --exclude (their first node)
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        if not self.blocks:
            left = f" ({len(self.excluded)} left out by --exclude)" if self.excluded else ""
            if self.folds_today:
                return (f"no block needs a fine-tune{left}: lc-onnx folds this model's chains as they are "
                        f"({self.folds_today} rewrite(s) at --tol {api.DEFAULT_TOL:g}); run lc-onnx optimize")
            return (f"no linear -> activation -> linear block whose activation alone keeps it apart{left}: a "
                    f"fine-tune would collapse nothing")
        width = max(len(r["label"]) for r in self.rows)
        lines = [f"{'what-if':<{width}}  {'blocks':>6}  {'params':>10}  {'MACs':>10}  {'median ms':>9}  {'speedup':>7}"]
        for r in self.rows:
            macs = bench._count(r["macs"]) if r["macs"] else "?"
            lines.append(f"{r['label']:<{width}}  {r['blocks']:>6}  {bench._count(r['params']):>10}  {macs:>10}  "
                         f"{r['median_ms']:>9.3f}  {r['speedup']:>6.2f}x")
        lines.append(self.settings)
        if self.excluded:
            lines.append(f"left out by --exclude: {', '.join(self.excluded)}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append("what-if: each block's activation taken out (as a fine-tune to slope 1 would leave it) and "
                     "folded; the accuracy that costs is what the fine-tune must recover (train.sensitivity measures "
                     "it)")
        return "\n".join(lines)


def _variants(blocks: list[int], names: list[list[str]], per_block: bool) -> list[tuple[str, set[int]]]:
    """Each of `blocks` (indices) alone, named by its first node, then the last quarter, half and all of them."""
    n = len(blocks)
    out = [(f"block {i}: {_short(names[b][0]) or '#'}", {b}) for i, b in enumerate(blocks)] if per_block else []
    for part, name in ((4, "last quarter"), (2, "last half")):
        k = n // part
        if 0 < k < n:
            out.append((f"{name} ({k})", set(blocks[n - k:])))
    out.append((f"all ({n})", set(blocks)))
    return out


def _short(name: str) -> str:
    """A node name as the module it came from: `/model/bert/encoder/layer.0/intermediate/dense/MatMul` ->
    `bert/encoder/layer.0/intermediate/dense` (torch's exporters name nodes by module path, then op)."""
    parts = [p for p in name.split("/") if p]
    if len(parts) > 1 and parts[0] == "model":
        parts = parts[1:]
    return "/".join(parts[:-1] if len(parts) > 1 else parts)


def estimate(path: Path, provider_name: str = "cpu", threads: int = 1, batch: int | None = None, runs: int = 20,
             warmup: int = 3, shapes: dict[str, list[int]] | None = None, seed: int = 0, per_block: bool = True,
             keep: Path | None = None, progress=None, exclude: tuple[str, ...] = ()) -> Estimate:
    """Time the original model at `path` against its what-if graphs (see the module's docstring). `keep`: a
    folder where the what-if models are left, named `*.what-if.onnx`. `exclude`: glob patterns of node names; a
    block with a node matching one is left out (BERT's pooler: `*pooler*`)."""
    model, _ = io.read(path)
    if is_what_if(model):
        raise InputError(f"{path}: a what-if model from lc-onnx estimate; give the original")
    today, names, folds_today = _what_if(model, set(), api.DEFAULT_TOL)  # what lc-onnx folds now, and the blocks
    blocks = [i for i, block in enumerate(names)                         # a fine-tune would add to it
              if not any(fnmatch.fnmatchcase(n, p) for n in block for p in exclude)]
    result = Estimate(blocks=len(blocks), folds_today=folds_today,
                      excluded=[_short(names[i][0]) for i in range(len(names)) if i not in blocks])
    if not blocks:
        return result
    variants = _variants(blocks, names, per_block)
    if folds_today:
        variants.insert(0, (f"lc-onnx today (tol {api.DEFAULT_TOL:g})", set()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        paths, params = [Path(path)], [_params(model)]
        for i, (_, only) in enumerate(variants):
            variant = today if not only else what_if(model, only)[0]
            target = folder / f"{Path(path).stem}.what-if-{i}.onnx"
            io.save(variant, target)
            paths.append(target)
            params.append(_params(variant))
        # the MAC totals only: no candidates to share them among
        timed = bench.bench_files(paths, provider_name, threads, batch, runs, warmup, shapes, None, seed,
                                  progress=progress, model_candidates=[[] for _ in paths])
    labels = [("original", 0), *[(label, len(only)) for label, only in variants]]
    for (label, count), row, share, p in zip(labels, timed.models, timed.model_macs, params, strict=True):
        macs = share.total if isinstance(share, bench.MacShare) else 0
        result.rows.append({"label": label, "blocks": count, "params": p, "macs": macs,
                            "median_ms": row["median_ms"], "speedup": row["speedup_vs_first"]})
    result.settings = (f"{timed.provider}, {threads or 'default'} thread(s), {runs} interleaved runs, inputs "
                       + ", ".join(f"{k} {v}" for k, v in timed.inputs.items()))
    result.warnings = timed.guessed()  # not the spread warnings: they are per pair of models
    return result

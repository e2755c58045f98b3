"""Interleaved ONNX Runtime latency: models run in turn (A B, B A, ...) so machine drift hits all alike."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lc_onnx import io
from lc_onnx.errors import InputError, one_line
from lc_onnx.validate import make_inputs, session

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def interleaved(
    models: list[onnx.ModelProto | Path],
    feeds: dict[str, np.ndarray],
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    providers: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Latency]:
    """Median, p10 and p90 latency of each model, same session options (ORT_ENABLE_ALL, no spinning
    worker threads, which would take the cores from the model that runs next) for all."""
    sessions = []
    for m in models:
        try:
            sessions.append(session(m, providers, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=False))
        except Exception as e:  # ORT's errors are of many kinds; all mean it cannot load this model
            raise InputError(f"ONNX Runtime cannot load {_name(m)} ({one_line(e)})") from None
    if providers:
        for s in sessions:
            if s.get_providers()[0] != providers[0]:  # ORT falls back to the CPU when a provider fails to load
                raise InputError(f"ONNX Runtime could not start {providers[0]} (it fell back to "
                                 f"{s.get_providers()[0]}); no CPU numbers are given in its place")
    times: list[list[float]] = [[] for _ in sessions]
    j = 0
    try:
        for _ in range(warmup):
            for j in range(len(sessions)):
                sessions[j].run(None, feeds)
        for i in range(runs):
            # the order turns each round (A B C, B C A, C A B, ...): the model that runs right after a large
            # one finds the caches cold, and no model should always be that one
            for k in range(len(sessions)):
                j = (i + k) % len(sessions)
                start = time.perf_counter()
                sessions[j].run(None, feeds)
                times[j].append((time.perf_counter() - start) * 1e3)
            if progress:
                progress(i + 1)
    except Exception as e:  # random inputs can send a model down a branch it cannot take (a sample rate)
        raise InputError(f"ONNX Runtime failed running {_name(models[j])} on the random inputs ({one_line(e)}); "
                         f"pass real data with --inputs") from None
    return [
        Latency(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), runs)
        for t in times
    ]


def _name(model: onnx.ModelProto | Path) -> str:
    return str(model) if isinstance(model, Path) else "the model"


def provider(name: str) -> str:
    """The ORT provider for `cpu`/`cuda`; InputError when this onnxruntime does not have it."""
    full = PROVIDERS[name]
    if full not in ort.get_available_providers():
        raise InputError(f"{full} is not available in this onnxruntime "
                         f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA")
    return full


def batch_shapes(model: onnx.ModelProto, batch: int | None, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """`shapes` plus, for every other input, its declared shape with the open first dim set to `batch`."""
    if batch is None:
        return shapes
    out = dict(shapes)
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or vi.name in out:
            continue
        dims = list(vi.type.tensor_type.shape.dim)
        if not dims:
            continue
        if dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            raise InputError(f"input {vi.name!r} has a fixed first dim {dims[0].dim_value}; --batch {batch} "
                             f"cannot apply (export with a dynamic batch axis, or use --input-shape)")
        out[vi.name] = [batch] + [d.dim_value if d.HasField("dim_value") else 2 for d in dims[1:]]
    return out


@dataclass
class BenchResult:
    provider: str
    threads: int
    runs: int
    warmup: int
    inputs: dict[str, list[int]]
    models: list[dict] = field(default_factory=list)  # path, median/p10/p90 ms, speedup vs the first

    def table(self) -> str:
        first = self.models[0]["median_ms"]
        width = max(len(m["path"]) for m in self.models)
        lines = [f"{'model'.ljust(width)}  median ms     p10     p90  speedup vs first"]
        for m in self.models:
            lines.append(f"{m['path'].ljust(width)}  {m['median_ms']:9.3f} {m['p10_ms']:7.3f} {m['p90_ms']:7.3f}"
                         f"  {first / m['median_ms']:.2f}x")
        shapes = ", ".join(f"{k} {v}" for k, v in self.inputs.items())
        lines.append(f"{self.provider}, {self.threads or 'default'} thread(s), {self.runs} interleaved runs "
                     f"after {self.warmup} warm-up; inputs: {shapes}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def bench_files(
    paths: list[Path],
    provider_name: str = "cpu",
    threads: int = 0,
    batch: int | None = None,
    runs: int = 50,
    warmup: int = 10,
    shapes: dict[str, list[int]] | None = None,
    given: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Latency of model files on the same inputs, interleaved; the first model is the reference."""
    if runs < 1 or warmup < 0:
        raise InputError("--runs must be at least 1 and --warmup at least 0")
    if (batch is not None and batch < 1) or threads < 0:
        raise InputError("--batch must be at least 1 and --threads at least 0")
    full = provider(provider_name)
    heads = [io.read(p, load_weights=False)[0] for p in paths]
    names = [sorted(i.name for i in h.graph.input if i.name not in {t.name for t in h.graph.initializer})
             for h in heads]
    for p, n in zip(paths[1:], names[1:], strict=True):
        if n != names[0]:
            raise InputError(f"{p} has inputs {n}, {paths[0]} has {names[0]}: they cannot share inputs")
    feeds = make_inputs(heads[0], batch_shapes(heads[0], batch, shapes or {}), given, seed)
    del heads
    lat = interleaved(list(paths), feeds, runs, warmup, threads, [full], progress)
    result = BenchResult(provider_name, threads, runs, warmup, {k: list(v.shape) for k, v in feeds.items()})
    for p, latency in zip(paths, lat, strict=True):
        entry = {"path": str(p), **asdict(latency)}
        entry["speedup_vs_first"] = lat[0].median_ms / latency.median_ms
        result.models.append(entry)
    return result

"""Interleaved ONNX Runtime latency: models run in turn (A B A B ...) so machine drift hits all alike."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from lc_onnx.validate import session


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def interleaved(
    models: list[onnx.ModelProto],
    feeds: dict[str, np.ndarray],
    runs: int = 50,
    warmup: int = 10,
    threads: int = 1,
    providers: list[str] | None = None,
    progress=None,
) -> list[Latency]:
    """Median, p10 and p90 latency of each model, same session options (ORT_ENABLE_ALL) for all."""
    sessions = [
        session(m, providers, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL) for m in models
    ]
    for _ in range(warmup):
        for s in sessions:
            s.run(None, feeds)
    times = [[] for _ in sessions]
    for i in range(runs):
        for s, t in zip(sessions, times, strict=True):
            start = time.perf_counter()
            s.run(None, feeds)
            t.append((time.perf_counter() - start) * 1e3)
        if progress:
            progress(i + 1)
    return [
        Latency(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), runs)
        for t in times
    ]

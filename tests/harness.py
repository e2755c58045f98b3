"""The one test harness: checker → optimize → checker → ONNX Runtime comparison on seeded random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

import lc_onnx
from passes import NODE_RULES


def random_feeds(model: onnx.ModelProto, seed: int = 0, dim: int = 3) -> dict[str, np.ndarray]:
    """Inputs drawn here, independently of lc_onnx's own validation: floats ~ N(0, 1), open dims = `dim`."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


NODE_RULE_NAMES = {r.name for r in NODE_RULES}


def optimized(
    model: onnx.ModelProto,
    *,
    rewrites: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    seeds: tuple[int, ...] = (0, 1),
    feeds: dict[str, np.ndarray] | None = None,
    **options,
) -> lc_onnx.OptimizeResult:
    """Optimize `model` and assert the output is valid ONNX that computes the same as the input.

    `rewrites` is how many rewrites must fire (None: any number). Outputs are compared with
    np.testing.assert_allclose on several seeded draws, beside lc_onnx's own validation."""
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    result = lc_onnx.optimize(model, **options)
    assert model.SerializeToString() == before, "optimize changed its input model"
    onnx.checker.check_model(result.model, full_check=True)
    if rewrites is not None:  # chain rewrites; node rules (PRelu -> LeakyRelu) are counted by their own tests
        fired = [(r.rule, r.names) for r in result.report.rewrites if r.rule not in NODE_RULE_NAMES]
        assert len(fired) == rewrites, f"expected {rewrites} rewrites, got {fired}; skipped: {result.report.skipped}"
    draws = [feeds] if feeds is not None else [random_feeds(model, s) for s in seeds]
    for f in draws:
        for ref, got in zip(run(model, f), run(result.model, f), strict=True):
            assert ref.shape == got.shape and ref.dtype == got.dtype
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)
    return result

"""LayerCollapse as an Olive pass: Olive's own engine runs workflows with it on a tiny two-block model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from lc_onnx.olive import LayerCollapse, package_config

D, HIDDEN = 16, 64
# Olive's own noise: its config model for the pass says the field `validate` shadows pydantic's deprecated
# classmethod; its telemetry uses a deprecated opentelemetry handler
pytestmark = [pytest.mark.filterwarnings('ignore:Field name "validate":UserWarning'),
              pytest.mark.filterwarnings("ignore:.*LoggingHandler:DeprecationWarning")]


def tiny_model() -> onnx.ModelProto:
    """Two blocks x -> Linear -> PRelu(1) -> Linear -> Relu (MatMul+Add before the PRelu, Gemm after it), then a
    MatMul head that nothing folds."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    x = "x"
    for i in range(2):
        nodes += [
            helper.make_node("MatMul", [x, const(f"fc1_{i}.w", rng.standard_normal((D, HIDDEN)) / 4)], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", const(f"fc1_{i}.b", rng.standard_normal(HIDDEN) / 10)], [f"h{i}"]),
            helper.make_node("PRelu", [f"h{i}", const(f"slope{i}", [1.0])], [f"a{i}"]),
            helper.make_node("Gemm", [f"a{i}", const(f"fc2_{i}.w", rng.standard_normal((D, HIDDEN)) / 8),
                                      const(f"fc2_{i}.b", rng.standard_normal(D) / 10)], [f"y{i}"], transB=1),
            helper.make_node("Relu", [f"y{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    nodes.append(helper.make_node("MatMul", [x, const("head.w", rng.standard_normal((D, D)) / 4)], ["y"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run_workflow(tmp_path: Path, monkeypatch, passes: dict, external: bool = False) -> Path:
    """Run Olive's engine on the tiny model with `passes`, LayerCollapse found through `package_config()`."""
    from olive.workflows import run

    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("CI", "1")  # Olive 0.13 sends a heartbeat before reading OLIVE_DISABLE_TELEMETRY, not in CI
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), src, save_as_external_data=external, location="tiny.onnx.data", size_threshold=0)
    config = {"input_model": {"type": "ONNXModel", "model_path": str(src)}, "passes": passes,
              "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "log_severity_level": 3}
    best = run(config, package_config=package_config()).get_best_candidate()
    assert best is not None, "the workflow produced no model"
    path = Path(best.model_path)
    return next(path.glob("*.onnx")) if path.is_dir() else path


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


X = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)


def test_layer_collapse_pass_folds_both_blocks_and_keeps_external_data(tmp_path, monkeypatch):
    out = run_workflow(tmp_path, monkeypatch, {"collapse": {"type": "LayerCollapse", "save_as_external_data": True}},
                       external=True)
    assert ops(out) == {"Gemm": 2, "Relu": 2, "MatMul": 1}  # each block: MatMul+Add -> PRelu -> Gemm is one Gemm
    assert list(out.parent.glob("*.data"))  # the weights in Olive's own external-data layout, the head's too
    reference = outputs(tmp_path / "tiny.onnx", X)
    assert rel_l2(outputs(out, X), reference) < 1e-5


def test_layer_collapse_then_dynamic_quantization(tmp_path, monkeypatch):
    out = run_workflow(tmp_path, monkeypatch, {"collapse": {"type": "LayerCollapse"},
                                               "quantize": {"type": "OnnxDynamicQuantization"}})
    found = ops(out)
    assert "PRelu" not in found and found["MatMulInteger"] == 3  # one int8 layer per block (not two), the head
    reference = outputs(tmp_path / "tiny.onnx", X)
    assert rel_l2(outputs(out, X), reference) < 0.05  # int8 weights and activations


def test_package_config_adds_the_pass_to_olives_own_table():
    from olive.package_config import OlivePackageConfig

    config = OlivePackageConfig.model_validate(package_config())
    builtin = OlivePackageConfig.load_default_config().passes
    assert builtin.keys() < config.passes.keys()  # --package-config replaces the table: nothing built in is lost
    assert config.import_pass_module("LayerCollapse") is LayerCollapse


def test_the_pass_takes_the_budget_option():
    """budget=False makes the pass all or nothing, as `--no-budget` does."""
    from lc_onnx.olive import LayerCollapse

    config = LayerCollapse._default_config(None)
    assert config["budget"].default_value is True and "past rtol/atol are left" in config["validate"].description

"""`lc-onnx bench --runtime openvino` (Pipeline 1 item 8): the same interleaved timing on the same seeded inputs in
OpenVINO's CPU plugin, at f32 unless asked otherwise; what it computes matches ONNX Runtime; the JSON and table say
which runtime timed; ONNX Runtime's options are refused. No timing asserts."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import lc_onnx
from lc_onnx import bench
from lc_onnx.cli import main
from lc_onnx.validate import make_inputs
from tests.builder import mlp

ov = pytest.importorskip("openvino")


def invoke(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An original with a unit-slope PRelu between two layers, and what lc-onnx makes of it (one layer)."""
    folder = tmp_path_factory.mktemp("ov")
    original, optimized = folder / "orig.onnx", folder / "orig.lc.onnx"
    onnx.save(mlp(rank=3), original)
    lc_onnx.optimize(original).save(optimized)
    assert "PRelu" not in {n.op_type for n in onnx.load(optimized).graph.node}
    return original, optimized


def test_openvino_computes_what_onnxruntime_does_for_the_original_and_the_optimized(pair):
    feeds = make_inputs(onnx.load(pair[0]), {"x": [4, 3, 8]}, seed=0)
    ort_out = [bench.run_once(p, feeds) for p in pair]
    ov_out = [bench.run_once(p, feeds, "openvino", threads=1) for p in pair]
    for ort_y, ov_y in zip(ort_out, ov_out, strict=True):
        assert len(ort_y) == len(ov_y) == 1 and ov_y[0].shape == ort_y[0].shape == (4, 3, 8)
        np.testing.assert_allclose(ov_y[0], ort_y[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ov_out[1][0], ov_out[0][0], rtol=0, atol=1e-5)  # the fold holds inside OpenVINO too


def test_openvino_is_compiled_at_f32_with_the_threads_asked_for(pair):
    compiled = bench.ov_compile(pair[1], "m", threads=1)
    assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert bench.ov_config(2, "bf16") == {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                          "INFERENCE_NUM_THREADS": 2}
    assert "INFERENCE_NUM_THREADS" not in bench.ov_config(0)  # 0: OpenVINO's choice, as ONNX Runtime's


def test_bench_openvino_table_and_json_say_which_runtime_timed(pair, tmp_path):
    out = tmp_path / "ov.json"
    result = invoke(*pair, "--runtime", "openvino", "--threads", 1, "--runs", 3, "--warmup", 1, "--batch", 4,
                    "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "median"] and str(pair[1]) in lines[2] and "1.00x" in lines[1]
    assert lines[3].startswith(f"OpenVINO {ov.__version__.split('-')[0]} CPU plugin, f32 inference precision, "
                               f"1 thread(s), 3 interleaved runs after 1 warm-up")
    data = json.loads(out.read_text())
    assert data["runtime"] == "openvino" and data["runtime_version"] == ov.__version__
    assert data["versions"]["openvino"] == ov.__version__ and data["ort_provider"] == ""
    assert data["runtime_options"] == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                       "INFERENCE_NUM_THREADS": 1}
    assert data["inputs"] == {"x": [4, 3, 8]} and data["threads"] == 1 and data["runs"] == 3
    first, second = data["models"]
    assert first["speedup_vs_first"] == 1.0 and len(second["samples_ms"]) == 3
    assert first["macs"]["chain_count"] == 1 and second["macs"]["chain_count"] == 0


def test_onnxruntime_json_names_its_runtime_and_imports_no_openvino(pair, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setitem(sys.modules, "openvino", None)  # any import of it would fail
    out = tmp_path / "ort.json"
    result = invoke(pair[0], "--runs", 1, "--warmup", 0, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["runtime"] == "onnxruntime" and data["runtime_version"] == ort.__version__
    assert "openvino" not in data["versions"] and data["runtime_options"] == {}


def test_openvino_times_the_same_seeded_inputs_interleaved(pair, monkeypatch):
    order, fed = [], []

    def step(compiled, feeds):
        fed.append(feeds)
        return lambda: order.append(compiled)

    monkeypatch.setattr(bench, "ov_compile", lambda m, name, threads, precision: (m.name, threads, precision))
    monkeypatch.setattr(bench, "_ov_step", step)
    result = bench.bench_files(list(pair), threads=1, batch=4, runs=2, warmup=1, seed=3, runtime="openvino")
    a, b = (pair[0].name, 1, "f32"), (pair[1].name, 1, "f32")
    assert order == [a, b, a, b, b, a]  # warm-up, then the order turns each round as in ONNX Runtime
    drawn = make_inputs(onnx.load(pair[0]), {"x": [4, 3, 8]}, seed=3)
    assert all(f.keys() == drawn.keys() and np.array_equal(f["x"], drawn["x"]) for f in fed)
    assert result.runtime == "openvino" and len(result.models) == 2


@pytest.mark.parametrize("option", [["--provider", "cuda"], ["--io-binding"], ["--cuda-graph"]])
def test_onnxruntime_options_are_refused_with_openvino_before_reading_models(tmp_path, option):
    result = invoke(tmp_path / "absent.onnx", "--runtime", "openvino", *option)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert result.stderr.startswith(f"error: {' '.join(option)}: ONNX Runtime's, not OpenVINO's")


def test_ov_precision_needs_the_openvino_runtime(pair):
    result = invoke(pair[0], "--ov-precision", "bf16")
    assert result.exit_code == 2 and result.stderr == \
        "error: --ov-precision is OpenVINO's inference precision: it needs --runtime openvino\n"


def test_missing_openvino_is_one_line_naming_the_extra_before_any_timing(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(bench, "interleaved", lambda *a, **k: pytest.fail("timed without OpenVINO"))
    result = invoke(*pair, "--runtime", "openvino")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "--runtime openvino needs OpenVINO" in result.stderr and "lc-onnx[openvino]" in result.stderr


def test_a_precision_the_cpu_lacks_is_refused_not_run_at_another(pair):
    """f16 runs where the CPU has it; elsewhere OpenVINO's plugin would fall back silently (to bf16 or f32)."""
    result = invoke(pair[1], "--runtime", "openvino", "--ov-precision", "f16", "--runs", 1, "--warmup", 0)
    if result.exit_code == 0:
        assert "f16 inference precision" in result.stdout
    else:
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
        assert "not the f16 asked for with --ov-precision" in result.stderr

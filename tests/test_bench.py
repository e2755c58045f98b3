"""`lc-onnx bench`: interleaved runs, the table and JSON, batch and provider handling. No timing asserts."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from lc_onnx import bench
from lc_onnx.cli import main
from tests.builder import mlp


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(rank=3), a)
    onnx.save(mlp(rank=3, slope=None), b)
    return a, b


def invoke(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_two_models_table_and_json(pair, tmp_path):
    out = tmp_path / "b.json"
    result = invoke(*pair, "--runs", 3, "--warmup", 1, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["model", "median"] and "1.00x" in lines[1] and str(pair[1]) in lines[2]
    data = json.loads(out.read_text())
    assert data["inputs"] == {"x": [4, 3, 8]} and data["runs"] == 3 and data["provider"] == "cpu"
    first, second = data["models"]
    assert first["speedup_vs_first"] == 1.0 and second["runs"] == 3
    assert first["p10_ms"] <= first["median_ms"] <= first["p90_ms"]


def test_models_run_interleaved(pair, monkeypatch):
    order = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, *_):
            order.append(self.name)

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(bench, "session", lambda m, *a, **k: Fake(m.name))
    bench.interleaved(list(pair) + [pair[0].with_name("c.onnx")], {}, runs=3, warmup=1)
    warm, timed = order[:3], order[3:]
    assert warm == ["a.onnx", "b.onnx", "c.onnx"]
    assert timed == ["a.onnx", "b.onnx", "c.onnx", "b.onnx", "c.onnx", "a.onnx", "c.onnx", "a.onnx", "b.onnx"]


def test_cuda_without_cuda_is_exit_2_not_a_cpu_fallback(pair, monkeypatch):
    monkeypatch.setattr(bench.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = invoke(pair[0], "--provider", "cuda")
    assert result.exit_code == 2 and "CUDAExecutionProvider is not available" in result.stderr


def test_provider_that_falls_back_is_an_error(pair, monkeypatch):
    class CpuOnly:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(bench, "session", lambda *a, **k: CpuOnly())
    with pytest.raises(bench.InputError, match="fell back"):
        bench.interleaved([pair[0]], {}, runs=1, warmup=0, providers=["CUDAExecutionProvider"])


def test_fixed_batch_dim_and_mismatched_inputs_are_exit_2(tmp_path, pair):
    fixed = tmp_path / "fixed.onnx"
    model = mlp(rank=3)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, fixed)
    result = invoke(fixed, "--batch", 8)
    assert result.exit_code == 2 and "fixed first dim" in result.stderr
    other = tmp_path / "other.onnx"
    renamed = mlp(rank=3)
    renamed.graph.input[0].name = "z"
    for n in renamed.graph.node:
        n.input[:] = ["z" if i == "x" else i for i in n.input]
    onnx.save(renamed, other)
    result = invoke(pair[0], other)
    assert result.exit_code == 2 and "cannot share inputs" in result.stderr


def test_one_model_with_given_inputs_prints_no_progress_off_a_terminal(pair, tmp_path):
    import numpy as np

    feeds = tmp_path / "x.npz"
    np.savez(feeds, x=np.ones((5, 3, 8), np.float32))
    out = tmp_path / "one.json"
    result = invoke(pair[0], "--inputs", feeds, "--runs", 2, "--warmup", 0, "--threads", 1, "--json", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # CliRunner is not a terminal: no progress bar
    assert len(result.stdout.splitlines()) == 3  # header, one model, the settings line
    data = json.loads(out.read_text())
    assert data["inputs"] == {"x": [5, 3, 8]} and data["threads"] == 1 and len(data["models"]) == 1


def test_bad_input_shape_and_unknown_input_are_exit_2(pair):
    result = invoke(pair[0], "--input-shape", "x:3,a")
    assert result.exit_code == 2 and result.stderr.startswith("error: --input-shape")
    result = invoke(pair[0], "--input-shape", "nope:1,3,8")
    assert result.exit_code == 2 and "has no input 'nope'" in result.stderr
    result = invoke(pair[0], "--runs", 0)
    assert result.exit_code == 2 and "--runs" in result.stderr

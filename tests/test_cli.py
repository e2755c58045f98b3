"""The `lc-onnx` command and the Python API around the passes: files, reports, errors, determinism."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import lc_onnx
from lc_onnx.cli import main
from tests.builder import mlp


@pytest.fixture
def model_path(tmp_path):
    model = mlp(rank=3)
    model.doc_string = "a test model"
    model.producer_name = "tests"
    model.metadata_props.add(key="author", value="me")
    model.graph.node[-1].doc_string = "the output"
    model.graph.node[-1].metadata_props.add(key="namespace", value="head")
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_optimize_writes_next_to_input_and_prints_report(model_path):
    result = invoke("optimize", model_path)
    assert result.exit_code == 0, result.output
    out = model_path.with_name("model.lc.onnx")
    assert out.exists()
    assert "collapse_linear_chain" in result.output and "validation passed" in result.output
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_output_keeps_envelope_and_stamps_metadata(model_path):
    model = lc_onnx.optimize(model_path).model
    assert model.doc_string == "a test model" and model.producer_name == "tests"
    props = {p.key: p.value for p in model.metadata_props}
    assert props["author"] == "me"
    assert json.loads(props["lc_onnx"])["rewrites"] == {"collapse_linear_chain": 1}
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version == onnx.load(model_path).ir_version
    out_node = next(n for n in model.graph.node if n.name == "out")
    assert out_node.doc_string == "the output" and out_node.metadata_props[0].value == "head"


def test_same_input_gives_byte_identical_output(model_path, tmp_path):
    for name in ("a.onnx", "b.onnx"):
        assert invoke("optimize", model_path, "-o", tmp_path / name, "-q").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_second_run_changes_nothing(model_path, tmp_path):
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert invoke("optimize", model_path, "-o", once, "-q").exit_code == 0
    result = invoke("optimize", once, "-o", twice)
    assert result.exit_code == 0 and "no chain rewritten" in result.output
    assert once.read_bytes() == twice.read_bytes()


def test_report_json(model_path, tmp_path):
    report = tmp_path / "r.json"
    assert invoke("optimize", model_path, "--report", report, "-q").exit_code == 0
    data = json.loads(report.read_text())
    (rewrite,) = data["rewrites"]
    assert rewrite["shape"] == [8, 32, 8] and rewrite["macs_before"] == 32 * 16 and rewrite["macs_after"] == 64
    assert data["validation"]["passed"] and data["before"]["nodes"] > data["after"]["nodes"]
    assert data["validation"]["outputs"][0]["rel_l2"] < 1e-5


def test_validation_failure_exits_1_and_writes_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(slope=0.5), path)
    result = invoke("optimize", path, "--tol", "0.6", "--rtol", "1e-4", "--no-budget")
    assert result.exit_code == 1
    assert "validation failed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not path.with_name("m.lc.onnx").exists()
    with pytest.raises(lc_onnx.ValidationError) as info:
        lc_onnx.optimize(path, tol=0.6, rtol=1e-4, budget=False)
    assert info.value.report.rewrites


def test_no_validate_writes_even_a_lossy_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(slope=0.5), path)
    assert invoke("optimize", path, "--tol", "0.6", "--no-validate", "-q").exit_code == 0
    assert path.with_name("m.lc.onnx").exists()


def test_input_shape_and_npz_inputs(model_path, tmp_path):
    result = invoke("optimize", model_path, "--input-shape", "x:5,3,8", "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["inputs"] == {"x": [5, 3, 8]}
    np.savez(tmp_path / "in.npz", x=np.ones((7, 3, 8), np.float32))
    result = invoke("optimize", model_path, "--inputs", tmp_path / "in.npz", "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["inputs"] == {"x": [7, 3, 8]}


def test_inspect_lists_candidates_with_reasons(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(slope=0.71), path)
    result = invoke("inspect", path, "--tol", "0.05")
    assert result.exit_code == 0
    assert "slope 0.71" in result.output and "outside tolerance 0.05" in result.output
    assert "0 of 1 chain(s)" in result.output
    data = json.loads(invoke("inspect", path, "--json", "--tol", "0.3").output)
    assert data[0]["rule"] == "collapse_linear_chain"


def test_rules_and_demo():
    assert "collapse_linear_chain" in invoke("rules").output
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output and "faster" in result.output


BAD_FILES = {"empty.onnx": b"", "junk.onnx": b"\x00\xffnot a model" * 10}


@pytest.mark.parametrize("name,message", [
    ("missing.onnx", "no such file"),
    (".", "is a directory"),
    ("empty.onnx", "empty file"),
    ("junk.onnx", "not a readable"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, name, message):
    if name in BAD_FILES:
        (tmp_path / name).write_bytes(BAD_FILES[name])
    result = invoke("optimize", tmp_path / name)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_output_equal_to_input_needs_overwrite(model_path):
    result = invoke("optimize", model_path, "-o", model_path)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert invoke("optimize", model_path, "-o", model_path, "--overwrite", "-q").exit_code == 0


def test_missing_output_folder(model_path, tmp_path):
    result = invoke("optimize", model_path, "-o", tmp_path / "nope" / "out.onnx")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_unknown_input_name(model_path):
    result = invoke("optimize", model_path, "--input-shape", "nope:1,2")
    assert result.exit_code == 2 and "has no input 'nope'" in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = invoke("optimize", tmp_path / "missing.onnx", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_output_adds_no_inferred_shapes(model_path):
    # shapes lc-onnx infers for its own use stay out of the output: extra value_info changes which
    # fusions ONNX Runtime applies
    original = onnx.load(model_path)
    model = lc_onnx.optimize(model_path).model
    known = {v.name for v in original.graph.value_info}
    shaped = {v.name for v in model.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert shaped <= known


def test_an_internal_error_is_one_line_and_exit_3(tmp_path, monkeypatch):
    """README: exit 3 is a bug of ours, said in one line (the traceback with --debug)."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(lc_onnx.api, "optimize", broken)
    monkeypatch.setattr(lc_onnx, "optimize", broken)
    result = CliRunner().invoke(main, ["optimize", str(path)])
    assert result.exit_code == 3, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("internal error: RuntimeError: a bug")


def test_the_app_and_the_engine_import_no_torch():
    """README: lc_onnx/train is the only part that imports torch (the CLI must start without it)."""
    import subprocess
    import sys

    code = "import sys, lc_onnx, lc_onnx.cli, lc_onnx.bench, passes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_quiet_also_silences_the_line_saying_which_open_dims_were_guessed(model_path, caplog):
    # mlp(rank=3) has open dims: validation guesses them and says so, as a warning of the lc_onnx logger
    loud = invoke("optimize", model_path, "-o", model_path.with_name("a.onnx"))
    assert loud.exit_code == 0 and any("open dims" in r.getMessage() for r in caplog.records)
    caplog.clear()
    quiet = invoke("optimize", model_path, "-o", model_path.with_name("b.onnx"), "-q")
    assert quiet.exit_code == 0 and quiet.output == ""
    assert not any("open dims" in r.getMessage() for r in caplog.records)

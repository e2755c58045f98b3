"""Users 1, item 6: a run that folds nothing says why (from inspect's candidates), an --input-shape naming no
input is refused even then, and a PyTorch file is named as one rather than failing to parse as ONNX."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from lc_onnx.cli import main
from tests.builder import Builder, mlp

TORCH_HINT = "a PyTorch file; export it to ONNX with lc_onnx.train.export (see README)"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _block(b: Builder, x: str, act: str | None, **attrs) -> str:
    h = b.linear(x, 8, 32)
    if act:
        (h,) = b.node(act, [h], **attrs)
    return b.linear(h, 32, 8)


def act_model(*acts: str, **attrs) -> onnx.ModelProto:
    """x → (linear → act → linear) per act → y; opset 20, where Gelu is an ONNX op."""
    b = Builder()
    y = "x"
    for act in acts:
        y = _block(b, y, act, **attrs)
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    return b.model([("x", ["N", 3, 8])], [("y", ["N", 3, 8])], opset=20)


def collapsed_model() -> onnx.ModelProto:
    """Two transformer-style sublayers after train.collapse: LayerNorm → one linear → residual Add, twice."""
    b = Builder()
    y = "x"
    for _ in range(2):
        (n,) = b.node("LayerNormalization", [y, b.const([1.0] * 8), b.const([0.0] * 8)], axis=-1)
        (y,) = b.node("Add", [y, b.linear(n, 8, 8)])
    b.nodes.append(helper.make_node("Identity", [y], ["y"], name="out"))
    return b.model([("x", ["N", 3, 8])], [("y", ["N", 3, 8])])


def no_layer_model() -> onnx.ModelProto:
    b = Builder()
    (h,) = b.node("Relu", ["x"])
    b.nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    return b.model([("x", ["N", 8])], [("y", ["N", 8])])


def save(tmp_path, model: onnx.ModelProto, name: str = "model.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_gelu_model_says_fine_tune_and_writes_the_copy(tmp_path):
    path = save(tmp_path, act_model("Gelu", "Gelu"))
    out = tmp_path / "out.onnx"
    result = invoke("optimize", path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "no chain rewritten" in result.output
    assert "2 blocks have non-linear activations (2 Gelu), not PRelu near 1" in result.output
    assert "fine-tune with lc_onnx.train" in result.output and "save_pretrained/from_pretrained" in result.output
    assert onnx.load(out).graph == onnx.load(path).graph  # pipelines still get their file


def test_mixed_activations_are_counted_by_op(tmp_path):
    result = invoke("optimize", save(tmp_path, act_model("Gelu", "Relu", "Gelu")), "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "3 blocks have non-linear activations (2 Gelu, 1 Relu)" in result.output


def test_slope_outside_tol_names_the_slope_and_the_option(tmp_path):
    path = save(tmp_path, act_model("LeakyRelu", alpha=0.71))
    result = invoke("optimize", path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "1 chain has slopes outside --tol 0.05 (slope 0.71, 0.29 from 1)" in result.output
    # a PRelu that only becomes LeakyRelu is a node rewrite: no chain is folded, and the run says why
    result = invoke("optimize", save(tmp_path, mlp(slope=0.71), "p.onnx"), "-o", tmp_path / "p.out.onnx")
    assert result.exit_code == 0 and "prelu_to_leaky_relu" in result.output
    assert "1 chain has slopes outside --tol 0.05 (slope 0.71" in result.output


def test_collapsed_model_says_nothing_left(tmp_path):
    result = invoke("optimize", save(tmp_path, collapsed_model()), "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "the model looks collapsed already" in result.output and "nothing left to fold" in result.output
    # a model lc-onnx wrote: its stamp says so
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert invoke("optimize", save(tmp_path, mlp(), "m.onnx"), "-o", once, "-q").exit_code == 0
    result = invoke("optimize", once, "-o", twice)
    assert result.exit_code == 0 and "collapsed already (lc-onnx optimize wrote it" in result.output


def test_model_without_layers_says_no_block(tmp_path):
    result = invoke("optimize", save(tmp_path, no_layer_model()), "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "no linear -> activation -> linear block in the graph" in result.output
    assert "collapsed" not in result.output


def test_inspect_gives_the_same_summary(tmp_path):
    result = invoke("inspect", save(tmp_path, act_model("Gelu")))
    assert result.exit_code == 0, result.output
    assert "0 of 1 chain(s) would be rewritten" in result.output
    assert "1 block has non-linear activations (1 Gelu), not PRelu near 1" in result.output
    result = invoke("inspect", save(tmp_path, collapsed_model(), "c.onnx"))
    assert result.exit_code == 0 and "the model looks collapsed already" in result.output
    assert json.loads(invoke("inspect", save(tmp_path, act_model("Gelu")), "--json").output)[0]["rule"] is None


@pytest.mark.parametrize("extra", [(), ("--no-validate",)])
def test_input_shape_naming_no_input_is_refused_when_nothing_is_rewritten(tmp_path, extra):
    path = save(tmp_path, act_model("Gelu"))
    out = tmp_path / "out.onnx"
    result = invoke("optimize", path, "-o", out, "--input-shape", "nope:1,3,8", *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == ["error: the model has no input 'nope'; its inputs are x"]
    assert not out.exists()


def test_input_shape_naming_no_input_is_refused_without_validation(tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", save(tmp_path, mlp()), "-o", out, "--no-validate", "--input-shape", "nope:1,3,8")
    assert result.exit_code == 2 and "its inputs are x" in result.stderr and not out.exists()


def test_inputs_naming_no_input_are_refused_when_nothing_is_rewritten(tmp_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, nope=np.zeros((1, 3, 8), np.float32))
    out = tmp_path / "out.onnx"
    result = invoke("optimize", save(tmp_path, act_model("Gelu")), "-o", out, "--inputs", npz)
    assert result.exit_code == 2 and "has no input 'nope'; its inputs are x" in result.stderr and not out.exists()


def _pickle(path):  # what torch.save(..., _use_new_zipfile_serialization=False) starts with
    path.write_bytes(pickle.dumps({"fc1.weight": [0.0, 1.0]}, protocol=2))


def _safetensors(path):
    header = json.dumps({"fc1.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)


def _zip_with_pickle(path):  # a TorchScript/torch.save archive, written without torch
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/version", "3\n")


def _junk(path):
    path.write_bytes(b"\x00\xffnot a model" * 10)


@pytest.mark.parametrize("name,write", [
    ("model.pth", _pickle),
    ("model.onnx", _pickle),
    ("model.safetensors", _safetensors),
    ("pytorch_model.onnx", _safetensors),
    ("model.onnx", _zip_with_pickle),
    ("pytorch_model.bin", _junk),  # by name, where the content is no ONNX either
])
@pytest.mark.parametrize("command", ["optimize", "inspect", "bench"])
def test_a_pytorch_file_is_named_as_one(tmp_path, name, write, command):
    path = tmp_path / name
    write(path)
    result = invoke(command, path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(TORCH_HINT), lines
    assert "Traceback" not in result.output


def test_a_torch_save_file_is_named_as_one(tmp_path):
    """torch.save's own zip archive, as a .pt and under an .onnx name (by content); torch's import is most of
    this test's time when it runs alone."""
    torch = pytest.importorskip("torch")
    for name in ("model.pt", "weights.onnx"):
        torch.save({"fc1.weight": torch.zeros(2, 2)}, tmp_path / name)
        for command in ("optimize", "inspect", "bench"):
            result = invoke(command, tmp_path / name)
            assert result.exit_code == 2, result.output
            assert result.stderr.strip().splitlines() == [f"error: {tmp_path / name}: {TORCH_HINT}"]


def test_an_onnx_model_named_bin_still_runs(tmp_path):
    result = invoke("inspect", save(tmp_path, mlp(), "model.bin"))
    assert result.exit_code == 0 and "1 of 1 chain(s) would be rewritten" in result.output

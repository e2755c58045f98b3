"""Byte-level fuzz: a damaged model file gives a clean lc_onnx error or a valid model, never a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lc_onnx
from tests.builder import mlp

EXAMPLES = int(os.environ.get("LC_FUZZ_EXAMPLES", 300))  # longer: LC_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
VALID = mlp(d_in=4, hidden=16, d_out=4).SerializeToString()


@st.composite
def damaged(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "cut", "drop"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        elif len(data) > 1:
            del data[pos]
        if not data:
            break
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_file_is_a_clean_error_or_a_valid_model(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        path.write_bytes(data)
        try:
            result = lc_onnx.optimize(path)
        except lc_onnx.LcOnnxError as e:
            assert str(e) and "\n" not in str(e).strip()
            return
        onnx.checker.check_model(result.save(Path(d) / "out.onnx").as_posix())


@pytest.mark.parametrize("cut", [1, 10, len(VALID) // 2, len(VALID) - 1])
def test_truncated_file(tmp_path, cut):
    path = tmp_path / "m.onnx"
    path.write_bytes(VALID[:cut])
    with pytest.raises(lc_onnx.InputError):
        lc_onnx.optimize(path)

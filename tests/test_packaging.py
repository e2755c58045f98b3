"""What a user installs: the wheel holds every package, the entry points run, and a missing ONNX Runtime is one
line saying which extra to install (onnxruntime and onnxruntime-gpu come as extras, never both)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lc_onnx
import lc_onnx.__main__ as entry
from lc_onnx import runtime

ROOT = Path(__file__).resolve().parents[1]


def _packages() -> set[str]:
    return {str(p.parent.relative_to(ROOT)) for top in ("lc_onnx", "passes") for p in (ROOT / top).rglob("__init__.py")}


def test_the_wheel_holds_every_package_the_license_and_the_entry_point(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next(tmp_path.glob("lc_onnx-*.whl")))
    names = wheel.namelist()
    assert "lc_onnx/train" in _packages()
    for package in _packages():
        assert f"{package}/__init__.py" in names, package
    assert "lc_onnx/__main__.py" in names
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = wheel.read(info).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("onnxruntime" in r and "extra" not in r for r in requires), requires  # never a hard dependency
    assert not any(r.split(";")[0].strip().startswith("torch==") for r in requires), requires  # a floor, not a pin
    points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "lc-onnx = lc_onnx.__main__:main" in points


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "lc_onnx", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"lc-onnx, version {lc_onnx.__version__}"


def test_without_onnx_runtime_the_command_says_which_extra_to_install(monkeypatch, capsys):
    monkeypatch.setattr(entry, "installed", lambda: False)
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lc-onnx[cpu]" in err and "lc-onnx[gpu]" in err


def test_without_onnx_runtime_the_api_names_the_extra(monkeypatch):
    monkeypatch.setattr(runtime, "installed", lambda: False)
    with pytest.raises(ImportError, match=r"lc-onnx\[cpu\]"):
        lc_onnx.__getattr__("optimize")

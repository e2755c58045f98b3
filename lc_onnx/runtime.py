"""Whether ONNX Runtime is installed. It is an extra, not a dependency: `onnxruntime` and `onnxruntime-gpu` ship
the same module and must not be installed together, so a user picks one (`lc-onnx[cpu]` or `lc-onnx[gpu]`)."""

from __future__ import annotations

from importlib.util import find_spec

MISSING = ("lc-onnx needs ONNX Runtime, which is not installed: pip install 'lc-onnx[cpu]' (or 'lc-onnx[gpu]' "
           "for CUDA; never both)")


def installed() -> bool:
    return find_spec("onnxruntime") is not None


def require() -> None:
    """ImportError with the install command when ONNX Runtime is missing."""
    if not installed():
        raise ImportError(MISSING)

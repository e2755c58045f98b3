"""lc-onnx: LayerCollapse for ONNX models."""

from __future__ import annotations

import importlib

from lc_onnx.errors import InputError, LcOnnxError, ValidationError

__version__ = "0.1.0"
__all__ = ["InputError", "LcOnnxError", "OptimizeResult", "Report", "ValidationError", "inspect", "optimize"]

# loaded on first use: they need ONNX Runtime, and `import lc_onnx.train` or `python -m lc_onnx` without it
# should reach the line that says how to install it, not a ModuleNotFoundError
_LAZY = {"OptimizeResult": "lc_onnx.api", "inspect": "lc_onnx.api", "optimize": "lc_onnx.api",
         "Report": "lc_onnx.report"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lc_onnx' has no attribute {name!r}")
    from lc_onnx.runtime import require

    require()
    return getattr(importlib.import_module(_LAZY[name]), name)

"""lc-onnx: LayerCollapse for ONNX models."""

from lc_onnx.api import OptimizeResult, inspect, optimize
from lc_onnx.errors import InputError, LcOnnxError, ValidationError
from lc_onnx.report import Report

__version__ = "0.1.0"
__all__ = ["InputError", "LcOnnxError", "OptimizeResult", "Report", "ValidationError", "inspect", "optimize"]

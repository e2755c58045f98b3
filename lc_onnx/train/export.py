"""`export`: torch.onnx.export with settings that keep the PRelu chains visible to `lc-onnx optimize`."""

from __future__ import annotations

import os

import torch
from torch import nn


def export(model: nn.Module, example_args: tuple, path: str | os.PathLike, *, dynamo: bool = False, **kw) -> None:
    """torch.onnx.export in eval mode with settings that keep PRelu chains visible to `lc-onnx optimize`:
    opset 17 for the legacy exporter, one file (no external data) for the new one unless asked."""
    model.eval()
    if dynamo:
        kw.setdefault("external_data", False)
    else:
        kw.setdefault("opset_version", 17)
    torch.onnx.export(model, example_args, str(path), dynamo=dynamo, **kw)

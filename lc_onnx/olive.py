"""LayerCollapse as a Microsoft Olive pass: a thin adapter over `lc_onnx.optimize` (examples/olive/README.md).

Olive looks passes up in its package config, and `olive run --package-config FILE` replaces Olive's own table:
`package_config()` is that table plus this pass (`python -m lc_onnx.olive > FILE` writes it)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

try:
    from olive.model import ONNXModelHandler
    from olive.model.utils import resolve_onnx_path
    from olive.package_config import OlivePackageConfig
    from olive.passes import Pass
    from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
    from olive.passes.pass_config import BasePassConfig, PassConfigParam
except ImportError as e:  # `import lc_onnx` never needs Olive; only this module does
    raise ImportError(f"lc_onnx.olive needs Olive: pip install 'lc-onnx[olive]' ({e})") from e
from onnx.external_data_helper import load_external_data_for_model

from lc_onnx.api import DEFAULT_TOL, optimize

logger = logging.getLogger("olive.passes.lc_onnx")  # under "olive": the report goes where Olive logs
# Olive makes the parameters a pydantic model, whose deprecated classmethod `validate` the field shadows (a warning)
warnings.filterwarnings("ignore", 'Field name "validate" in "LayerCollapseConfig"', UserWarning)


class LayerCollapse(Pass):
    """Fold linear -> PRelu(slope ~1) -> linear chains into one linear layer, checked in ONNX Runtime."""

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        def param(type_, default, description):
            return PassConfigParam(type_=type_, default_value=default, description=description)

        return {
            "tol": param(float, DEFAULT_TOL, "Largest |slope - 1| of an activation taken as the identity."),
            "validate": param(bool, True, "Compare both models in ONNX Runtime; blocks whose fold would move an "
                                          "output past rtol/atol are left (see budget)."),
            "budget": param(bool, True, "False: all or nothing, the pass fails where folding every block within tol "
                                        "fails validation."),
            "rtol": param(float | None, None, "Relative L2 error allowed per output (None: from the slopes)."),
            "atol": param(float | None, None, "Max abs error allowed per output (None: lc-onnx's default)."),
            "max_mismatch": param(float, 0.0, "Share of an integer or bool output's elements that may differ."),
            "skip": param(list[str], [], "Rule names not to run (see `lc-onnx inspect`)."),
            "allow_growth": param(bool, False, "Fold chains reading shared weights even where parameters grow."),
            "input_shapes": param(dict[str, list[int]] | None, None, "Shapes for validation's random inputs."),
            "seed": param(int, 0, "Seed of validation's random inputs."),
            **get_external_data_config(),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        result = optimize(model.model_path, tol=config.tol, validate=config.validate, rtol=config.rtol,
                          atol=config.atol, max_mismatch=config.max_mismatch, skip=tuple(config.skip),
                          allow_growth=config.allow_growth, input_shapes=config.input_shapes, seed=config.seed,
                          budget=config.budget)
        logger.info("LayerCollapse:\n%s", result.report.table())
        if result.source is not None:  # weights the rewrite left alone are still read from the input's folder
            load_external_data_for_model(result.model, str(result.source))
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        return model_proto_to_olive_model(result.model, output_model_path, config)


def package_config() -> dict:
    """Olive's own package config (its pass table) with LayerCollapse added, for `--package-config`."""
    config = OlivePackageConfig.load_default_config().model_dump(mode="json")
    config["passes"]["layercollapse"] = {"module_path": "lc_onnx.olive.LayerCollapse", "supported_providers": ["*"],
                                         "supported_accelerators": ["*"], "supported_precisions": ["*"],
                                         "module_dependencies": ["lc-onnx[olive]"]}
    return config


if __name__ == "__main__":
    print(json.dumps(package_config(), indent=2))

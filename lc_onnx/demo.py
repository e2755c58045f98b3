"""`lc-onnx demo`: a transformer-shaped MLP stack built in numpy, optimized, validated, timed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lc_onnx import api, bench, io
from lc_onnx.errors import InputError, one_line
from lc_onnx.validate import make_inputs

# ViT-T widths; slopes as training with the LayerCollapse regularizer leaves them, plus one that did not converge
DIM, HIDDEN, TOKENS = 192, 768, 197
SLOPES = [1.0, 1.0, 1.0, 1.0, 0.9996, 0.25]


def build_model(slopes: list[float] = SLOPES, seed: int = 0) -> onnx.ModelProto:
    """x + fc2(PReLU(fc1(LayerNorm(x)))) per block, weights ~ N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "tokens"
    for i, slope in enumerate(slopes):
        p = f"block{i}"

        def init(name, value, p=p):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{p}.{name}"))
            return f"{p}.{name}"

        w1 = init("fc1.weight", rng.standard_normal((DIM, HIDDEN)) / np.sqrt(DIM))
        w2 = init("fc2.weight", rng.standard_normal((HIDDEN, DIM)) / np.sqrt(HIDDEN))
        nodes += [
            helper.make_node("LayerNormalization", [x, init("ln.scale", np.ones(DIM)), init("ln.bias", np.zeros(DIM))],
                             [f"{p}.ln"], name=f"{p}.ln", axis=-1),
            helper.make_node("MatMul", [f"{p}.ln", w1], [f"{p}.fc1.mm"], name=f"{p}.fc1"),
            helper.make_node("Add", [f"{p}.fc1.mm", init("fc1.bias", rng.standard_normal(HIDDEN) * 0.02)],
                             [f"{p}.fc1.out"], name=f"{p}.fc1.add"),
            helper.make_node("PRelu", [f"{p}.fc1.out", init("act.slope", np.full((1, 1, 1), slope))],
                             [f"{p}.act"], name=f"{p}.act"),
            helper.make_node("MatMul", [f"{p}.act", w2], [f"{p}.fc2.mm"], name=f"{p}.fc2"),
            helper.make_node("Add", [f"{p}.fc2.mm", init("fc2.bias", rng.standard_normal(DIM) * 0.02)],
                             [f"{p}.fc2.out"], name=f"{p}.fc2.add"),
            helper.make_node("Add", [x, f"{p}.fc2.out"], [f"{p}.out"], name=f"{p}.residual"),
        ]
        x = f"{p}.out"
    nodes.append(helper.make_node("Identity", [x], ["features"], name="output"))
    graph = helper.make_graph(
        nodes, "lc_onnx_demo",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", TOKENS, DIM])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", TOKENS, DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lc-onnx demo")
    onnx.checker.check_model(model)
    return model


def run_demo(output_dir: Path | None = None, runs: int = 30, overwrite: bool = False) -> None:
    """Build, optimize and time the demo model in `output_dir` (default: a temporary folder). Existing demo
    files there are replaced only with `overwrite`, and never where they are not regular files."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output_dir or tmp)
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise InputError(f"-o {folder}: is not a folder")
        for target in (folder / "demo.onnx", io.default_output(folder / "demo.onnx")):
            if target.exists() or target.is_symlink():  # checked before anything is written
                io.check_target(target, "demo file")
                if not overwrite:
                    raise InputError(f"{target}: exists; demo replaces its files only with --overwrite")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"-o {folder}: cannot make the folder ({e.strerror or one_line(e)})") from None
        src = io.save(build_model(), folder / "demo.onnx")
        click.echo(f"built {src}: {len(SLOPES)} MLP blocks {DIM}>{HIDDEN}>{DIM}, PReLU slopes {SLOPES}")
        click.echo(f"$ lc-onnx optimize {src.name}   (tol {api.DEFAULT_TOL:g})\n")
        result = api.optimize(src, input_shapes={"tokens": [1, TOKENS, DIM]})  # batch 1, as timed below
        out = result.save(io.default_output(src))
        click.echo(result.report.table())
        click.echo(f"wrote {out}\n")

        feeds = make_inputs(result.model, {"tokens": [1, TOKENS, DIM]})
        before, after = bench.interleaved([io.load(src), result.model], feeds, runs=runs, warmup=5, threads=1)
        click.echo(f"ONNX Runtime, batch 1, 1 thread, {runs} interleaved runs: "
                   f"{before.median_ms:.2f} ms -> {after.median_ms:.2f} ms median "
                   f"({before.median_ms / after.median_ms:.2f}x faster)")
        if output_dir is None:
            click.echo("(models were in a temporary folder; keep them with --output-dir)")

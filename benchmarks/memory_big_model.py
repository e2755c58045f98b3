"""Peak memory and time of `lc-onnx optimize` on a model over protobuf's 2 GB limit, against onnx.load+save.

    python benchmarks/memory_big_model.py [--blocks 44] [--folder /tmp/lc_big]
    python benchmarks/memory_big_model.py --model path/to/model.onnx      # an existing model instead

Builds (without holding it in memory) a GPT-2-large-MLP-shaped model with external data: `blocks` residual
blocks x + (PRelu(x·W1 + b1, slope 1)·W2 + b2), 1280 -> 5120 -> 1280, float32 (44 blocks = 2.3 GB). Each
measured command runs in its own process under /usr/bin/time -v; prints wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

D, H = 1280, 5120


def build(folder: Path, blocks: int, seed: int = 0) -> Path:
    """Write model.onnx + model.onnx.data tensor by tensor, so building needs one weight in memory."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    inits, nodes = [], []
    with open(folder / data_name, "wb") as data:

        def external(name: str, value: np.ndarray) -> str:
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=value.shape)
            tensor.data_location = TensorProto.EXTERNAL
            offset = data.tell()
            raw = value.astype(np.float32).tobytes()
            data.write(raw)
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=k, value=v)
            inits.append(tensor)
            return name

        x = "x"
        for i in range(blocks):
            p = f"b{i}"
            w1 = external(f"{p}.w1", rng.standard_normal((D, H), dtype=np.float32) / np.sqrt(D))
            b1 = external(f"{p}.b1", np.zeros(H, np.float32))
            w2 = external(f"{p}.w2", rng.standard_normal((H, D), dtype=np.float32) / np.sqrt(H))
            b2 = external(f"{p}.b2", np.zeros(D, np.float32))
            inits.append(onnx.numpy_helper.from_array(np.ones(1, np.float32), f"{p}.slope"))
            nodes += [
                helper.make_node("MatMul", [x, w1], [f"{p}.m1"], name=f"{p}.fc1"),
                helper.make_node("Add", [f"{p}.m1", b1], [f"{p}.h"], name=f"{p}.fc1.bias"),
                helper.make_node("PRelu", [f"{p}.h", f"{p}.slope"], [f"{p}.a"], name=f"{p}.act"),
                helper.make_node("MatMul", [f"{p}.a", w2], [f"{p}.m2"], name=f"{p}.fc2"),
                helper.make_node("Add", [f"{p}.m2", b2], [f"{p}.o"], name=f"{p}.fc2.bias"),
                helper.make_node("Add", [x, f"{p}.o"], [f"{p}.y"], name=f"{p}.residual"),
            ]
            x = f"{p}.y"
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, D])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 16, D])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stderr tail) of one process."""
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", run.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    return hours * 3600 + minutes * 60 + seconds, rss / 1e6, run.stdout[-400:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=44)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/lc_big"))
    ap.add_argument("--keep", action="store_true", help="keep the model files afterwards")
    ap.add_argument("--model", type=Path, help="measure this model instead of building one")
    ap.add_argument("--peers", action="store_true", help="also time onnxsim and onnxslim on it")
    args = ap.parse_args()
    if args.model:
        src = args.model.resolve()
        args.folder = Path(tempfile.mkdtemp(prefix="lc_cost_"))  # outputs only; the model stays where it is
        data = src.with_name(f"{src.name}.data")
        size = (src.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e9
        print(f"model: {src} ({size:.2f} GB)")
    else:
        src = build(args.folder, args.blocks)
        size = sum(f.stat().st_size for f in args.folder.iterdir()) / 1e9
        print(f"model: {src} ({size:.2f} GB with external data, {args.blocks} blocks {D}>{H}>{D})")
    py = sys.executable
    external = "save_as_external_data=True, location='copy.onnx.data'" if size > 1.9 or not args.model else ""
    baseline = f"import onnx; m = onnx.load('{src}'); onnx.save(m, '{args.folder}/copy.onnx', {external})"
    lc = [str(Path(py).parent / "lc-onnx"), "optimize", str(src), "-o", str(args.folder / "out.onnx"), "-q"]
    rows = [
        ("onnx.load + onnx.save", [py, "-c", baseline]),
        ("lc-onnx optimize --no-validate", [*lc, "--no-validate"]),
        ("lc-onnx optimize (validation on)", lc),
    ]
    if args.peers:
        rows += [
            ("onnxsim", [py, "-c", f"import onnxsim, onnx; m, _ = onnxsim.simplify('{src}'); "
                                   f"onnx.save(m, '{args.folder}/sim.onnx')"]),
            ("onnxslim", [py, "-c", f"import onnxslim; onnxslim.slim('{src}', '{args.folder}/slim.onnx')"]),
        ]
    base_time = None
    print("| command | wall (s) | vs load+save | peak RSS (GB) | RSS / model size |\n|---|---|---|---|---|")
    for label, cmd in rows:
        wall, rss, _ = measure(cmd)
        base_time = base_time or wall
        print(f"| {label} | {wall:.1f} | {wall / base_time:.2f}x | {rss:.2f} | {rss / size:.2f} |", flush=True)
    out = sum(f.stat().st_size for f in args.folder.glob("out.onnx*")) / 1e9
    print(f"output: {out:.2f} GB")
    if not args.keep:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()

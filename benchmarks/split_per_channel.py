"""Per-unit slopes (`prepare(per_channel=True)`): how many hidden units reach slope 1, and what
`split_linear_units` saves where only some of a block's units are linear.

    python benchmarks/split_per_channel.py            # writes its section of benchmarks/RESULTS_train.md
    python benchmarks/split_per_channel.py --quick    # a smoke run, writes nothing

The deep MLP of train_digits.py (input 64->64, 6 residual blocks 64->256->64, LN + head) on scikit-learn's digits,
GELU swapped for one PReLU(0.01) slope per hidden unit, trained with CE + λ·Σ(α−1)² (slopes in their own group,
lr 1e-2). Then: units within tol of 1 per block; the model exported and optimized by lc-onnx at that tol (the
split) and with split_linear_units skipped (what the other rules give); params, MACs per row of the blocks,
test accuracy of each ONNX model, and ONNX Runtime latency (interleaved, lc_onnx.bench)."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from sections import cpu_model  # noqa: E402
from train_digits import DeepMLP, data, train_epochs  # noqa: E402

import lc_onnx  # noqa: E402
from lc_onnx import bench, train  # noqa: E402
from lc_onnx.train.regularize import blocks  # noqa: E402

START, END = "<!-- split_per_channel.py: start -->", "<!-- split_per_channel.py: end -->"
TOL = 0.05


def units(model) -> list[tuple[int, int]]:
    """(units within TOL of 1, units) per prepared block."""
    out = []
    for _, m in sorted(blocks(model).items()):
        s = m.weight.detach().double().numpy().reshape(-1)
        out.append((int((np.abs(s - 1) <= TOL).sum()), s.size))
    return out


def onnx_acc(model, x, y) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"x": x})[0].argmax(1) == y).mean()) * 100


def run(lam: float, epochs: int, seed: int, runs: int, xtr, ytr, xte, yte) -> dict:
    torch.manual_seed(seed)
    model = DeepMLP()
    train.prepare(model, (xtr[:2],), init=0.01, per_channel=True)
    train_epochs(model, xtr, ytr, epochs, seed, lr=1e-3, lam=lam)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        train.export(model, (xte[:1],), path, dynamic_axes={"x": {0: "n"}}, input_names=["x"])
        original = lc_onnx.io.load(path)
        split = lc_onnx.optimize(path, tol=TOL, validate=False)
        nosplit = lc_onnx.optimize(path, tol=TOL, validate=False, skip=("split_linear_units",))
    x, y = xte.numpy(), yte.numpy()
    rows = {"original": original, "no split": nosplit.model, "split": split.model}
    acc = {k: onnx_acc(m, x, y) for k, m in rows.items()}
    lat = {}
    for batch in (1, 64):
        got = bench.interleaved(list(rows.values()), {"x": x[:batch]}, runs=runs, warmup=10, threads=1)
        lat[batch] = {k: t.median_ms for k, t in zip(rows, got, strict=True)}
    fired = [r for r in split.report.rewrites if r.rule == "split_linear_units"]
    whole = 6 * 256 * 128  # MACs per row of the six 64->256->64 blocks

    def macs(result) -> int:
        return whole - sum(r.macs_before - r.macs_after for r in result.report.rewrites if r.shape)

    return {
        "lam": lam, "units": units(model), "acc": acc, "lat": lat,
        "splits": len(fired), "collapsed": sum(r.rule == "collapse_linear_chain" for r in split.report.rewrites),
        "macs_blocks": (whole, macs(nosplit), macs(split)),
        "params": (split.report.before.params, nosplit.report.after.params, split.report.after.params),
        "rules": sorted({r.rule for r in split.report.rewrites}),
        "rules_nosplit": sorted({r.rule for r in nosplit.report.rewrites}),
    }


def table(results: list[dict]) -> list[str]:
    lines = [
        "| λ | units within 0.05 of 1, per block (of 256) | blocks collapsed / split | MACs/row of the blocks: "
        "original / no split / split | params: original / no split / split | test acc: original / split | "
        "ORT batch 1: original / no split / split | ORT batch 64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        u = ", ".join(str(a) for a, _ in r["units"])
        mb, m1, m2 = r["macs_blocks"]
        p0, p1, p2 = r["params"]
        a, l1, l64 = r["acc"], r["lat"][1], r["lat"][64]
        lines.append(
            f"| {r['lam']:g} | {u} | {r['collapsed']} / {r['splits']} | {mb:,} / {m1:,} / {m2:,} ({mb / m2:.2f}x) | "
            f"{p0:,} / {p1:,} / {p2:,} | {a['original']:.1f} / {a['split']:.1f} | "
            f"{l1['original']:.3f} / {l1['no split']:.3f} / "
            f"{l1['split']:.3f} ms ({l1['original'] / l1['split']:.2f}x) | {l64['original']:.3f} / "
            f"{l64['no split']:.3f} / {l64['split']:.3f} ms ({l64['original'] / l64['split']:.2f}x) |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs, one λ, nothing written")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lams", default="0.01,0.03,0.1,0.3,1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = data()
    lams = [0.1] if args.quick else [float(v) for v in args.lams.split(",")]
    epochs, runs = (2, 20) if args.quick else (args.epochs, args.runs)
    t0 = time.perf_counter()
    results = [run(lam, epochs, args.seed, runs, xtr, ytr, xte, yte) for lam in lams]
    secs = time.perf_counter() - t0
    lines = table(results)
    print("\n".join(lines))
    for r in results:
        print(f"λ={r['lam']:g}: rules with the split {r['rules']}, without {r['rules_nosplit']}")
    if args.quick:
        return
    section = [
        START,
        "# Per-unit slopes: partial collapse by splitting (`split_linear_units`)",
        "",
        f"Command: `python benchmarks/split_per_channel.py --epochs {args.epochs} --runs {args.runs} --seed "
        f"{args.seed} --lams {args.lams}` ({secs:.0f} s)  ",
        f"Machine: {cpu_model() or platform.processor()}, torch 1 thread, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; {datetime.date.today().isoformat()}  ",
        "Model: train_digits.py's deep MLP (6 residual blocks 64→256→64) with `train.prepare(model, (x,), "
        f"per_channel=True)` (one PReLU slope per hidden unit, init 0.01), {args.epochs} epochs, AdamW lr 1e-3, "
        "slopes in their own group (`train.param_groups`, lr 1e-2), loss CE + λ·Σ(α−1)² (`train.regularizer`); "
        f"exported (`train.export`, opset 17) and optimized by `lc_onnx.optimize(tol={TOL})`, with and without "
        "`--skip split_linear_units`.  ",
        "A block of 256 units with L of them linear splits when 64·64 + (256 − L)·128 < 256·128, i.e. L > 32; "
        "\"no split\": a block with any unit off stays whole (PRelu).  ",
        f"Latency: ONNX Runtime CPU, 1 thread, median of {args.runs} interleaved runs (`lc_onnx.bench.interleaved`: "
        "the order turns each round), batch 1 and 64; speedup against the original.",
        "",
        *lines,
        "",
        END,
    ]
    target = HERE / "RESULTS_train.md"
    text = target.read_text() if target.exists() else ""
    start, end = text.find(START), text.find(END)
    if start >= 0 and end >= 0:
        text = text[:start] + "\n".join(section) + text[end + len(END):]
    else:  # last in the file: train_digits.py keeps everything from train_finetune.py's section on
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()

"""Reproduce LayerCollapse's effect on real data that ships offline: scikit-learn's digits (1,797 8x8 images).

    python benchmarks/train_digits.py            # full run, writes benchmarks/RESULTS_train.md and a PNG
    python benchmarks/train_digits.py --quick    # a smoke run (few epochs), writes nothing

Models: (a) a residual MLP (input 64->64, 6 blocks x + fc2(act(fc1(LN(x)))) with 64->256->64) and (b) a small
ViT on 2x2 patches (16 tokens, d 64, 4 pre-norm blocks, MLP 64->256->64). Variants: GELU baseline, and the
activation swapped for PReLU(init=0.01) with the LayerCollapse regularizer at several λ (slopes in their own
optimizer group, lr 1e-2, no weight decay). After training: accuracy, collapse of every block within 0.05 of
slope 1 (no fine-tuning) in torch, and the same through ONNX (`lc_onnx.optimize`, tol 0.05), with ONNX
Runtime latency of both. Also accuracy as blocks are collapsed one by one, nearest-to-1 first (the paper's
Figure 4 analogue).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import lc_onnx
from lc_onnx import bench, train

sys.path.insert(0, str(Path(__file__).parent))
from sections import cpu_model  # noqa: E402

HERE = Path(__file__).parent
LAMBDAS = [0.0, 0.05, 0.2, 1.0]
THRESHOLD = 0.05


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class DeepMLP(nn.Module):
    def __init__(self, blocks: int = 6, d: int = 64, h: int = 256):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.blocks = nn.Sequential(*[Block(d, h) for _ in range(blocks)])
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 10))

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


class ViTBlock(nn.Module):
    def __init__(self, d: int, h: int, heads: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = Block(d, h)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.mlp(x)


class TinyViT(nn.Module):
    """8x8 image -> 16 patches of 2x2 -> d 64 tokens + cls -> 4 blocks -> head on cls."""

    def __init__(self, blocks: int = 4, d: int = 64, h: int = 256):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(d, h) for _ in range(blocks)])
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 10))

    def forward(self, x):
        n = x.shape[0]
        patches = x.reshape(n, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n, 16, 4)
        t = torch.cat([self.cls.expand(n, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.blocks(t)[:, 0])


MODELS = {"deep MLP (6 blocks)": DeepMLP, "tiny ViT (4 blocks)": TinyViT}


def data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte)


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def fit(model: nn.Module, lam: float | None, xtr, ytr, epochs: int, seed: int) -> nn.Module:
    """lam None: the GELU baseline. Otherwise PReLU(0.01) blocks and loss CE + lam·Σ(α−1)²."""
    if lam is not None:
        train.prepare(model, (xtr[:2],), init=0.01)
    return train_epochs(model, xtr, ytr, epochs, seed, lr=1e-3, lam=lam)


def train_epochs(model: nn.Module, xtr, ytr, epochs: int, seed: int, lr: float, lam: float | None = None,
                 slope_lr: float = 1e-2) -> nn.Module:
    """AdamW, batch 64, weight decay 0.01. With `lam` (a prepared model) the slopes get their own group
    (`slope_lr`, no decay) and the loss is CE + lam·Σ(α−1)²."""
    groups = train.param_groups(model, lr=lr, slope_lr=slope_lr) if lam is not None else model.parameters()
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            if lam:
                loss = loss + lam * train.regularizer(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def onnx_side(model: nn.Module, xte, yte, torch_collapsed: nn.Module, runs: int) -> dict:
    """Export the trained (uncollapsed) model, collapse with lc-onnx at tol 0.05, and compare with torch."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        train.export(model, (xte[:1],), path, dynamic_axes={"x": {0: "n"}}, input_names=["x"])
        result = lc_onnx.optimize(path, tol=THRESHOLD, validate=False)
        original = lc_onnx.io.load(path)
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"x": xte.numpy()})[0]
    with torch.no_grad():
        ref = torch_collapsed(xte).numpy()
    feeds = {"x": xte[:1].numpy()}
    before, after = bench.interleaved([original, result.model], feeds, runs=runs, warmup=10, threads=1)
    return {
        "rewrites": len(result.report.rewrites),
        "acc": float((logits.argmax(1) == yte.numpy()).mean()) * 100,
        "rel_vs_torch": float(np.linalg.norm(logits - ref) / np.linalg.norm(ref)),
        "ms_before": before.median_ms,
        "ms_after": after.median_ms,
    }


def progressive(model: nn.Module, xte, yte) -> list[float]:
    """Accuracy after collapsing 0, 1, ..., n blocks, the slope nearest 1 first (whatever the slope)."""
    order = sorted(train.slopes(model).items(), key=lambda kv: abs(kv[1] - 1))
    accs = [accuracy(model, xte, yte)]
    for k in range(1, len(order) + 1):
        m = copy.deepcopy(model)
        train.collapse(m, threshold=float("inf"), only=[n for n, _ in order[:k]])
        accs.append(accuracy(m, xte, yte))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs, one λ, nothing written")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    epochs, lambdas, runs = (3, [0.2], 20) if args.quick else (args.epochs, LAMBDAS, 200)
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = data(args.seed)
    rows, curves = [], {}
    for mname, cls in MODELS.items():
        for lam in [None, *lambdas]:
            torch.manual_seed(args.seed)
            start = time.time()
            model = fit(cls(), lam, xtr, ytr, epochs, args.seed)
            row = {"model": mname, "variant": "GELU baseline" if lam is None else f"LC λ={lam:g}",
                   "acc": accuracy(model, xte, yte), "params": params(model), "secs": time.time() - start}
            if lam is not None:
                sl = train.slopes(model)
                collapsed = copy.deepcopy(model)
                names = train.collapse(collapsed, THRESHOLD)
                row.update(blocks=f"{len(names)}/{len(sl)}", slopes=sl, acc_after=accuracy(collapsed, xte, yte),
                           params_after=params(collapsed), onnx=onnx_side(model, xte, yte, collapsed, runs))
                curves[(mname, lam)] = progressive(model, xte, yte)
            rows.append(row)
            print(_line(row), flush=True)
    if not args.quick:
        write(rows, curves, args)


def _line(r: dict) -> str:
    if "blocks" not in r:
        return f"{r['model']:22} {r['variant']:14} acc {r['acc']:.1f}%"
    o = r["onnx"]
    return (f"{r['model']:22} {r['variant']:14} acc {r['acc']:.1f}% -> {r['acc_after']:.1f}% "
            f"(onnx {o['acc']:.1f}%), collapsed {r['blocks']}, slopes "
            f"{min(r['slopes'].values()):.3f}..{max(r['slopes'].values()):.3f}, "
            f"latency {o['ms_before']:.3f} -> {o['ms_after']:.3f} ms")


def write(rows: list[dict], curves: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 4))
    for ax, mname in zip(axes, MODELS, strict=True):
        for (m, lam), accs in curves.items():
            if m == mname:
                ax.plot(range(len(accs)), accs, marker="o", label=f"λ={lam:g}")
        ax.set_title(mname)
        ax.set_xlabel("blocks collapsed (slope nearest 1 first, no fine-tuning)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = HERE / "train_digits.png"
    fig.savefig(png, dpi=110)

    lines = [
        "# LayerCollapse on scikit-learn digits",
        "",
        f"Command: `python benchmarks/train_digits.py --epochs {args.epochs} --seed {args.seed}`  ",
        f"Machine: {cpu_model() or platform.processor()}, 2 cores, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; {datetime.date.today().isoformat()}  ",
        "Data: 1,797 8x8 digits, 70/30 stratified split (seed 0); AdamW lr 1e-3, batch 64; "
        "slopes lr 1e-2 in their own group; collapse threshold 0.05, no fine-tuning.  ",
        "Latency: ONNX Runtime, batch 1, 1 thread, medians of 200 interleaved runs, before/after `lc_onnx.optimize`"
        " (tol 0.05).",
        "",
        "| model | variant | test acc | acc after collapse (torch) | acc after collapse (ONNX) | blocks collapsed "
        "| slopes min..max | params | ONNX latency (ms) | speedup | ONNX vs torch collapse (rel L2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "blocks" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['acc']:.1f} % | – | – | – | – | {r['params']:,} "
                         "| – | – | – |")
            continue
        o, s = r["onnx"], r["slopes"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['acc']:.1f} % | {r['acc_after']:.1f} % | {o['acc']:.1f} % "
            f"| {r['blocks']} | {min(s.values()):.3f}..{max(s.values()):.3f} "
            f"| {r['params']:,} -> {r['params_after']:,} | {o['ms_before']:.3f} -> {o['ms_after']:.3f} "
            f"| {o['ms_before'] / o['ms_after']:.2f}x | {o['rel_vs_torch']:.1e} |"
        )
    lines += ["", f"![accuracy vs blocks collapsed]({png.name})", ""]
    lines += ["Accuracy (%) as blocks are collapsed one by one, nearest-to-1 slope first:", ""]
    for (m, lam), accs in curves.items():
        lines.append(f"- {m}, λ={lam:g}: " + ", ".join(f"{a:.1f}" for a in accs))
    # the file also holds train_finetune.py's section (between its markers): keep it
    target = HERE / "RESULTS_train.md"
    text = target.read_text() if target.exists() else ""
    start = text.find("<!-- train_finetune.py: start -->")
    kept = "\n" + text[start:] if start >= 0 else ""
    target.write_text("\n".join(lines) + "\n" + kept)
    print(f"wrote {HERE / 'RESULTS_train.md'} and {png}")


if __name__ == "__main__":
    main()

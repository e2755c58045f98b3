"""Side-by-side latency study: original vs `lc-onnx` vs the hand-fused ideal, and what the peers do.

    python benchmarks/study.py            # full study, writes benchmarks/RESULTS.md and benchmarks/study.png
    python benchmarks/study.py --quick    # small shapes, few runs, writes nothing
    python benchmarks/study.py --provider cuda   # the device study: ViT-T, BERT-base, GPT-2 small in float32
                                                 # and float16, batch 1/8/32, on that ONNX Runtime provider;
                                                 # writes only the `## CUDA` section of benchmarks/RESULTS.md
    python benchmarks/study.py --provider cpu --quick   # the same code path on the CPU, tiny models, no write

Reference models, built here from configs with random weights and PReLU slope 1 in every MLP (no
downloads): ViT-T/16 (d 192, MLP 768, 12 blocks, 224x224), BERT-base (HF BertModel, 768/3072, 12 layers,
seq 128), GPT-2 small (HF GPT2Model, 768/3072, 12 layers, seq 128) and a VGG11 classifier head
(25088 > 4096 > 4096 > 1000). All exported with torch's legacy exporter (opset 17, dynamic batch).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import lc_onnx
from lc_onnx import bench, train
from lc_onnx.validate import session

sys.path.insert(0, str(Path(__file__).parent))
from sections import cpu_model, keep_others, replace_section, section  # noqa: E402, F401  (section: the tests use it here)

HERE = Path(__file__).parent
WORK = Path("/tmp/lc_study")


# --- reference models -------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, h: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-T/16: 224x224 -> 196 patches + cls, d 192, 12 pre-norm blocks, MLP 768."""

    def __init__(self, d=192, h=768, depth=12, heads=3, image=224, patch=16):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, h, heads) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1000))

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.blocks(t)[:, 0])


class VGGHead(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(25088, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Dropout(), nn.Linear(4096, 1000))


class HF(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclass
class Spec:
    name: str
    build: object  # () -> nn.Module
    args: object  # (batch) -> tuple of example tensors
    input_names: list[str]
    model_type: str | None = None  # for the ORT transformers optimizer
    blocks: int = 12
    heads: int = 0
    hidden: int = 0
    settings: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1), (1, 2), (8, 1), (8, 2)])
    activation: str = ""  # the MLP activation the model has before `prepare`


def specs(quick: bool) -> list[Spec]:
    import transformers

    seq = 16 if quick else 128
    d, h, layers = (64, 256, 2) if quick else (768, 3072, 12)
    bert = transformers.BertConfig(hidden_size=d, intermediate_size=h, num_hidden_layers=layers,
                                   num_attention_heads=max(d // 64, 1))
    gpt2 = transformers.GPT2Config(n_embd=d, n_inner=h, n_layer=layers, n_head=max(d // 64, 1), use_cache=False)
    vit = (lambda: ViT(depth=2, image=64)) if quick else ViT
    image = 64 if quick else 224
    return [
        Spec("ViT-T/16", vit, lambda b: (torch.randn(b, 3, image, image),), ["pixels"], None, 2 if quick else 12,
             activation="GELU (erf)"),
        Spec("BERT-base", lambda: HF(transformers.BertModel(bert, add_pooling_layer=False)),
             lambda b: (torch.randint(0, 1000, (b, seq)), torch.ones(b, seq, dtype=torch.int64)),
             ["input_ids", "attention_mask"], "bert", layers, max(d // 64, 1), d, activation="GELU (erf)"),
        Spec("GPT-2 small", lambda: HF(transformers.GPT2Model(gpt2)),
             lambda b: (torch.randint(0, 1000, (b, seq)), torch.ones(b, seq, dtype=torch.int64)),
             ["input_ids", "attention_mask"], "gpt2", layers, max(d // 64, 1), d,
             activation="GELU (tanh, gelu_new)"),
        Spec("VGG11 head", VGGHead, lambda b: (torch.randn(b, 25088),), ["features"], None, 2, activation="ReLU"),
    ]


# --- variants ---------------------------------------------------------------------------------------


def export(module: nn.Module, spec: Spec, path: Path, dtype: torch.dtype | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.export(module.eval(), spec.args(1), path, input_names=spec.input_names,
                     dynamic_axes={n: {0: "batch"} for n in spec.input_names}, dtype=dtype)
    return path


def save(model: onnx.ModelProto, path: Path) -> Path:
    big = model.ByteSize() > 1.8e9
    onnx.save(model, path, save_as_external_data=big, location=f"{path.name}.data")
    return path


def build_variants(spec: Spec, folder: Path, partial: bool) -> dict[str, Path]:
    """original, lc-onnx, ideal (fused in torch) — or, with `partial`, the same with only the last 4
    blocks at slope 1 (the others at 0.5, which lc-onnx leaves)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = spec.build().eval()
    names = train.prepare(model, spec.args(1), init=1.0)
    keep = names[:-4] if partial else []
    with torch.no_grad():
        for n in keep:
            model.get_submodule(n).weight.fill_(0.5)
    out = {"original": export(model, spec, folder / "original.onnx")}
    ideal = copy.deepcopy(model)
    train.collapse(ideal, threshold=0.05)
    out["ideal"] = export(ideal, spec, folder / "ideal.onnx")
    start = time.perf_counter()
    result = lc_onnx.optimize(out["original"], tol=1e-3, validate=False)
    out["lc-onnx"] = result.save(folder / "lc.onnx")
    print(f"  {spec.name}{' (partial)' if partial else ''}: lc-onnx {len(result.report.rewrites)} rewrites "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def export_own(spec: Spec, folder: Path) -> Path:
    """The model as built, with its own MLP activation: what a user has before LayerCollapse training
    (same seed, so the same weights as the prepared model)."""
    torch.manual_seed(0)
    return export(spec.build().eval(), spec, folder / "own.onnx")


def peers(spec: Spec, variants: dict[str, Path], folder: Path) -> dict[str, Path | str]:
    """What each peer makes of the original (and of lc-onnx's output): a path, or why it failed."""
    out: dict[str, Path | str] = {}
    folder.mkdir(parents=True, exist_ok=True)

    def attempt(name, fn):
        start = time.perf_counter()
        try:
            out[name] = fn()
            print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as e:  # a peer's failure is a result to report, not a reason to stop
            out[name] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
            print(f"  {name}: {out[name]}", flush=True)

    def onnxsim_of(src: Path, dst: Path):
        import onnxsim

        model, ok = onnxsim.simplify(str(src))
        return save(model, dst)

    def onnxslim_of(src: Path, dst: Path):
        import onnxslim

        return save(onnxslim.slim(str(src)), dst)

    def onnxoptimizer_of(src: Path, dst: Path):
        import onnxoptimizer

        return save(onnxoptimizer.optimize(onnx.load(src)), dst)

    def ort_offline(src: Path, dst: Path):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return dst

    def ort_transformers(src: Path, dst: Path):
        from onnxruntime.transformers import optimizer

        m = optimizer.optimize_model(str(src), model_type=spec.model_type, num_heads=spec.heads,
                                     hidden_size=spec.hidden)
        m.save_model_to_file(str(dst))
        return dst

    o, lc = variants["original"], variants["lc-onnx"]
    attempt("onnxsim", lambda: onnxsim_of(o, folder / "onnxsim.onnx"))
    attempt("onnxslim", lambda: onnxslim_of(o, folder / "onnxslim.onnx"))
    attempt("onnxoptimizer", lambda: onnxoptimizer_of(o, folder / "onnxoptimizer.onnx"))
    attempt("ORT offline ENABLE_ALL", lambda: ort_offline(o, folder / "ort_all.onnx"))
    attempt("lc-onnx + onnxsim", lambda: onnxsim_of(lc, folder / "lc_onnxsim.onnx"))
    if spec.model_type:
        attempt("ORT transformers optimizer", lambda: ort_transformers(o, folder / "ort_tf.onnx"))
        attempt("lc-onnx + ORT transformers optimizer", lambda: ort_transformers(lc, folder / "lc_ort_tf.onnx"))
    return out


# --- measurement ------------------------------------------------------------------------------------


def ops(path: Path) -> dict[str, int]:
    m = onnx.load(path, load_external_data=False)
    counts = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    fused = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits")
    return {"linear": sum(counts.get(k, 0) for k in fused), "PRelu": counts.get("PRelu", 0), "nodes": len(m.graph.node)}


def size_and_params(path: Path) -> tuple[int, int]:
    m = onnx.load(path, load_external_data=False)
    params = sum(math.prod(t.dims) for t in m.graph.initializer)
    files = [path] + [path.with_name(f"{path.name}.data")]
    return sum(f.stat().st_size for f in files if f.exists()), params


def max_error(paths: list[Path], feeds) -> list[float]:
    ref = None
    errors = []
    for p in paths:
        out = session(p).run(None, feeds)[0]
        ref = out if ref is None else ref
        errors.append(float(np.abs(out - ref).max()))
    return errors


def feeds_for(spec: Spec, batch: int) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(spec.input_names, spec.args(batch), strict=True)}


def runs_for(paths: list[Path], feeds, threads: int, budget_s: float) -> int:
    """As many runs as fit the time budget for this group, between 5 and 50."""
    s = session(paths[0], None, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=False)
    s.run(None, feeds)
    start = time.perf_counter()
    s.run(None, feeds)
    one = time.perf_counter() - start
    return int(min(50, max(5, budget_s / (one * len(paths)))))


def time_group(paths: list[Path], feeds, threads: int, budget_s: float) -> tuple[list[bench.Latency], int]:
    runs = runs_for(paths, feeds, threads, budget_s)
    return bench.interleaved(paths, feeds, runs=runs, warmup=3, threads=threads), runs


def spinning_check(paths: list[Path], feeds, threads: int, rounds: int = 6, block: int = 8) -> list[tuple]:
    """The models with idle worker threads spinning (ORT's default) and not: models alternate in
    blocks of `block` runs (the first run of each block untimed), so a model's spinning threads only touch
    the next model's first run. Returns (spinning, median ms of each model)."""
    out = []
    for spin in (False, True):
        sessions = [session(p, None, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, spinning=spin) for p in paths]
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(rounds):
            for j in range(len(sessions)):
                k = (j + r) % len(sessions)
                for i in range(block + 1):
                    start = time.perf_counter()
                    sessions[k].run(None, feeds)
                    if i:
                        times[k].append((time.perf_counter() - start) * 1e3)
        out.append((spin, [float(np.median(t)) for t in times]))
        del sessions
    return out


# --- the device study (--provider): float32 and float16, batch 1/8/32, inputs and outputs bound on the device --


DTYPES = {"fp32": None, "fp16": torch.float16}
DEVICE_MODELS = ("ViT-T/16", "BERT-base", "GPT-2 small")
SECTION = {"cuda": "## CUDA", "cpu": "## CPU provider, device study path"}
GRAPH_SECTION = "## CUDA graphs"  # --cuda-graph: every run a replayed CUDA graph, inputs pinned to the batch's shapes


def device_variants(spec: Spec, folder: Path, dtypes: list[str]) -> dict[str, dict[str, Path]]:
    """Per dtype: original (prepared, every MLP at slope 1), lc-onnx (its `lc-onnx optimize` output), ideal
    (fused in torch, then exported in that dtype) and own (the model as built, with its own MLP activation: what a
    user has before LayerCollapse; same seed, same weights). One prepared model for all dtypes."""
    torch.manual_seed(0)
    own = spec.build().eval()
    torch.manual_seed(0)
    model = spec.build().eval()
    train.prepare(model, spec.args(1), init=1.0)
    ideal = copy.deepcopy(model)
    train.collapse(ideal, threshold=0.05)
    out = {}
    for name in dtypes:
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        v = {"original": export(model, spec, sub / "original.onnx", DTYPES[name])}
        result = lc_onnx.optimize(v["original"], tol=1e-3, validate=False)
        v["lc-onnx"] = result.save(sub / "lc.onnx")
        v["ideal"] = export(ideal, spec, sub / "ideal.onnx", DTYPES[name])
        v["own"] = export(own, spec, sub / "own.onnx", DTYPES[name])
        print(f"  {spec.name} {name}: lc-onnx {len(result.report.rewrites)} rewrites", flush=True)
        out[name] = v
    return out


def device_feeds(spec: Spec, batch: int, dtype: str) -> dict[str, np.ndarray]:
    feeds = feeds_for(spec, batch)
    if dtype == "fp16":
        feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return feeds


def provider_error(paths: list[Path], feeds, providers: list[str]) -> tuple[float, float]:
    """Max |diff| and relative L2 of lc-onnx's output (paths[1]) against the original's (paths[0]) on the
    provider, in float64. On CUDA, float32 MatMul runs in TF32: ~1e-3 between any two graphs."""
    a, b = (np.asarray(session(p, providers).run(None, feeds)[0], np.float64) for p in paths[:2])
    return float(np.abs(a - b).max()), float(np.linalg.norm(a - b) / np.linalg.norm(a))


def device_name(provider: str) -> str:
    """The GPU's name (nvidia-smi, else torch), or the CPU's."""
    if provider == "cuda":
        smi = subprocess.run(["sh", "-c", "nvidia-smi --query-gpu=name --format=csv,noheader | head -1"],
                             capture_output=True, text=True)
        if smi.stdout.strip():
            return smi.stdout.strip()
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return "an unnamed CUDA device"
    return f"{cpu_model() or 'a CPU'}, {os.cpu_count()} cores"


@dataclass
class DeviceRow:
    model: str
    dtype: str
    batch: int
    runs: int
    ms: list[float]  # original, lc-onnx, ideal, own activation
    max_err: float
    rel_err: float
    share: float  # MAC share of the collapsible chains in the original at this batch
    mac_ratio: float  # total MACs / MACs once they are folded

    @property
    def speedup(self) -> float:
        return self.ms[0] / self.ms[1]

    @property
    def ideal_ratio(self) -> float:
        return self.ms[2] / self.ms[1]  # ideal ms / lc-onnx ms, as in the CPU table: < 1 where lc-onnx is slower

    @property
    def own_speedup(self) -> float:
        return self.ms[3] / self.ms[1]  # lc-onnx against the model before LayerCollapse, with its own activation

    def line(self) -> str:
        o, lc, ideal, own = self.ms
        return (f"| {self.model} | {self.dtype} | {self.batch} | {self.runs} | {own:.3f} | {o:.3f} | {lc:.3f} "
                f"| {ideal:.3f} | {self.speedup:.2f}x | {o / ideal:.2f}x | {self.ideal_ratio:.3f} "
                f"| {self.own_speedup:.2f}x "
                f"| {100 * self.share:.1f}% | {self.mac_ratio:.2f}x | {self.max_err:.1e} / {self.rel_err:.1e} |")


def device_study(provider: str, quick: bool, folder: Path, batches: tuple[int, ...] = (1, 8, 32),
                 dtypes: tuple[str, ...] = ("fp32", "fp16"), models: tuple[str, ...] = DEVICE_MODELS,
                 runs: int = 100, warmup: int = 10, threads: int = 0, io_binding: bool = True,
                 cuda_graph: bool = False) -> list[DeviceRow]:
    """original vs lc-onnx vs ideal on `provider` (`cpu` or `cuda`, exit 2 where it cannot be had), each row
    interleaved through `lc_onnx.bench.interleaved` (IOBinding on the device unless `io_binding` is off),
    with the analytic MAC share of the chains lc-onnx collapses (`lc_onnx.bench.mac_share`). With `cuda_graph`
    (CUDA only) each run replays a captured CUDA graph of the model pinned to the batch's input shapes."""
    providers = [bench.provider(provider)]
    timed = [(providers[0], {"enable_cuda_graph": "1"})] if cuda_graph else providers
    rows = []
    for spec in specs(quick):
        if spec.name not in models:
            continue
        print(spec.name, flush=True)
        variants = device_variants(spec, folder / spec.name.replace("/", "_").replace(" ", "_"), list(dtypes))
        for dtype, v in variants.items():
            paths = [v["original"], v["lc-onnx"], v["ideal"], v["own"]]
            head = onnx.load(paths[0], load_external_data=False)
            candidates = lc_onnx.inspect(paths[0])
            max_err, rel_err = provider_error(paths, device_feeds(spec, 1, dtype), providers)
            for batch in batches:
                feeds = device_feeds(spec, batch, dtype)
                macs = bench.mac_share(head, {k: list(a.shape) for k, a in feeds.items()}, candidates, feeds)
                shapes = {k: list(a.shape) for k, a in feeds.items()}
                timed_models = [bench.pinned(p, shapes) for p in paths] if cuda_graph else paths
                lat = bench.interleaved(timed_models, feeds, runs=runs, warmup=warmup, threads=threads,
                                        providers=timed, io_binding=io_binding or cuda_graph,
                                        names=[str(p) for p in paths])
                rows.append(DeviceRow(spec.name, dtype, batch, runs, [x.median_ms for x in lat], max_err, rel_err,
                                      macs.share, macs.mac_ratio))
                print(rows[-1].line(), flush=True)
    return rows


def device_section(provider: str, rows: list[DeviceRow], io_binding: bool, command: str,
                   cuda_graph: bool = False) -> str:
    """The RESULTS.md section of a device study: the rows, and the issue's summary (speedup per batch)."""
    name = device_name(provider)
    binding = ("inputs and outputs bound on the device (ORT IOBinding; each run writes into the same output "
               "buffers, and its time includes waiting for the device)") if io_binding or cuda_graph \
        else "`sess.run` with numpy inputs"
    if cuda_graph:
        binding += (", each run a replay of the CUDA graph ONNX Runtime captured (`enable_cuda_graph`) of the "
                    "model with its inputs pinned to the batch's shapes (`lc_onnx.bench.pinned`)")
    summary = {}
    for r in rows:
        summary.setdefault((r.model, r.dtype), []).append(r)
    batches = sorted({r.batch for r in rows})
    lines = [
        GRAPH_SECTION if cuda_graph else SECTION[provider],
        "",
        f"Command: `{command}`  ",
        f"Machine: {name}; onnxruntime {ort.__version__} ({bench.PROVIDERS[provider]}), onnx {onnx.__version__}, "
        f"torch {torch.__version__}; {datetime.date.today().isoformat()}.  ",
        f"Models as above (random weights, slope 1 in every MLP, exported in float32 or, for fp16, with "
        f"`lc_onnx.train.export(..., dtype=torch.float16)`); lc-onnx = `lc-onnx optimize` of that export, ideal = "
        f"fused in torch and exported in the same dtype, own = the model before LayerCollapse, with its own MLP "
        f"activation (GELU; same weights), which ONNX Runtime fuses where it leaves a PRelu alone. Latency: "
        f"median of {rows[0].runs if rows else 0} "
        f"interleaved runs per model after warm-up, {binding}. MAC share: the analytic share of MatMul/Gemm/Conv "
        f"MACs held by the chains lc-onnx collapses, and the MAC ratio: total MACs before / after the fold, the "
        f"speedup if time followed MACs (a yardstick, not a bound: the collapse also removes the PRelu nodes and "
        f"the wide intermediates). Error: lc-onnx against the original on this provider, batch 1 "
        f"(max |diff| / relative L2).",
        "",
        "Speedup of lc-onnx's output over the prepared original (PReLU at 1) per batch; ideal / lc-onnx and "
        "lc-onnx over own activation: the range over the batches.",
        "",
        "| model | dtype | " + " | ".join(f"batch {b}" for b in batches)
        + " | ideal / lc-onnx | lc-onnx vs own activation | MLP MAC share |",
        "|---|---|" + "---|" * len(batches) + "---|---|---|",
    ]
    for (model, dtype), rs in summary.items():
        by = {r.batch: r for r in rs}
        ratio, own = [r.ideal_ratio for r in rs], [r.own_speedup for r in rs]
        lines.append(f"| {model} | {dtype} | " + " | ".join(f"{by[b].speedup:.2f}x" if b in by else "–"
                                                           for b in batches)
                     + f" | {min(ratio):.2f}–{max(ratio):.2f} | {min(own):.2f}–{max(own):.2f}x "
                     f"| {100 * rs[0].share:.0f}% (MAC ratio "
                     f"{rs[0].mac_ratio:.2f}x) |")
    lines += [
        "",
        "| model | dtype | batch | runs | own ms | original ms | lc-onnx ms | ideal ms | lc-onnx speedup "
        "| ideal speedup | ideal/lc-onnx | lc-onnx vs own | MLP MAC share | MAC ratio | err max / rel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[r.line() for r in rows],
    ]
    return "\n".join(lines) + "\n"


def device_main(args) -> None:
    if args.provider == "cuda":
        try:  # the CUDA and cuDNN libraries of the machine's torch (onnxruntime-gpu >= 1.21)
            ort.preload_dlls()
        except Exception:  # an older onnxruntime, or the libraries are on the path already
            pass
    try:
        bench.check_options(args.provider, threads=args.threads, cuda_graph=args.cuda_graph)
        bench.provider(args.provider)
    except bench.InputError as e:
        raise SystemExit(f"error: {e}") from None
    quick = args.quick
    rows = device_study(args.provider, quick, WORK / f"device_{args.provider}", batches=(1, 2) if quick else (1, 8, 32),
                        runs=3 if quick else args.runs, warmup=1 if quick else 10, threads=args.threads,
                        io_binding=not args.no_io_binding, cuda_graph=args.cuda_graph)
    body = device_section(args.provider, rows, not args.no_io_binding, shown_command(sys.argv[1:]), args.cuda_graph)
    out = Path(args.out) if args.out else (None if quick else HERE / "RESULTS.md")
    if out is None:
        print(body)
        return
    heading = GRAPH_SECTION if args.cuda_graph else SECTION[args.provider]
    out.write_text(replace_section(out.read_text() if out.exists() else "", heading, body))
    print(f"wrote the {heading!r} section of {out}")


def shown_command(argv: list[str]) -> str:
    """The command as RESULTS.md shows it: without `--out FILE` / `--out=FILE`, which says where, not what."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return " ".join(["python benchmarks/study.py", *kept])


# --- report -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few runs; writes nothing")
    ap.add_argument("--budget", type=float, default=12.0, help="seconds of timed runs per group (default 12)")
    ap.add_argument("--provider", choices=sorted(bench.PROVIDERS),
                    help="run the device study on this ONNX Runtime provider instead (fp32 and fp16, batch 1/8/32)")
    ap.add_argument("--runs", type=int, default=100, help="device study: timed runs per model and row (default 100)")
    ap.add_argument("--threads", type=int, default=0, help="device study: intra-op threads (default: ORT's choice)")
    ap.add_argument("--no-io-binding", action="store_true", help="device study: time sess.run with numpy inputs")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="device study, --provider cuda only: replay captured CUDA graphs (inputs pinned to each "
                         "batch's shapes); writes the `## CUDA graphs` section")
    ap.add_argument("--out", help="device study: the RESULTS file whose section to replace (default "
                                  "benchmarks/RESULTS.md; with --quick, print unless given)")
    args = ap.parse_args()
    if args.provider:
        device_main(args)
        return
    torch.set_num_threads(2)
    budget = 1.0 if args.quick else args.budget
    lines, chart = [], []
    peer_lines, spin_lines, own_lines = [], [], []
    ratios: list[tuple[str, float, float]] = []  # (row, ideal/lc-onnx, lc-onnx speedup)
    spun: dict[bool, float] = {}  # ViT-T batch 1, 2 threads: lc-onnx speedup with spinning off / on
    for spec in specs(args.quick):
        folder = WORK / spec.name.replace("/", "_").replace(" ", "_")
        print(spec.name, flush=True)
        v = build_variants(spec, folder / "full", partial=False)
        order = ["original", "lc-onnx", "ideal"]
        paths = [v[k] for k in order]
        meta = [size_and_params(p) for p in paths]
        errs = max_error(paths, feeds_for(spec, 1))
        for batch, threads in spec.settings:
            lat, runs = time_group(paths, feeds_for(spec, batch), threads, budget)
            o, lc, ideal = (x.median_ms for x in lat)
            collapsed = f"all {spec.blocks}"
            if ideal / lc < 0.98 and not args.quick:  # below target: measure again, longer, and show both
                lines.append(f"| {spec.name} | {collapsed} (first try) | {batch} | {threads} | {runs} | {o:.2f} "
                             f"| {lc:.2f} | {ideal:.2f} | {o / lc:.2f}x | {o / ideal:.2f}x | {ideal / lc:.3f} "
                             "| | | |")
                print(lines[-1], flush=True)
                first = ideal / lc
                lat, runs = time_group(paths, feeds_for(spec, batch), threads, 3 * budget)
                o, lc, ideal = (x.median_ms for x in lat)
                collapsed += f" (again, 3x the runs; first try {first:.3f})"
            lines.append(
                f"| {spec.name} | {collapsed} | {batch} | {threads} | {runs} | {o:.2f} | {lc:.2f} | {ideal:.2f} "
                f"| {o / lc:.2f}x | {o / ideal:.2f}x | {ideal / lc:.3f} "
                f"| {meta[0][1] / 1e6:.1f}M > {meta[1][1] / 1e6:.1f}M "
                f"| {meta[0][0] / 1e6:.1f} > {meta[1][0] / 1e6:.1f} MB | {errs[1]:.1e} |")
            chart.append((f"{spec.name}\nb{batch} t{threads}", o / lc, o / ideal))
            ratios.append((f"{spec.name} all, batch {batch}, {threads} thread(s)", ideal / lc, o / lc))
            print(lines[-1], flush=True)
        if spec.name.startswith("ViT"):
            for spin, (o, lc, ideal) in spinning_check(paths, feeds_for(spec, 1), 2, rounds=2 if args.quick else 6):
                spun[spin] = o / lc
                spin_lines.append(f"| {spec.name} | 1 | 2 | {'on (ORT default)' if spin else 'off (bench)'} "
                                  f"| {o:.2f} | {lc:.2f} | {ideal:.2f} | {o / lc:.2f}x | {o / ideal:.2f}x |")
                print(spin_lines[-1], flush=True)
        if spec.blocks > 4:
            pv = build_variants(spec, folder / "partial", partial=True)
            ppaths = [pv[k] for k in order]
            pmeta = [size_and_params(p) for p in ppaths]
            perrs = max_error(ppaths, feeds_for(spec, 1))
            for batch, threads in [(1, 2)]:
                lat, runs = time_group(ppaths, feeds_for(spec, batch), threads, budget)
                o, lc, ideal = (x.median_ms for x in lat)
                lines.append(
                    f"| {spec.name} | last 4 | {batch} | {threads} | {runs} | {o:.2f} | {lc:.2f} | {ideal:.2f} "
                    f"| {o / lc:.2f}x | {o / ideal:.2f}x | {ideal / lc:.3f} "
                    f"| {pmeta[0][1] / 1e6:.1f}M > {pmeta[1][1] / 1e6:.1f}M "
                    f"| {pmeta[0][0] / 1e6:.1f} > {pmeta[1][0] / 1e6:.1f} MB | {perrs[1]:.1e} |")
                ratios.append((f"{spec.name} last 4, batch {batch}, {threads} thread(s)", ideal / lc, o / lc))
                print(lines[-1], flush=True)
        own = [export_own(spec, folder / "full"), v["original"], v["lc-onnx"]]
        if spec.blocks > 4:
            own.append(pv["lc-onnx"])
        for batch, threads in [(1, 2), (8, 2)]:
            lat, runs = time_group(own, feeds_for(spec, batch), threads, budget)
            ms = [x.median_ms for x in lat] + [float("nan")] * (4 - len(own))
            own_lines.append(f"| {spec.name} | {spec.activation} | {batch} | {threads} | {runs} | "
                             + " | ".join("–" if m != m else f"{m:.2f}" for m in ms) + " | "
                             + " | ".join("–" if m != m else f"{ms[0] / m:.2f}x" for m in ms[1:]) + " |")
            print(own_lines[-1], flush=True)
        found = peers(spec, v, folder / "peers")
        ok = {k: p for k, p in found.items() if isinstance(p, Path)}
        tpaths = [v["original"], *ok.values()]
        lat, runs = time_group(tpaths, feeds_for(spec, 1), 2, budget)
        errs = max_error(tpaths, feeds_for(spec, 1))
        base = ops(v["original"])
        peer_lines.append(f"| {spec.name} | original | {base['linear']} | {base['PRelu']} | {base['nodes']} "
                          f"| {lat[0].median_ms:.2f} | 1.00x | – |")
        for (name, p), latency, err in zip(ok.items(), lat[1:], errs[1:], strict=True):
            c = ops(p)
            peer_lines.append(f"| {spec.name} | {name} | {c['linear']} | {c['PRelu']} | {c['nodes']} "
                              f"| {latency.median_ms:.2f} | {lat[0].median_ms / latency.median_ms:.2f}x | {err:.1e} |")
        for name, why in found.items():
            if isinstance(why, str):
                peer_lines.append(f"| {spec.name} | {name} | – | – | – | – | – | {why} |")
        print("\n".join(peer_lines[-len(found) - 1:]), flush=True)
    print("\n".join(targets(ratios, spun)))
    if not args.quick:
        write(lines, peer_lines, chart, budget, ratios, spin_lines, own_lines, spun)


def targets(ratios: list[tuple[str, float, float]], spun: dict[bool, float]) -> list[str]:
    """The issue's targets against what was measured: lc-onnx within 2% of the ideal everywhere, ViT-T fully
    collapsed at least 2.4x faster at batch 1 on 2 threads."""
    low = [f"{row} ({r:.3f})" for row, r, _ in ratios if r < 0.98]
    worst = min(ratios, key=lambda x: x[1])
    vit = [sp for row, _, sp in ratios if row == "ViT-T/16 all, batch 1, 2 thread(s)"]
    out = [f"- ideal/lc-onnx >= 0.98 everywhere: {'met' if not low else 'MISSED in ' + '; '.join(low)} "
           f"(lowest {worst[1]:.3f}: {worst[0]}; median over {len(ratios)} rows "
           f"{float(np.median([r for _, r, _ in ratios])):.3f})."]
    if vit:
        out.append(f"- ViT-T/16 fully collapsed >= 2.4x at batch 1, 2 threads: {'met' if vit[0] >= 2.4 else 'MISSED'} "
                   f"with spinning off, as `lc-onnx bench` measures ({vit[0]:.2f}x)")
    if vit and True in spun:
        out[-1] += (f"; {'met' if spun[True] >= 2.4 else 'MISSED'} with ONNX Runtime's default spinning, as a "
                    f"deployment runs one model ({spun[True]:.2f}x, spinning table).")
    return out


def write(lines: list[str], peer_lines: list[str], chart, budget: float, ratios, spin_lines, own_lines,
          spun) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 4.5))
    x = np.arange(len(chart))
    ax.bar(x - 0.2, [c[1] for c in chart], 0.4, label="lc-onnx")
    ax.bar(x + 0.2, [c[2] for c in chart], 0.4, label="ideal (fused in torch)")
    ax.set_xticks(x, [c[0] for c in chart], fontsize=7)
    ax.set_ylabel("speedup vs original (ONNX Runtime, CPU)")
    ax.axhline(1, color="gray", lw=0.8)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "study.png", dpi=110)
    text = [
        "# Latency study: original vs lc-onnx vs the hand-fused ideal",
        "",
        "Command: `.venv/bin/python benchmarks/study.py` (from the repository root)  ",
        f"Machine: {cpu_model()}, 2 cores, no GPU; onnxruntime {ort.__version__} (CPU), "
        f"onnx {onnx.__version__}, torch {torch.__version__}; {datetime.date.today().isoformat()}.  ",
        "Models: random weights, PReLU slope 1 in every MLP, exported with torch's legacy exporter (opset 17). "
        "ideal = the MLPs fused in torch before export (`lc_onnx.train.collapse`). "
        f"Latency: ONNX Runtime ORT_ENABLE_ALL, medians of interleaved runs (about {budget:g} s of runs per row, "
        "5 to 50 runs each; a row whose ideal/lc-onnx falls under 0.98 is measured again with 3x the time "
        "and both are shown); ratios are what carry over, absolute times are context. "
        "`last 4`: the first blocks at slope 0.5 (left by lc-onnx, which runs them as LeakyRelu; the ideal "
        "keeps PRelu there, so lc-onnx can beat it), the last 4 at 1.",
        "",
        "| model | collapsed | batch | threads | runs | original ms | lc-onnx ms | ideal ms | lc-onnx speedup "
        "| ideal speedup | ideal/lc-onnx | params | file | max err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        "![speedups](study.png)",
        "",
        "## Targets",
        "",
        *targets(ratios, spun),
        "",
        "## Against the model before LayerCollapse (its own activation)",
        "",
        "The rows above start from the prepared model (PReLU at slope 1), which is what lc-onnx is given. A user "
        "starts from the model with its own activation, which ONNX Runtime fuses (Gelu) where it leaves a "
        "PRelu alone: the prepared model is slower than the one it came from until its blocks are collapsed. "
        "`last 4` here is lc-onnx's output for the partial setting, where the 8 blocks left keep slope 0.5 "
        "and run as LeakyRelu (`prelu_to_leaky_relu`). Speedups are against the own-activation model.",
        "",
        "| model | own activation | batch | threads | runs | own ms | PReLU(1) ms | lc-onnx all ms "
        "| lc-onnx last 4 ms | PReLU(1) | lc-onnx all | lc-onnx last 4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *own_lines,
        "",
        "## Idle worker threads spinning (ViT-T/16, batch 1, 2 threads)",
        "",
        "`lc-onnx bench` and the rows above turn spinning off (`session.intra_op.allow_spinning=0`): with it on, "
        "a session's idle workers spin on the cores while the next model runs, and interleaved runs slow each "
        "other down. Here the models alternate in blocks of 8 runs (the first of each block untimed), so a "
        "model's spinning threads touch only the next model's first, untimed run:",
        "",
        "| model | batch | threads | spinning | original ms | lc-onnx ms | ideal ms | lc-onnx speedup "
        "| ideal speedup |",
        "|---|---|---|---|---|---|---|---|---|",
        *spin_lines,
        "",
        "## What the peers do (batch 1, 2 threads)",
        "",
        "linear = MatMul/Gemm (and ORT's fused variants) nodes; a tool that fused the chain would lower it and "
        "remove PRelu.",
        "",
        "| model | tool | linear nodes | PRelu | nodes | ms | speedup | max err / note |",
        "|---|---|---|---|---|---|---|---|",
        *peer_lines,
        "",
    ]
    # the sections this run does not measure (the device study's `--provider cuda [--cuda-graph]`, pipeline.py's
    # copied by hand) are kept as they are
    results = HERE / "RESULTS.md"
    results.write_text(keep_others("\n".join(text) + "\n", results.read_text() if results.exists() else ""))
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'study.png'}")


if __name__ == "__main__":
    main()

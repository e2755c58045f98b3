"""LayerCollapse in the pipeline a user deploys: GELU vs collapsed × {fp32, ONNX Runtime's transformers optimizer,
dynamic int8, static QDQ, optimizer then int8}: CPU latency × the GELU fp32 model, and accuracy on digits.

    python benchmarks/pipeline.py            # BERT-base shape (4 layers, seq 128), ViT-T/16; digits ViT (4 layers)
    python benchmarks/pipeline.py --quick    # tiny shapes, few runs, a 1-layer digits ViT: a smoke run
    python benchmarks/pipeline.py --skip-accuracy   # latency only (--skip-latency: accuracy only)

Prints markdown tables and writes nothing: RESULTS.md's section "In a deployment pipeline" was copied by hand
from two runs, with the command.

Latency models (random weights, built from configs by study.py's builders, batch 1, ONNX Runtime CPU, 1 thread):
GELU = the model as built (`study.export_own`); collapsed = `lc_onnx.optimize` of the same model prepared with
every MLP slope at 1 (what a finished LayerCollapse fine-tune gives). Each base then goes through
`onnxruntime.transformers.optimizer.optimize_model`, `onnxruntime.quantization.quantize_dynamic` (ORT's defaults:
int8 weights, per tensor), `quantize_static` (QDQ, uint8 activations / int8 weights, MinMax over a few random
calibration inputs), and the optimizer followed by `quantize_dynamic`. All models of a network run interleaved
(`lc_onnx.bench.interleaved`), twice; a ratio is GELU fp32 ms / variant ms of the same round.
Other orders: the prepared model through the optimizer or int8 first, then `lc_onnx.optimize` (chains folded).

Accuracy: the digits ViT of train_finetune.py (`ViTForImageClassification`, 4 layers, hidden 64, MLP 256),
pretrained with GELU, then fine-tuned twice from the same weights: with GELU, and prepared with λ=1 until every
slope is within 0.05 of 1. Both are saved with `save_pretrained` (the prepared one reloads through
`train.from_pretrained`) under --work, so a rerun skips training. The GELU model and `lc_onnx.optimize(tol=0.05)`
of the prepared one go through the same variants; each is scored on the 540 test images (calibration: training
images).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shlex
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import lc_onnx
from lc_onnx import bench, train
from lc_onnx.validate import session

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import study  # noqa: E402  (the reference models and their export)
import train_finetune as ft  # noqa: E402  (the digits ViT, its data and training)

WORK = Path("/tmp/lc_pipeline")
BASES = ("GELU", "collapsed")
STEPS = ("fp32", "ORT optimizer", "int8 dynamic", "QDQ static", "ORT optimizer → int8")
ORDERS = ("prepared → ORT optimizer → lc-onnx", "prepared → int8 dynamic → lc-onnx")
CALIBRATION = 8  # inputs the static quantizer calibrates on (latency models); digits: 8 batches of 16 images


# --- models -----------------------------------------------------------------------------------------


def latency_specs(quick: bool) -> list[study.Spec]:
    """BERT-base shape with 4 layers (seq 128) and ViT-T/16; with `quick`, study.py's tiny ones."""
    import transformers

    tiny = {s.name: s for s in study.specs(True)}
    if quick:
        bert = dataclasses.replace(tiny["BERT-base"], name="BERT (tiny: 2 layers, 64 wide, seq 16)")
        vit = dataclasses.replace(tiny["ViT-T/16"], name="ViT (tiny: 2 blocks, 64x64)", model_type="vit",
                                  heads=3, hidden=192)
        return [bert, vit]
    cfg = transformers.BertConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12)
    bert = study.Spec("BERT-base shape, 4 layers, seq 128",
                      lambda: study.HF(transformers.BertModel(cfg, add_pooling_layer=False)),
                      lambda b: (torch.randint(0, 1000, (b, 128)), torch.ones(b, 128, dtype=torch.int64)),
                      ["input_ids", "attention_mask"], "bert", 4, 12, 768, activation="GELU (erf)")
    vit = study.Spec("ViT-T/16", study.ViT, lambda b: (torch.randn(b, 3, 224, 224),), ["pixels"], "vit", 12, 3, 192,
                     activation="GELU (erf)")
    return [bert, vit]


def optimized(src: Path, dst: Path, model_type: str, heads: int, hidden: int) -> Path:
    """ONNX Runtime's offline transformers optimizer at its defaults for `model_type`."""
    from onnxruntime.transformers import optimizer

    optimizer.optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden).save_model_to_file(
        str(dst))
    return dst


def int8_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    # DefaultTensorType: the optimizer's com.microsoft ops carry no ONNX shape inference, so their outputs have no
    # type the quantizer can read (it raises "Unable to find data type" otherwise); they are all float here
    quantize_dynamic(src, dst, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


def qdq_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """QDQ, uint8 activations and int8 weights (ORT's advice for x86 CPUs), MinMax over `calibration`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return dst


def folds(result: lc_onnx.api.OptimizeResult) -> int:
    return sum(r.rule == "collapse_linear_chain" for r in result.report.rewrites)


def variants(bases: dict[str, Path], folder: Path, model_type: str, heads: int, hidden: int,
             calibration: list[dict[str, np.ndarray]], log=print) -> dict[tuple[str, str], Path]:
    """(base, step) -> path for every base and STEPS entry."""
    out = {}
    for base, src in bases.items():
        stem = base.lower()
        start = time.perf_counter()
        out[base, "fp32"] = src
        out[base, "ORT optimizer"] = optimized(src, folder / f"{stem}_opt.onnx", model_type, heads, hidden)
        out[base, "int8 dynamic"] = int8_dynamic(src, folder / f"{stem}_int8.onnx")
        out[base, "QDQ static"] = qdq_static(src, folder / f"{stem}_qdq.onnx", calibration)
        out[base, "ORT optimizer → int8"] = int8_dynamic(out[base, "ORT optimizer"], folder / f"{stem}_opt_int8.onnx")
        log(f"  {base}: variants in {time.perf_counter() - start:.0f} s")
    return out


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


# --- latency ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatencyResult:
    name: str
    folds: int  # chains lc-onnx folded into the collapsed base
    ms: dict[str, list[float]]  # label -> median ms per round
    order_folds: dict[str, int | str]  # ORDERS label -> chains folded there, or why it failed
    runs: int

    def ratios(self, label: str) -> list[float]:
        """GELU fp32 ms / this label's ms, per round."""
        return [g / m for g, m in zip(self.ms["GELU · fp32"], self.ms[label], strict=True)]


def latency(spec: study.Spec, folder: Path, runs: int, rounds: int = 2, warmup: int = 5, log=print) -> LatencyResult:
    """Build the GELU and collapsed bases of `spec`, their variants and the other orders; time all of them
    interleaved at batch 1 and 1 thread, `rounds` times."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    gelu = study.export_own(spec, folder)
    torch.manual_seed(0)  # the same weights as the GELU model (export_own's seed), every MLP at slope 1
    model = spec.build().eval()
    train.prepare(model, spec.args(1), init=1.0)
    prepared = study.export(model, spec, folder / "prepared.onnx")
    result = lc_onnx.optimize(prepared, tol=1e-3)
    collapsed = result.save(folder / "collapsed.onnx")
    log(f"  {spec.name}: exported, lc-onnx folded {folds(result)} chains in {time.perf_counter() - start:.0f} s")
    torch.manual_seed(1)
    calibration = [study.feeds_for(spec, 1) for _ in range(CALIBRATION)]
    paths = {f"{b} · {s}": p for (b, s), p in variants({"GELU": gelu, "collapsed": collapsed}, folder,
                                                       spec.model_type, spec.heads, spec.hidden, calibration,
                                                       log).items()}
    order_folds: dict[str, int | str] = {}
    first = {ORDERS[0]: lambda: optimized(prepared, folder / "prepared_opt.onnx", spec.model_type, spec.heads,
                                          spec.hidden),
             ORDERS[1]: lambda: int8_dynamic(prepared, folder / "prepared_int8.onnx")}
    for label, make in first.items():
        try:
            r = lc_onnx.optimize(make(), tol=1e-3)
            order_folds[label] = folds(r)
            paths[label] = r.save(folder / f"order{len(order_folds)}.onnx")
        except Exception as e:  # a failure here is a result to report
            order_folds[label] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
        log(f"  {label}: {order_folds[label]}")
    feeds = study.feeds_for(spec, 1)
    ms: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(rounds):
        start = time.perf_counter()
        lat = bench.interleaved(list(paths.values()), feeds, runs=runs, warmup=warmup, threads=1,
                                names=list(paths))
        for k, t in zip(paths, lat, strict=True):
            ms[k].append(t.median_ms)
        log(f"  round {i + 1}: {len(paths)} models x {runs} runs in {time.perf_counter() - start:.0f} s")
    return LatencyResult(spec.name, folds(result), ms, order_folds, runs)


def latency_table(results: list[LatencyResult]) -> list[str]:
    """One row per (base, step), one column per network: ratio × GELU fp32 of each round, and its ms."""
    head = "| variant | " + " | ".join(f"{r.name}: × GELU fp32 (round 1 / 2) | ms" for r in results) + " |"
    out = [head, "|" + "---|" * (1 + 2 * len(results))]
    for base in BASES:
        for step in STEPS:
            label = f"{base} · {step}"
            cells = []
            for r in results:
                cells += [" / ".join(f"{x:.2f}" for x in r.ratios(label)),
                          " / ".join(f"{x:.2f}" for x in r.ms[label])]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    for label in ORDERS:
        cells = []
        for r in results:
            done = r.order_folds[label]
            if label in r.ms:
                cells += [" / ".join(f"{x:.2f}" for x in r.ratios(label)) + f" ({done} chains folded)",
                          " / ".join(f"{x:.2f}" for x in r.ms[label])]
            else:
                cells += [str(done), "–"]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


# --- accuracy on digits -----------------------------------------------------------------------------


@dataclasses.dataclass
class DigitsSettings:
    layers: int = 4
    pre_epochs: int = 60
    ft_epochs: int = 20
    slope_lr: float = ft.SLOPE_LR
    lam: float = 1.0
    seed: int = 0

    def tag(self) -> str:
        return "_".join(f"{k}{v:g}" for k, v in dataclasses.asdict(self).items())


QUICK_DIGITS = DigitsSettings(layers=1, pre_epochs=ft.QUICK["pre_epochs"], ft_epochs=ft.QUICK["ft_epochs"],
                              slope_lr=ft.QUICK["slope_lr"])


def saved_at(settings: DigitsSettings, folder: Path) -> Path:
    """Where `digits_models` saves the two trained models (`gelu/`, `lc/`) for these settings."""
    return folder / f"digits_{settings.tag()}"


def digits_models(settings: DigitsSettings, folder: Path, log=print) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The GELU fine-tune and the LayerCollapse fine-tune (prepared, not collapsed) of one pretrained digits ViT,
    trained as train_finetune.py trains them; saved under `folder` with save_pretrained and loaded from there."""
    from transformers import ViTForImageClassification

    saved = saved_at(settings, folder)
    if not (saved / "lc" / "config.json").exists():
        s = settings
        xtr, ytr, xte, yte = ft.data(0)
        spec = ft.Spec(ft.HFViT, {"layers": s.layers})
        start = time.perf_counter()
        torch.manual_seed(s.seed)
        pre = ft.fit(spec.build(**spec.kwargs), xtr, ytr, s.pre_epochs, s.seed, ft.PRE_LR)
        torch.manual_seed(s.seed + 1)
        gelu = ft.fit(ft.copy.deepcopy(pre), xtr, ytr, s.ft_epochs, s.seed + 1, ft.FT_LR)
        lc = ft.copy.deepcopy(pre)
        ft.lc_prepare(spec, lc, xtr)
        torch.manual_seed(s.seed + 1)
        ft.fit(lc, xtr, ytr, s.ft_epochs, s.seed + 1, ft.FT_LR, lam=s.lam, slope_lr=s.slope_lr)
        gelu.hf.save_pretrained(saved / "gelu")
        lc.hf.save_pretrained(saved / "lc")
        log(f"  digits ViT trained in {time.perf_counter() - start:.0f} s, saved in {saved}")
    models = []
    for name, load in (("gelu", ViTForImageClassification.from_pretrained),
                       ("lc", lambda p: train.from_pretrained(ViTForImageClassification, p))):
        m = ft.HFViT(layers=settings.layers)
        m.hf = load(saved / name).eval()
        models.append(m.eval())
    return models[0], models[1]


@dataclasses.dataclass
class AccuracyResult:
    settings: DigitsSettings
    torch_acc: dict[str, float]  # GELU / LC (prepared) in torch, %
    slopes: tuple[float, float]
    folds: int
    correct: dict[tuple[str, str], int]  # (base, step) -> test images right
    logit_err: dict[tuple[str, str], float]  # max |logit - the base's fp32 logit|
    total: int


def accuracy(settings: DigitsSettings, folder: Path, log=print) -> AccuracyResult:
    folder.mkdir(parents=True, exist_ok=True)
    gelu, lc = digits_models(settings, folder, log)
    xtr, _, xte, yte = ft.data(0)
    sl = list(train.slopes(lc).values())
    ft.export(gelu, xte, folder / "digits_gelu.onnx")
    ft.export(lc, xte, folder / "digits_prepared.onnx")
    feeds = {"x": xte.numpy()}
    result = lc_onnx.optimize(folder / "digits_prepared.onnx", tol=ft.THRESHOLD, rtol=ft.THRESHOLD, inputs=feeds)
    collapsed = result.save(folder / "digits_collapsed.onnx")
    calibration = [{"x": xtr[i:i + 16].numpy()} for i in range(0, 16 * 8, 16)]
    (folder / "digits").mkdir(exist_ok=True)
    paths = variants({"GELU": folder / "digits_gelu.onnx", "collapsed": collapsed}, folder / "digits", "vit", 4,
                     gelu.hf.config.hidden_size, calibration, log)
    correct, err = {}, {}
    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as deployed: ORT's QDQ fusions change the arithmetic
    logits = {k: session(p, None, 1, full).run(None, feeds)[0] for k, p in paths.items()}
    for (base, step), out in logits.items():
        correct[base, step] = int((out.argmax(1) == yte.numpy()).sum())
        err[base, step] = float(np.abs(out - logits[base, "fp32"]).max())
    return AccuracyResult(settings, {"GELU": ft.accuracy(gelu, xte, yte), "LC": ft.accuracy(lc, xte, yte)},
                          (min(sl), max(sl)), folds(result), correct, err, len(yte))


def accuracy_table(r: AccuracyResult) -> list[str]:
    out = ["| variant | GELU: test accuracy | GELU: max \\|Δlogit\\| vs fp32 | collapsed: test accuracy "
           "| collapsed: max \\|Δlogit\\| vs fp32 |", "|---|---|---|---|---|"]
    for step in STEPS:
        cells = []
        for base in BASES:
            c = r.correct[base, step]
            cells += [f"{100 * c / r.total:.1f} % ({c}/{r.total})",
                      "–" if step == "fp32" else f"{r.logit_err[base, step]:.1e}"]
        out.append(f"| {step} | " + " | ".join(cells) + " |")
    return out


# --- main -------------------------------------------------------------------------------------------


def versions() -> str:
    import transformers

    return (f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few runs, a 1-layer digits ViT")
    ap.add_argument("--runs", type=int, default=None, help="interleaved runs per model and round (default 40; 3 quick)")
    ap.add_argument("--rounds", type=int, default=2, help="timings of each group (default 2)")
    ap.add_argument("--work", type=Path, default=WORK, help=f"models and the trained digits ViT (default {WORK})")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 40)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the exporters' and quantizers' advice; results are checked below
    ort.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizers' "consider pre-processing" on the root logger
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's and from_pretrained's bars
    start = time.time()
    command = "python benchmarks/pipeline.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                 if (argv if argv is not None else sys.argv[1:]) else "")
    print(f"Command: `{command}`  \n{versions()}; {study.device_name('cpu')}", flush=True)
    out: dict = {}
    if not args.skip_latency:
        results = []
        for spec in latency_specs(args.quick):
            print(spec.name, flush=True)
            folder = args.work / re.sub(r"[^A-Za-z0-9]+", "_", spec.name.split(",")[0]).strip("_")
            results.append(latency(spec, folder, runs, args.rounds, warmup=2 if args.quick else 5))
        print(f"\nLatency, batch 1, 1 thread, {runs} interleaved runs per model per round "
              f"(folds into the collapsed base: {', '.join(f'{r.name} {r.folds}' for r in results)}):\n")
        print("\n".join(latency_table(results)), flush=True)
        out["latency"] = results
    if not args.skip_accuracy:
        settings = QUICK_DIGITS if args.quick else DigitsSettings()
        print("\ndigits ViT", flush=True)
        r = accuracy(settings, args.work)
        print(f"\nAccuracy on the digits test set ({r.total} images); digits ViT {settings.layers} layers, torch: GELU "
              f"{r.torch_acc['GELU']:.1f} %, LC prepared {r.torch_acc['LC']:.1f} % (slopes {r.slopes[0]:.3f}.."
              f"{r.slopes[1]:.3f}, lc-onnx folded {r.folds} chains at tol {ft.THRESHOLD}):\n")
        print("\n".join(accuracy_table(r)), flush=True)
        out["accuracy"] = r
    print(f"\n{time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({k: _plain(v) for k, v in out.items()}, indent=1))
    return out


def _plain(v):
    if isinstance(v, list):
        return [_plain(x) for x in v]
    d = dataclasses.asdict(v)
    return {k: ({" · ".join(kk): vv for kk, vv in x.items()} if isinstance(x, dict) and x
                and isinstance(next(iter(x)), tuple) else x) for k, x in d.items()}


if __name__ == "__main__":
    main()

"""Decide before the fine-tune, check after it (issue 19 item 4), on the paper's workflow (train_finetune.py's
digits models): what `lc-onnx estimate` and `train.sensitivity` say about the pretrained GELU model, against what
the LayerCollapse fine-tune then reached, and how many blocks `lc-onnx optimize` folds in its export.

    python benchmarks/decide.py            # full sizes, one seed: prints the tables, writes its RESULTS section
    python benchmarks/decide.py --quick    # a smoke run (tiny models, few epochs and runs), writes nothing

Per model (seed 0, one λ):
  1. pretrain with GELU (train_finetune.fit), export it (gelu.onnx, train_finetune.export: opset 17, batch open);
  2. (a) `lc-onnx estimate gelu.onnx --batch 1` (1 thread, interleaved), twice;
     (b) `train.sensitivity(model, eval_fn=test accuracy, example_inputs)` on the pretrained model;
  3. fine-tune with LayerCollapse (train_finetune.lc_prepare + fit with λ), `train.collapse(threshold=0.05)`;
  4. export the fine-tuned prepared (uncollapsed) model (lc.onnx); (c) `lc-onnx optimize lc.onnx` with the defaults
     (--tol 0.05, the accuracy budget) and with `--no-budget` (all or nothing), each with `--report`; the default
     output timed against gelu.onnx (and estimate's what-if model of all blocks) with `lc_onnx.bench.interleaved`,
     batch 1, 1 thread, twice.
The CLI commands run in this process (`lc_onnx.cli.main`, as the console script calls it), exit code and output
kept: a command's failure is a result here, not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import lc_onnx
from lc_onnx import bench, train
from lc_onnx import cli as lc_cli

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # train_finetune.py's models, data and training, as its smoke test loads them
import train_finetune as tf  # noqa: E402
from sections import cpu_model  # noqa: E402

LAM = 1.0  # the README's recipe; train_finetune.py: λ=1 collapses every block of both models in every seed
QUICK = {"pre_epochs": 2, "ft_epochs": 6, "est_runs": 3, "runs": 5, "slope_lr": 0.05}
FULL = {"pre_epochs": 60, "ft_epochs": 20, "est_runs": 200, "runs": 200, "slope_lr": tf.SLOPE_LR}
START, END = "<!-- decide.py: start -->", "<!-- decide.py: end -->"
CHAIN_RULE = "collapse_linear_chain"


# ---------------------------------------------------------------- the CLI, in this process


def lc(*args: str) -> dict:
    """`lc-onnx ARGS` as the console script runs it (`lc_onnx.cli.main`), in this process: the exit code and
    what it printed."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            lc_cli.main.main(list(args), prog_name="lc-onnx")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue().strip()}


def shown(args: list[str | Path]) -> str:
    """The command as a reader would type it, the temp folder left out."""
    return "lc-onnx " + " ".join(a.name if isinstance(a, Path) else a for a in args)


def optimize(model: Path, options: list[str], tag: str, log=print) -> dict:
    """`lc-onnx optimize MODEL OPTIONS -o … --report …`: its exit code, last stderr line, the chains it folded
    (from the report; None when it wrote none) and the model it wrote (None when it wrote none)."""
    target, report = model.with_name(f"{model.stem}.{tag}.onnx"), model.with_name(f"report-{tag}.json")
    args = ["optimize", model, *options, "-o", target, "--report", report]
    r = lc(*map(str, args))
    written = json.loads(report.read_text()) if r["code"] == 0 and report.exists() else None
    rewrites = None if written is None else written["rewrites"]
    out = {"command": shown(args), "code": r["code"], "message": r["stderr"].splitlines()[-1] if r["code"] else "",
           "chains": None if rewrites is None else sum(w["rule"] == CHAIN_RULE for w in rewrites),
           "path": target if r["code"] == 0 and target.exists() else None,
           "budget": "" if written is None else written.get("budget", ""),
           "left": [] if written is None else [c["reason"] for c in written["skipped"]
                                               if "left for the accuracy budget" in c["reason"]]}
    log(f"  {out['command']}: exit {out['code']}, chains {out['chains']} {out['message']}")
    return out


# ---------------------------------------------------------------- one model


def run_model(spec: tf.Spec, xtr, ytr, xte, yte, tmp: Path, seed: int, pre_epochs: int, ft_epochs: int,
              est_runs: int, runs: int, slope_lr: float, lam: float = LAM, log=print) -> dict:
    """Pretrain, decide (estimate, sensitivity), fine-tune and collapse, then optimize and time. One dict."""
    out: dict = {"lam": lam, "seed": seed}
    start = time.time()
    torch.manual_seed(seed)
    pre = tf.fit(spec.build(**spec.kwargs), xtr, ytr, pre_epochs, seed, tf.PRE_LR)
    out["acc_pre"] = tf.accuracy(pre, xte, yte)
    log(f"  pretrained (GELU, {pre_epochs} epochs): {out['acc_pre']:.1f}% ({time.time() - start:.0f}s)")
    gelu_path = tmp / "gelu.onnx"
    tf.export(pre, xte, gelu_path)

    # (a) before: estimate on the GELU export, twice; the first run keeps its what-if models
    keep = tmp / "what-if"
    keep.mkdir()
    out["estimate"] = []
    for i in range(2):
        args = ["estimate", gelu_path, "--batch", "1", "--runs", str(est_runs), "--json", tmp / f"estimate{i}.json"]
        r = lc(*map(str, args), *(["--keep", str(keep)] if i == 0 else []))
        rows = json.loads((tmp / f"estimate{i}.json").read_text())["rows"] if r["code"] == 0 else []
        out["estimate"].append({"command": shown(args), "code": r["code"], "stderr": r["stderr"], "rows": rows})
        log(f"  estimate run {i + 1}: exit {r['code']}, " + ", ".join(
            f"{row['label']} {row['speedup']:.2f}x" for row in rows[1:]))

    # (b) before: each block linearized alone on the pretrained model, then cumulatively, on test accuracy
    module, example = spec.target(pre, xtr)
    sens = train.sensitivity(module, lambda _: tf.accuracy(pre, xte, yte), example)
    out["sensitivity"] = {"baseline": sens.baseline, "alone": sens.alone, "order": sens.order,
                          "cumulative": sens.cumulative, "skipped": sens.skipped}
    log("  sensitivity:\n" + "\n".join("    " + line for line in sens.table().splitlines()))

    # the GELU fine-tune arm (same epochs, same batch order), for the accuracy it would have kept
    torch.manual_seed(seed + 1)
    out["acc_gelu_ft"] = tf.accuracy(tf.fit(copy.deepcopy(pre), xtr, ytr, ft_epochs, seed + 1, tf.FT_LR), xte, yte)

    # the fine-tune and the torch collapse
    model = copy.deepcopy(pre)
    out["sites"] = tf.lc_prepare(spec, model, xtr)
    torch.manual_seed(seed + 1)
    tf.fit(model, xtr, ytr, ft_epochs, seed + 1, tf.FT_LR, lam=lam, slope_lr=slope_lr)
    out["acc_ft"] = tf.accuracy(model, xte, yte)
    out["slopes"] = train.slopes(model)
    collapsed = copy.deepcopy(model)
    out["collapsed"] = list(train.collapse(collapsed, tf.THRESHOLD))
    out["acc_after"] = tf.accuracy(collapsed, xte, yte)
    log(f"  fine-tuned (LC λ={lam:g}, {ft_epochs} epochs): {out['acc_ft']:.1f}%, slopes "
        + ", ".join(f"{s:.3f}" for s in out["slopes"].values())
        + f"; collapsed {len(out['collapsed'])}/{len(out['slopes'])}: {out['acc_after']:.1f}%")

    # (c) optimize the fine-tuned export with the defaults (the accuracy budget) and all or nothing
    lc_path = tmp / "lc.onnx"
    tf.export(model, xte, lc_path)
    out["optimize"] = {"default": optimize(lc_path, [], "default", log),
                       "no budget": optimize(lc_path, ["--no-budget"], "no-budget", log)}
    out["default_tol"] = lc_onnx.api.DEFAULT_TOL

    # (a) after: the default output against the GELU export (and estimate's what-if of all blocks), interleaved
    out["timed"] = out["optimize"]["default"]["command"]
    folded = out["optimize"]["default"]["path"]
    what_ifs = sorted(keep.glob("*.what-if-*.onnx"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    out["timing"] = []
    if folded is not None:
        sess = ort.InferenceSession(str(folded), providers=["CPUExecutionProvider"])
        out["acc_onnx"] = float((sess.run(None, {"x": xte.numpy()})[0].argmax(1) == yte.numpy()).mean()) * 100
        models = [gelu_path, folded, *what_ifs[-1:]]  # the last what-if is "all"
        for _ in range(2):
            lat = bench.interleaved(models, {"x": xte[:1].numpy()}, runs=runs, warmup=10, threads=1)
            out["timing"].append([t.median_ms for t in lat])
            log("  interleaved ms (GELU, optimized, what-if all): "
                + ", ".join(f"{t.median_ms:.4f}" for t in lat))
    out["secs"] = time.time() - start
    return out


# ---------------------------------------------------------------- tables


def _estimate_all(e: dict) -> dict | None:
    return e["rows"][-1] if e["rows"] else None


def table_a(results: dict[str, dict], runs: int) -> list[str]:
    head = ("| model | blocks | estimate before the fine-tune: all blocks, speedup (run 1 / run 2) | command "
            "| reached after it: `lc-onnx optimize` (defaults) vs GELU export (run 1 / run 2) "
            "| what-if all vs GELU, same interleaved runs | measured by |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for m, r in results.items():
        est = [_estimate_all(e) for e in r["estimate"]]
        est_s = " / ".join(f"{e['speedup']:.2f}x" if e else f"exit {x['code']}" for e, x in zip(est, r["estimate"],
                                                                                                  strict=True))
        n = len(r["slopes"])
        if r["timing"]:
            o = next(o for o in r["optimize"].values() if o["command"] == r["timed"])
            reached = (" / ".join(f"{t[0] / t[1]:.2f}x" for t in r["timing"])
                       + f" ({o['chains']}/{n} blocks folded by `{o['command']}`)")
            wi = " / ".join(f"{t[0] / t[2]:.2f}x" for t in r["timing"]) if len(r["timing"][0]) > 2 else "–"
        else:
            reached, wi = f"– (optimize exit {r['optimize']['default']['code']})", "–"
        cmd = r["estimate"][0]["command"]
        timed = r["timed"].split(" -o ")[1].split()[0] if r["timed"] else "–"
        by = f"`lc_onnx.bench.interleaved([gelu.onnx, {timed}, what-if all], x[:1], runs={runs}, threads=1)`"
        out.append(f"| {m} | {n} | {est_s} | `{cmd}` | {reached} | {wi} | {by} |")
    return out


def table_a_detail(results: dict[str, dict]) -> list[str]:
    """Every what-if row of estimate's first and second run: the paper's layer-wise view."""
    out = ["| model | what-if | blocks | params | MACs | speedup run 1 | speedup run 2 |",
           "|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        runs = [e["rows"] for e in r["estimate"] if e["rows"]]
        if not runs:
            continue
        for i, row in enumerate(runs[0]):
            sp = " | ".join(f"{rs[i]['speedup']:.2f}x" for rs in runs)
            out.append(f"| {m} | {row['label']} | {row['blocks']} | {row['params']:,} | {row['macs']:,} | {sp} |")
    return out


def _slope(r: dict, name: str) -> float | None:
    """The fine-tuned slope of the block sensitivity named `name` (prepare may name it from a wrapper above)."""
    hits = [v for k, v in r["slopes"].items() if k == name or k.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def table_b(results: dict[str, dict]) -> list[str]:
    head = ("| model | block | test acc, linearized alone (before ft) | rank (least harmful first) | cumulative "
            "acc (before ft) | slope after ft | collapsed (within 0.05) |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for m, r in results.items():
        s = r["sensitivity"]
        collapsed = set(r["collapsed"])
        for name in sorted(s["order"], key=lambda n: list(s["alone"]).index(n)):
            rank = s["order"].index(name)
            slope = _slope(r, name)
            done = any(c == name or c.endswith("." + name) for c in collapsed)
            out.append(f"| {m} | {name} | {s['alone'][name]:.1f} | {rank + 1} | {s['cumulative'][rank]:.1f} "
                       f"| {'?' if slope is None else f'{slope:.3f}'} | {'yes' if done else 'no'} |")
    return out


def table_b_summary(results: dict[str, dict]) -> list[str]:
    head = ("| model | pretrained (GELU) | all blocks linearized, no ft (sensitivity) | GELU fine-tune | LC fine-tune "
            "(uncollapsed) | after `train.collapse(threshold=0.05)` (torch) | after `lc-onnx optimize` (ORT) "
            "| blocks collapsed |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for m, r in results.items():
        s = r["sensitivity"]
        onnx = f"{r['acc_onnx']:.1f}" if "acc_onnx" in r else "–"
        out.append(f"| {m} | {r['acc_pre']:.1f} | {s['cumulative'][-1]:.1f} | {r['acc_gelu_ft']:.1f} "
                   f"| {r['acc_ft']:.1f} | {r['acc_after']:.1f} | {onnx} | {len(r['collapsed'])}/{len(r['slopes'])} |")
    return out


def table_c(results: dict[str, dict]) -> list[str]:
    head = "| model | slopes after ft (min..max) | command | exit | blocks folded | left for the budget / message |"
    out = [head, "|---|---|---|---|---|---|"]
    for m, r in results.items():
        sl = list(r["slopes"].values())
        for key, o in r["optimize"].items():
            msg = "; ".join([o["budget"], *o["left"]] if o["budget"] else [o["message"]]).replace("|", "\\|")
            folded = "– (nothing written)" if o["chains"] is None else f"{o['chains']}/{len(sl)}"
            tol = f" (--tol {r['default_tol']:g})" if key == "default" else ""
            out.append(f"| {m} | {min(sl):.3f}..{max(sl):.3f} | `{o['command']}`{tol} | {o['code']} | {folded} "
                       f"| {msg} |")
    return out


def reading(results: dict[str, dict]) -> list[str]:
    """One line per model and question, from the numbers above."""
    out = ["Reading:", ""]
    for m, r in results.items():
        n = len(r["slopes"])
        est = [_estimate_all(e) for e in r["estimate"]]
        if all(est) and r["timing"]:
            e = [x["speedup"] for x in est]
            got = [t[0] / t[1] for t in r["timing"]]
            out.append(f"- (a) {m}: estimate said {min(e):.2f}–{max(e):.2f}x for all {n} blocks before the fine-tune; "
                       f"the fine-tuned export reached {min(got):.2f}–{max(got):.2f}x "
                       f"(reached / estimated: {min(got) / max(e):.2f}–{max(got) / min(e):.2f}).")
        s = r["sensitivity"]
        worst = s["order"][-1]
        out.append(f"- (b) {m}: before the fine-tune, linearizing all {n} blocks costs "
                   f"{s['baseline'] - s['cumulative'][-1]:.1f} points, the most harmful alone being {worst} "
                   f"({s['baseline'] - s['alone'][worst]:.1f}); the fine-tune collapsed {len(r['collapsed'])}/{n} "
                   f"(that one included: {'yes' if any(c.endswith(worst) for c in r['collapsed']) else 'no'}), "
                   f"{r['acc_after']:.1f} % after collapse against {r['acc_pre']:.1f} % pretrained and "
                   f"{r['acc_gelu_ft']:.1f} % for the GELU fine-tune.")
        o = r["optimize"]
        fold = {k: f"nothing (exit {v['code']})" if v["chains"] is None else f"{v['chains']}/{n}" for k, v in o.items()}
        out.append(f"- (c) {m}: the defaults (`--tol {r['default_tol']:g}`, the accuracy budget) fold "
                   f"{fold['default']}" + (f" ({o['default']['budget']})" if o["default"]["budget"] else "")
                   + f"; all or nothing (`--no-budget`) folds {fold['no budget']}.")
    return out


def tables(results: dict[str, dict], runs: int) -> list[str]:
    return ["(a) estimate before the fine-tune against the speedup reached after it (batch 1, 1 thread):", "",
            *table_a(results, runs), "", "estimate's rows (what-if: activations taken out and folded, before any "
            "fine-tune):", "", *table_a_detail(results), "",
            "(b) sensitivity before the fine-tune (test accuracy %, 540 images) against what the fine-tune collapsed. "
            "Measured by `train.sensitivity(pretrained, eval_fn=lambda _: accuracy(pretrained, x_test, y_test), "
            "example_inputs=(x[:2],))` (the HF ViT: its `.hf` with `{\"pixel_values\": x[:2]}`) before; "
            "`train.slopes(model)` and `train.collapse(model, threshold=0.05)` after the fine-tune:",
            "", *table_b(results), "", *table_b_summary(results), "",
            "(c) `lc-onnx optimize` on the fine-tuned export:", "", *table_c(results)]


# ---------------------------------------------------------------- RESULTS_train.md


def write(results: dict[str, dict], cfg: dict, secs: float, argv: list[str]) -> None:
    lines = [
        START,
        "# Decide before the fine-tune, check after it (issue 19 item 4)",
        "",
        f"Command: `python benchmarks/decide.py{''.join(' ' + a for a in argv)}` ({secs / 60:.0f} min)  ",
        f"Machine: {cpu_model() or platform.processor()}, 2 cores shared with other work (torch and ONNX "
        f"Runtime 1 thread), torch {torch.__version__}, onnxruntime {ort.__version__}; "
        f"{datetime.date.today().isoformat()}  ",
        f"Workflow: train_finetune.py's models, data and training (imported), seed 0: pretrain with GELU "
        f"{cfg['pre_epochs']} epochs, export (`gelu.onnx`, opset 17, batch open); then LayerCollapse fine-tune "
        f"{cfg['ft_epochs']} epochs at λ={LAM:g} (slopes lr {cfg['slope_lr']:g}), `train.collapse(threshold=0.05)`, "
        "export of the uncollapsed prepared model (`lc.onnx`).  ",
        f"Timing: `lc-onnx estimate` {cfg['est_runs']} interleaved runs per model, and `lc_onnx.bench.interleaved` "
        f"{cfg['runs']} runs of gelu.onnx, the default `lc-onnx optimize` output (--tol 0.05, the accuracy budget) "
        "and estimate's what-if of all blocks (kept by its first run's `--keep`), batch 1 (the test set's first "
        "row), 1 thread; every timing run twice.",
        "",
        *tables(results, cfg["runs"]),
        "",
        *reading(results),
        END,
    ]
    path = tf.replace_section(HERE / "RESULTS_train.md", START, END, "\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="train_finetune's quick models, few epochs, nothing written")
    ap.add_argument("--pre-epochs", type=int)
    ap.add_argument("--ft-epochs", type=int)
    ap.add_argument("--runs", type=int, help="interleaved runs per model, for estimate and the check alike")
    ap.add_argument("--only", help="one model of the set, by the start of its name (e.g. 'deep')")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key, value in (("pre_epochs", args.pre_epochs), ("ft_epochs", args.ft_epochs), ("est_runs", args.runs),
                       ("runs", args.runs)):
        if value is not None:
            cfg[key] = value
    models = tf.QUICK_MODELS if args.quick else tf.MODELS
    if args.only:
        models = {k: v for k, v in models.items() if k.startswith(args.only)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.time()
    results: dict[str, dict] = {}
    try:
        xtr, ytr, xte, yte = tf.data(0)
        for mname, spec in models.items():
            print(mname, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                results[mname] = run_model(spec, xtr, ytr, xte, yte, Path(tmp), 0, cfg["pre_epochs"],
                                           cfg["ft_epochs"], cfg["est_runs"], cfg["runs"], cfg["slope_lr"],
                                           log=lambda s: print(s, flush=True))
                for o in results[mname]["optimize"].values():
                    o["path"] = None  # gone with the folder
    finally:
        torch.set_num_threads(threads)
    secs = time.time() - start
    print("\n".join([*tables(results, cfg["runs"]), "", *reading(results)]))
    print(f"{secs:.0f}s")
    if not args.quick and not args.no_write:
        write(results, cfg, secs, argv if argv is not None else sys.argv[1:])
    return results


if __name__ == "__main__":
    main()

"""A LayerCollapse-prepared model through optimum's ONNX exporter: which routes keep the PReLUs lc-onnx folds.

    python export.py [--out DIR]      # in a venv with requirements.txt installed (see README.md)

A tiny BERT classifier is built from a config (no download), `lc_onnx.train.prepare`d, and its slopes are set to 1,
what a finished LayerCollapse fine-tune gives. Then:
  (a) in memory: optimum's `onnx_export_from_model(model, dir)`, then `lc_onnx.optimize`: every MLP folds;
  (b) from disk: `save_pretrained`, then `main_export` (what `optimum-cli export onnx` runs): transformers rebuilds
      the model from its config, which says gelu, so the file has GELU and lc-onnx folds nothing (and says why);
  (c) `lc_onnx.train.from_pretrained` of that folder, then route (a): every MLP folds again.
Each folded file is compared with the torch model in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from optimum.exporters.onnx import main_export, onnx_export_from_model
from transformers import BertConfig, BertForSequenceClassification

import lc_onnx
from lc_onnx import train

TASK = "text-classification"


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def ops(path: Path) -> str:
    """The MLP activations in the file: how many PRelu and Gelu-like nodes."""
    import onnx

    kinds = [n.op_type for n in onnx.load(path).graph.node]
    gelu = sum(k in ("Gelu", "FastGelu", "BiasGelu", "Erf") for k in kinds)
    return f"{kinds.count('PRelu')} PRelu, {gelu} Gelu/Erf"


def fold(path: Path, model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> str:
    """lc_onnx.optimize the file (validated on `feeds`); the chains folded and the folded file's logits against
    torch's."""
    result = lc_onnx.optimize(path, tol=1e-3, inputs=feeds)
    chains = sum(r.rule == "collapse_linear_chain" for r in result.report.rewrites)
    folded = result.save(path.with_name("model.lc.onnx"))
    sess = ort.InferenceSession(str(folded), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    return f"lc-onnx folded {chains} chains; logits vs torch max |diff| {np.abs(logits - ref).max():.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where the exports go (default: a temporary folder)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # the tracer's and exporters' advice
    transformers.logging.set_verbosity_error()
    import optimum.version

    print(f"transformers {transformers.__version__}, optimum {optimum.version.__version__}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    out = args.out or Path(tempfile.mkdtemp(prefix="lc_optimum_"))
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 128, (2, 16)),
             "attention_mask": np.ones((2, 16), dtype=np.int64), "token_type_ids": np.zeros((2, 16), dtype=np.int64)}

    model = tiny_bert()
    # the MLPs only: BERT's pooler (dense -> tanh -> classifier) is a site too; excluded, it keeps its tanh
    sites = train.prepare(model, {k: torch.from_numpy(v) for k, v in feeds.items()}, init=0.01, exclude="*pooler*")
    with torch.no_grad():  # what a finished LayerCollapse fine-tune gives: every slope at 1 (see the README's recipes)
        for name in sites:
            model.get_submodule(name).weight.fill_(1.0)
    print(f"prepared {len(sites)} sites: {', '.join(sites)}")

    onnx_export_from_model(model, output=out / "a_in_memory", task=TASK)
    path = out / "a_in_memory" / "model.onnx"
    print(f"(a) onnx_export_from_model(prepared): {ops(path)}; {fold(path, model, feeds)}")

    model.save_pretrained(out / "saved")
    main_export(str(out / "saved"), output=out / "b_from_disk", task=TASK)
    path = out / "b_from_disk" / "model.onnx"
    print(f"(b) save_pretrained + main_export (optimum-cli export onnx): {ops(path)}; lc-onnx optimize says:")
    cli = subprocess.run([sys.executable, "-m", "lc_onnx", "optimize", str(path), "-o",
                          str(path.with_name("model.lc.onnx"))], capture_output=True, text=True)
    print("    " + (cli.stdout + cli.stderr).strip().replace("\n", "\n    "))

    loaded = train.from_pretrained(BertForSequenceClassification, out / "saved").eval()
    onnx_export_from_model(loaded, output=out / "c_from_pretrained", task=TASK)
    path = out / "c_from_pretrained" / "model.onnx"
    print(f"(c) train.from_pretrained + onnx_export_from_model: {ops(path)}; {fold(path, loaded, feeds)}")
    print(f"files in {out}")


if __name__ == "__main__":
    main()

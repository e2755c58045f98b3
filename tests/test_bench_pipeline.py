"""Smoke test of benchmarks/pipeline.py on tiny models: every variant (ORT's transformers optimizer, dynamic int8,
static QDQ, optimizer then int8) is built from the GELU and the collapsed base, timed, tabled, and scored on digits.
No timing asserts."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime.quantization")
torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import pipeline  # noqa: E402

from lc_onnx import train  # noqa: E402


@pytest.fixture(autouse=True)
def quiet():
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizers' advice on the root logger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.getLogger().setLevel(level)


def tiny_bert() -> pipeline.study.Spec:
    """A 1-layer, 32-wide BERT on 8 tokens: the smallest that ORT's BERT fusions still recognise."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=16)
    return pipeline.study.Spec(
        "tiny BERT", lambda: pipeline.study.HF(transformers.BertModel(cfg, add_pooling_layer=False)),
        lambda b: (torch.randint(0, 64, (b, 8)), torch.ones(b, 8, dtype=torch.int64)),
        ["input_ids", "attention_mask"], "bert", 1, 2, 32)


def test_latency_of_every_variant_on_a_tiny_bert(tmp_path):
    r = pipeline.latency(tiny_bert(), tmp_path, runs=1, rounds=2, warmup=0, log=lambda line: None)
    assert r.folds == 1  # its MLP, at slope 1
    labels = [f"{b} · {s}" for b in pipeline.BASES for s in pipeline.STEPS] + list(pipeline.ORDERS)
    assert list(r.ms) == labels and all(len(v) == 2 and min(v) > 0 for v in r.ms.values())
    assert r.ratios("GELU · fp32") == [1.0, 1.0]
    # quantized first: the unit PReLUs go, nothing folds (collapse before quantizing)
    assert r.order_folds["prepared → int8 dynamic → lc-onnx"] == 0
    ops = {name: pipeline.op_counts(tmp_path / name) for name in
           ("collapsed.onnx", "collapsed_opt.onnx", "collapsed_int8.onnx", "collapsed_qdq.onnx",
            "gelu_opt_int8.onnx")}
    assert ops["collapsed.onnx"]["PRelu"] == 0
    assert ops["collapsed_opt.onnx"]["SkipLayerNormalization"] > 0  # ORT's fusions ran
    assert ops["collapsed_int8.onnx"]["DynamicQuantizeLinear"] + ops["collapsed_int8.onnx"]["MatMulInteger"] > 0
    assert ops["collapsed_qdq.onnx"]["QuantizeLinear"] > 0 and ops["collapsed_qdq.onnx"]["DequantizeLinear"] > 0
    assert ops["gelu_opt_int8.onnx"]["SkipLayerNormalization"] > 0 and ops["gelu_opt_int8.onnx"]["MatMulInteger"] > 0
    table = pipeline.latency_table([r])
    assert len(table) == 2 + len(labels) and table[2].startswith("| GELU · fp32 | 1.00 / 1.00 |")
    assert "(0 chains folded)" in table[-1]


def test_accuracy_of_every_variant_on_a_saved_digits_vit(tmp_path):
    """The models digits_models would train, saved where it looks first (training is train_finetune.py's, tested
    in test_bench_train_finetune.py): a 1-layer ViT with GELU, and the same prepared with its slope at 1."""
    settings = pipeline.DigitsSettings(layers=1, pre_epochs=0, ft_epochs=0)
    saved = pipeline.saved_at(settings, tmp_path)
    torch.manual_seed(0)
    gelu = pipeline.ft.HFViT(layers=1).eval()
    gelu.hf.save_pretrained(saved / "gelu")
    x = pipeline.ft.data(0)[0]
    train.prepare(gelu.hf, {"pixel_values": x[:2].reshape(-1, 1, 8, 8)}, init=1.0)
    gelu.hf.save_pretrained(saved / "lc")

    r = pipeline.accuracy(settings, tmp_path, log=lambda line: None)
    assert r.total == 540 and r.folds == 1 and r.slopes == (1.0, 1.0)
    assert set(r.correct) == {(b, s) for b in pipeline.BASES for s in pipeline.STEPS}
    # fp32 ONNX scores as torch does; the optimizer keeps the arithmetic; int8 changes the logits a little
    assert 100 * r.correct["GELU", "fp32"] / r.total == pytest.approx(r.torch_acc["GELU"], abs=0.2)
    assert 100 * r.correct["collapsed", "fp32"] / r.total == pytest.approx(r.torch_acc["LC"], abs=0.2)
    for base in pipeline.BASES:
        assert r.logit_err[base, "ORT optimizer"] < 1e-4
        assert 0 < r.logit_err[base, "int8 dynamic"] < 1 and 0 < r.logit_err[base, "QDQ static"] < 1
    table = pipeline.accuracy_table(r)
    assert len(table) == 2 + len(pipeline.STEPS) and table[2].startswith("| fp32 | ")

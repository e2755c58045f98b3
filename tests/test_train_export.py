"""train.export on prepared HF models (tiny configs) with both torch exporters, then lc-onnx optimize: the MLP
chains collapse and the collapsed ONNX model computes what the torch model computes."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lc_onnx
from lc_onnx import train

transformers = pytest.importorskip("transformers")
T = transformers


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ids(*shape):
    return torch.randint(0, 64, shape)


def gpt2():
    cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return T.GPT2LMHeadModel(cfg), {"input_ids": ids(2, 8)}


def opt():
    cfg = T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                      max_position_embeddings=32, word_embed_proj_dim=32)
    return T.OPTForCausalLM(cfg), {"input_ids": ids(2, 8)}


def t5():
    cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                     feed_forward_proj="gelu", decoder_start_token_id=0)
    return T.T5ForConditionalGeneration(cfg), {"input_ids": ids(2, 8), "decoder_input_ids": ids(2, 5)}


def beit():
    cfg = T.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    return T.BeitModel(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


def swin():
    cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    return T.SwinModel(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


def llama():
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return T.LlamaForCausalLM(cfg), {"input_ids": ids(2, 8)}


def build(make):
    torch.manual_seed(0)
    model, inputs = make()
    with torch.no_grad():  # random, non-zero biases, so a wrong fold would show
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    model.eval()
    names = train.prepare(model, example_inputs=inputs, init=1.0)
    return model, inputs, names


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# (model, sites prepared = chains collapsed): the MLP blocks of each architecture, both exporters
CASES = [(gpt2, 2), (opt, 2), (t5, 4), (beit, 2), (swin, 2)]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize(("make", "blocks"), CASES, ids=[c[0].__name__ for c in CASES])
def test_export_collapse_matches_torch(tmp_path, make, blocks, dynamo):
    model, inputs, names = build(make)
    assert len(names) == blocks
    cache, attn = getattr(model.config, "use_cache", None), model.config._attn_implementation
    path = tmp_path / "m.onnx"
    train.export(model, inputs, path, dynamo=dynamo)
    assert (getattr(model.config, "use_cache", None), model.config._attn_implementation) == (cache, attn)
    assert not model.training

    result = lc_onnx.optimize(path, tol=1e-3)
    assert len(result.report.rewrites) == blocks
    assert {r.rule for r in result.report.rewrites} == {"collapse_linear_chain"}
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(inputs)  # no extra inputs (logits_to_keep), names kept
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
        want = model(**inputs, **extra)[0].numpy()
    assert got.shape == want.shape
    assert rel_l2(got, want) <= 1e-6  # measured at most 3.4e-7 (T5, dynamo)


def test_gated_llama_exports_with_the_legacy_exporter(tmp_path):
    # sdpa with grouped KV heads has no legacy ONNX conversion; eager attention does. Gated MLP: no site.
    model, inputs, names = build(llama)
    assert names == []
    train.export(model, inputs, tmp_path / "m.onnx", dynamo=False)
    result = lc_onnx.optimize(tmp_path / "m.onnx", tol=1e-3)
    assert not result.report.rewrites
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": inputs["input_ids"].numpy()})[0]
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits.numpy()
    assert rel_l2(got, want) <= 1e-6


def test_keeping_sdpa_where_it_cannot_export_says_what_to_pass(tmp_path):
    model, inputs, _ = build(swin)
    with pytest.raises(RuntimeError, match=r"^export: .* sdpa attention .*pass attn_implementation='eager'$") as e:
        train.export(model, inputs, tmp_path / "m.onnx", dynamo=True, attn_implementation=None)
    assert "\n" not in str(e.value)
    assert model.config._attn_implementation == "sdpa"


def test_keyword_inputs_twice_is_refused(tmp_path):
    model, inputs, _ = build(gpt2)
    with pytest.raises(TypeError, match="not both"):
        train.export(model, inputs, tmp_path / "m.onnx", kwargs=inputs)

"""`prepare` with example inputs on current transformers architectures, built from tiny configs: it finds every
non-gated MLP block and nothing else; at slope 1 the prepared model computes exactly the original with each
site's activation replaced by the identity, and `collapse` keeps that output."""

from __future__ import annotations

import copy
import fnmatch
import warnings

import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402
from lc_onnx.train.trace import tensors  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
IDS = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def text():
    return {"input_ids": torch.randint(3, 60, (2, 8), generator=torch.Generator().manual_seed(1))}


def seq2seq():
    return {**text(), "decoder_input_ids": torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(2))}


def image(size=32):
    return lambda: {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))}


def audio_features():
    return {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4)),
            "decoder_input_ids": text()["input_ids"]}


def waveform():
    return {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(5))}


def clip_inputs():
    return {**text(), **image()()}


# architecture: (model, example inputs, pattern of the expected sites' names, how many)
ARCHITECTURES = {
    "bert": (lambda: T.BertModel(T.BertConfig(**IDS, **SMALL)), text,
             "encoder.layer.*.intermediate.intermediate_act_fn", 2),
    "roberta": (lambda: T.RobertaModel(T.RobertaConfig(**IDS, **SMALL)), text,
                "encoder.layer.*.intermediate.intermediate_act_fn", 2),
    "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2,
                                                                hidden_dim=64)), text,
                   "transformer.layer.*.ffn.activation", 2),
    "electra": (lambda: T.ElectraModel(T.ElectraConfig(**IDS, embedding_size=32, **SMALL)), text,
                "encoder.layer.*.intermediate.intermediate_act_fn", 2),
    "deberta-v2": (lambda: T.DebertaV2Model(T.DebertaV2Config(**IDS, **SMALL)), text,
                   "encoder.layer.*.intermediate.intermediate_act_fn", 2),
    # MobileBERT: per layer one intermediate block plus num_feedforward_networks - 1 extra FFNs
    "mobilebert": (lambda: T.MobileBertModel(T.MobileBertConfig(
        **IDS, **SMALL, embedding_size=16, intra_bottleneck_size=16, num_feedforward_networks=2)), text,
        "encoder.layer.*.intermediate.intermediate_act_fn", 4),
    # ALBERT runs one shared layer num_hidden_layers times: one site, called twice
    "albert": (lambda: T.AlbertModel(T.AlbertConfig(**IDS, embedding_size=16, **SMALL)), text,
               "encoder.albert_layer_groups.0.albert_layers.0.activation", 1),
    "gpt2": (lambda: T.GPT2Model(T.GPT2Config(**IDS, n_embd=32, n_layer=2, n_head=2, n_positions=32)), text,
             "h.*.mlp.act", 2),
    "gpt-neo": (lambda: T.GPTNeoModel(T.GPTNeoConfig(**IDS, hidden_size=32, num_layers=2, num_heads=2,
                                                     attention_types=[[["global", "local"], 1]],
                                                     max_position_embeddings=32, intermediate_size=64)), text,
                "h.*.mlp.act", 2),
    "gpt-j": (lambda: T.GPTJModel(T.GPTJConfig(**IDS, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
                                               n_positions=32)), text, "h.*.mlp.act", 2),
    "gpt-neox": (lambda: T.GPTNeoXModel(T.GPTNeoXConfig(**IDS, **SMALL)), text, "layers.*.mlp.act", 2),
    "falcon": (lambda: T.FalconModel(T.FalconConfig(**IDS, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2)), text, "h.*.mlp.act", 2),
    "codegen": (lambda: T.CodeGenModel(T.CodeGenConfig(**IDS, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
                                                       n_positions=32)), text, "h.*.mlp.act", 2),
    # BLOOM's activation is its own class (BloomGelu): found because it is elementwise, not by name
    "bloom": (lambda: T.BloomModel(T.BloomConfig(**IDS, hidden_size=32, n_layer=2, n_head=2)), text,
              "h.*.mlp.gelu_impl", 2),
    "opt": (lambda: T.OPTModel(T.OPTConfig(**IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=32)), text,
            "decoder.layers.*.activation_fn", 2),
    "phi": (lambda: T.PhiModel(T.PhiConfig(**IDS, **SMALL)), text, "layers.*.mlp.activation_fn", 2),
    "t5": (lambda: T.T5Model(T.T5Config(**IDS, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                        feed_forward_proj="relu", decoder_start_token_id=0)), seq2seq,
           "*coder.block.*.layer.*.DenseReluDense.act", 4),
    "bart": (lambda: T.BartModel(T.BartConfig(**IDS, d_model=32, encoder_layers=2, decoder_layers=2,
                                              encoder_attention_heads=2, decoder_attention_heads=2,
                                              encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)),
             seq2seq, "*coder.layers.*.activation_fn", 4),
    "whisper": (lambda: T.WhisperModel(T.WhisperConfig(**IDS, d_model=32, encoder_layers=2, decoder_layers=2,
                                                       encoder_attention_heads=2, decoder_attention_heads=2,
                                                       encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                                                       max_source_positions=16, max_target_positions=16,
                                                       decoder_start_token_id=1)),
                audio_features, "*coder.layers.*.activation_fn", 4),
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(**IDS, **SMALL, max_position_embeddings=16),
        vision_config=dict(**SMALL, image_size=32, patch_size=8))), clip_inputs,
        "*_model.encoder.layers.*.mlp.activation_fn", 4),
    "vit": (lambda: T.ViTModel(T.ViTConfig(**SMALL, image_size=32, patch_size=8)), image(),
            "layers.*.mlp.activation_fn", 2),
    "deit": (lambda: T.DeiTModel(T.DeiTConfig(**SMALL, image_size=32, patch_size=8)), image(),
             "layers.*.mlp.activation_fn", 2),
    "beit": (lambda: T.BeitModel(T.BeitConfig(**SMALL, image_size=32, patch_size=8)), image(),
             "layers.*.mlp.activation_fn", 2),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    mlp_ratio=2, image_size=32, patch_size=8)), image(),
               "encoder.layer.*.mlp.activation_fn", 2),
    "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                              num_heads=[2, 2], window_size=4)), image(),
             "encoder.layers.*.blocks.0.mlp.activation_fn", 2),
    "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                          image_size=32)), image(),
                 "encoder.stages.*.layers.0.act", 2),
    "wav2vec2": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(
        **SMALL, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)), waveform,
        "encoder.layers.*.feed_forward.intermediate_act_fn", 2),
    # gated MLPs, down(act(gate(x)) * up(x)): the activation's output feeds a multiply, so no site
    "llama": (lambda: T.LlamaModel(T.LlamaConfig(**IDS, **SMALL)), text, "", 0),
    "mistral": (lambda: T.MistralModel(T.MistralConfig(**IDS, num_key_value_heads=2, **SMALL)), text, "", 0),
    "qwen2": (lambda: T.Qwen2Model(T.Qwen2Config(**IDS, num_key_value_heads=2, **SMALL)), text, "", 0),
}


def build(name: str) -> tuple[nn.Module, dict]:
    make, inputs, _, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().eval()
    with torch.no_grad():  # HF initializes biases to zero, which would hide a bias folded in the wrong place
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), torch.Tensor) and module.bias.dtype.is_floating_point:
                module.bias.normal_(0, 0.5)
    return model, inputs()


def outputs(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tensors(model(**inputs)) if t.is_floating_point()]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_prepare_finds_every_mlp_and_collapse_keeps_the_output(name):
    model, inputs = build(name)
    _, _, pattern, count = ARCHITECTURES[name]
    identity = copy.deepcopy(model)  # the original with each expected site's activation replaced by the identity
    expected = [n for n, _ in model.named_modules() if pattern and fnmatch.fnmatchcase(n, pattern)]
    assert len(expected) == count, expected  # the pattern itself names exactly the MLP blocks
    for path in expected:
        parent, _, attr = path.rpartition(".")
        setattr(identity.get_submodule(parent), attr, nn.Identity())
    found = train.prepare(model, inputs, init=1.0)
    assert found.verified and not found.unswappable
    assert sorted(found) == sorted(expected)
    reference = outputs(identity, inputs)
    prepared = outputs(model, inputs)
    assert len(prepared) == len(reference)
    for got, want in zip(prepared, reference, strict=True):
        assert torch.equal(got, want)  # PReLU at slope 1 is the identity, bit for bit
    assert sorted(train.collapse(model, threshold=0.0)) == sorted(expected)
    assert not train.blocks(model)
    for got, want in zip(outputs(model, inputs), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_blocks_found_by_names_are_26_and_each_verifies_and_collapses():
    """README: without example inputs the names find 26 of the 63 blocks; collapse verifies all 26 on the inputs
    (the same sites as the recorded pass) and keeps the output."""
    total = 0
    for name in ARCHITECTURES:
        model, inputs = build(name)
        with pytest.warns(UserWarning, match="finds sites by module names"):
            found = train.prepare(model, init=1.0)
        total += len(found)
        if not found:
            continue
        before = outputs(model, inputs)
        with pytest.raises(RuntimeError, match="prepared by module names"):
            train.collapse(model, threshold=0.0)
        assert sorted(train.collapse(model, threshold=0.0, example_inputs=inputs)) == sorted(found), name
        for got, want in zip(outputs(model, inputs), before, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert total == 26

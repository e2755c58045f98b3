"""save_pretrained -> train.from_pretrained round-trips prepared and collapsed transformers models exactly (BERT,
ViT, whose keys transformers 5 renames on load, and GPT-2), also from a Trainer checkpoint; weights that do not
fit the record are an error, never a default."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
T = transformers

from lc_onnx import train  # noqa: E402


@pytest.fixture(autouse=True)
def quiet_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(n)


def ids(*shape):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(1))


def bert():
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=32)
    return T.BertForSequenceClassification, cfg, {"input_ids": ids(2, 8)}


def vit():
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64)
    return T.ViTForImageClassification, cfg, {"pixel_values": torch.randn(2, 3, 32, 32)}


def gpt2():
    cfg = T.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return T.GPT2LMHeadModel, cfg, {"input_ids": ids(2, 8)}


def prepared(make, collapse_first: bool, per_channel: bool = False):
    torch.manual_seed(0)
    cls, cfg, inputs = make()
    model = cls(cfg).eval()
    train.prepare(model, inputs, per_channel=per_channel)
    with torch.no_grad():  # as training leaves them: the first block at 1, the others apart
        for i, p in enumerate(train.slope_parameters(model)):
            p.copy_(torch.full_like(p, 1.0) if i == 0 else torch.rand_like(p) * 0.2 + 0.8)
    if collapse_first:
        assert len(train.collapse(model, threshold=0.0)) == 1
    return cls, model, inputs


def out(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs)[0]


@pytest.mark.parametrize("make", [bert, vit, gpt2])
@pytest.mark.parametrize("collapse_first", [False, True], ids=["prepared", "collapsed"])
def test_save_then_from_pretrained_gives_the_same_model(tmp_path, make, collapse_first):
    cls, model, inputs = prepared(make, collapse_first, per_channel=make is vit)
    model.save_pretrained(tmp_path)
    loaded = train.from_pretrained(cls, tmp_path)
    assert type(loaded) is cls
    assert train.slopes(loaded) == train.slopes(model)  # trained slopes, not their init
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs), rtol=0, atol=0)
    # and what it loads can be collapsed and saved again
    with torch.no_grad():
        for p in train.slope_parameters(loaded):
            p.fill_(1.0)
    train.collapse(loaded)
    loaded.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(out(train.from_pretrained(cls, tmp_path / "again"), inputs), out(loaded, inputs))


def test_transformers_own_from_pretrained_is_what_loses_the_slopes(tmp_path):
    cls, model, inputs = prepared(bert, collapse_first=False)
    model.save_pretrained(tmp_path)
    plain = cls.from_pretrained(tmp_path)
    assert not train.blocks(plain)  # GELU again: why train.from_pretrained exists
    assert train.blocks(train.from_pretrained(cls, tmp_path))


def test_weights_that_do_not_fit_the_record_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    cls, model, inputs = prepared(bert, collapse_first=True)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    slope = next(k for k in state if k.endswith("intermediate_act_fn.weight"))
    del state[slope]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys: .*intermediate_act_fn.weight"):
        train.from_pretrained(cls, tmp_path)


def test_a_folder_without_a_record_loads_as_transformers_loads_it(tmp_path):
    cls, cfg, inputs = bert()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = train.from_pretrained(cls, tmp_path)
    assert not train.blocks(loaded)
    torch.testing.assert_close(out(loaded, inputs), out(model, inputs))


def test_a_trainer_checkpoint_loads_prepared_and_the_final_save_collapsed(tmp_path):
    pytest.importorskip("accelerate")
    from test_train_callback import Tokens, tiny_bert

    model, _ = tiny_bert()
    args = T.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=16,
                               per_device_train_batch_size=8, save_strategy="steps", save_steps=8,
                               disable_tqdm=True, seed=0, data_seed=0)
    callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=1.0)  # collapses every block at the end
    trainer = T.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    x = {"input_ids": ids(2, 8)}
    checkpoint = train.from_pretrained(T.BertForSequenceClassification, tmp_path / "checkpoint-8")
    assert len(train.blocks(checkpoint)) == 3  # prepared, mid-training
    trainer.save_model(str(tmp_path / "final"))
    final = train.from_pretrained(T.BertForSequenceClassification, tmp_path / "final")
    assert not train.blocks(final)  # all collapsed at the end of training
    torch.testing.assert_close(out(final, x), out(trainer.model, x))


def test_a_site_whose_own_prelu_was_replaced_without_its_slopes_reloads_at_the_recorded_size(tmp_path):
    """prepare(keep_slopes=False) gives an nn.PReLU site one slope; the replay must not take the nn.PReLU's 32."""

    class Config(T.PretrainedConfig):
        model_type = "lc_onnx_prelu_mlp"

    class Mlp(T.PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 32), torch.nn.PReLU(32), torch.nn.Linear(32, 8)
            self.post_init()

        def forward(self, x):
            return (self.fc2(self.act(self.fc1(x))),)

    x = {"x": torch.randn(2, 8)}
    model = Mlp(Config()).eval()
    train.prepare(model, x, keep_slopes=False)
    assert model.act.weight.numel() == 1
    model.save_pretrained(tmp_path)
    loaded = train.from_pretrained(Mlp, tmp_path)
    assert loaded.act.weight.numel() == 1
    torch.testing.assert_close(out(loaded, x), out(model, x), rtol=0, atol=0)

"""The torch side: prepare, regularizer, slopes, collapse, export — and agreement with the ONNX side."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lc_onnx  # noqa: E402
from lc_onnx import train  # noqa: E402


class Mlp(nn.Module):
    """timm-style block: x + fc2(act(fc1(norm(x))))."""

    def __init__(self, d=16, h=64):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


IDS = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
X16 = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)),)


def test_prepare_finds_sequential_timm_bert_and_gpt2_blocks():
    seq = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 8), nn.GELU(), nn.Linear(8, 2))
    assert train.prepare(seq, (torch.randn(3, 8),)) == ["1", "4"]
    assert train.prepare(nn.Sequential(Mlp(), Mlp()), X16) == ["0.act", "1.act"]
    assert train.prepare(bert(), IDS) == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    assert train.prepare(gpt2(), IDS) == [f"transformer.h.{i}.mlp.act" for i in range(2)]


def test_without_example_inputs_names_are_the_fallback_with_a_warning():
    seq = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 8), nn.GELU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="example_inputs"):
        found = train.prepare(seq)
    assert found == ["1", "4"] and not found.verified
    with pytest.warns(UserWarning, match="example_inputs"):
        assert train.prepare(gpt2()) == [f"transformer.h.{i}.mlp.act" for i in range(2)]


def test_prepare_defaults_follow_the_paper_and_is_idempotent():
    model = nn.Sequential(Mlp(), Mlp())
    names = train.prepare(model, X16)
    act = model[0].act
    assert isinstance(act, nn.PReLU) and act.num_parameters == 1 and float(act.weight) == pytest.approx(0.01)
    assert train.prepare(model, X16) == names and model[0].act is act


def test_include_exclude_and_per_channel():
    model = nn.Sequential(Mlp(), Mlp(), Mlp())
    assert train.prepare(model, X16, include=["0.*", "2.*"], exclude=["2.*"], per_channel=True) == ["0.act"]
    assert model[0].act.num_parameters == 64 and isinstance(model[1].act, nn.GELU)


def test_per_channel_acts_on_the_last_dim():
    model = Mlp()
    train.prepare(model, X16, per_channel=True, init=0.5)
    with torch.no_grad():
        model.act.weight[:] = torch.linspace(0, 1, 64)
    x = torch.randn(2, 5, 64)
    expected = torch.where(x >= 0, x, x * torch.linspace(0, 1, 64))
    torch.testing.assert_close(model.act(x), expected)


def test_regularizer_is_sum_of_squared_distances_and_gradients_reach_slopes():
    model = nn.Sequential(Mlp(), Mlp())
    train.prepare(model, X16, init=0.5)
    reg = train.regularizer(model)
    assert float(reg) == pytest.approx(2 * 0.25)
    reg.backward()
    assert float(model[0].act.weight.grad) == pytest.approx(2 * (0.5 - 1))
    assert train.slopes(model) == {"0.act": pytest.approx(0.5), "1.act": pytest.approx(0.5)}


def test_collapse_at_slope_one_is_exact_and_leaves_others():
    model = nn.Sequential(Mlp(), Mlp(), Mlp()).eval()
    train.prepare(model, X16, init=1.0)
    with torch.no_grad():
        model[1].act.weight.fill_(0.9)
    x = torch.randn(3, 7, 16)
    before = model(x)
    assert train.collapse(model, threshold=0.05) == ["0.act", "2.act"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert isinstance(model[0].fc2, nn.Linear) and isinstance(model[0].fc1, nn.Identity)
    assert isinstance(model[1].act, nn.PReLU)
    assert list(train.slopes(model)) == ["1.act"]


def test_collapse_refuses_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    train.prepare(model, (torch.randn(4, 8),), init=1.0)
    with pytest.raises(RuntimeError, match="eval"):
        train.collapse(model)


@pytest.mark.parametrize("make", [bert, gpt2])
def test_collapse_hf_models_exactly(make):
    model = make()
    train.prepare(model, IDS, init=1.0)
    ids = torch.randint(0, 64, (2, 8))
    out = (lambda m: m(ids).last_hidden_state) if make is bert else (lambda m: m(ids).logits)
    before = out(model)
    assert len(train.collapse(model)) == 2
    torch.testing.assert_close(out(model), before, rtol=1e-5, atol=1e-5)


def test_short_training_run_moves_slopes_to_one():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    train.prepare(model, (torch.randn(4, 8),))
    opt = torch.optim.AdamW(train.param_groups(model, lr=1e-3, slope_lr=5e-2))
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    start = train.slopes(model)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y) + 1.0 * train.regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = train.slopes(model)
    assert all(abs(end[k] - 1) < 0.05 < abs(start[k] - 1) for k in start), end


def test_decoupled_step_pulls_slopes_toward_one():
    model = Mlp()
    train.prepare(model, X16, init=0.0)
    for _ in range(100):
        train.decoupled_step(model, lr=0.1, lam=1.0)
    assert float(model.act.weight) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dynamo", [False, True])
def test_export_then_onnx_collapse_matches_torch_collapse(tmp_path, dynamo):
    model = nn.Sequential(Mlp(), Mlp(), Mlp()).eval()
    train.prepare(model, X16, init=1.0)
    with torch.no_grad():
        model[1].act.weight.fill_(0.999)
    x = torch.randn(2, 5, 16)
    path = tmp_path / "m.onnx"
    train.export(model, (x,), path, dynamo=dynamo)
    result = lc_onnx.optimize(path, tol=1e-3)
    assert len(result.report.rewrites) == 3
    assert train.collapse(model, threshold=1e-3) == ["0.act", "1.act", "2.act"]
    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch_out = model(x).detach().numpy()
    assert np.linalg.norm(onnx_out - torch_out) / np.linalg.norm(torch_out) <= 1e-5

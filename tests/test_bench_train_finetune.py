"""Smoke test of benchmarks/train_finetune.py at its --quick sizes: pretrain with GELU, prepare from example
inputs, fine-tune with λ=1, and every block collapses, in torch and through `lc_onnx.optimize` alike."""

from __future__ import annotations

import argparse

import pytest

from tests import scripts

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")



@pytest.fixture(scope="module")
def bench():
    return scripts.load("train_finetune")


@pytest.fixture(scope="module")
def rows(bench):
    """Both --quick models, seed 0, λ=1: {model: [GELU row, LC row]}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    q, digits = bench.QUICK, bench.data(0)
    try:
        return {name: bench.run_model(spec, *digits, seed=0, pre_epochs=q["pre_epochs"], ft_epochs=q["ft_epochs"],
                                      lambdas=[1.0], runs=2, slope_lr=q["slope_lr"], log=lambda line: None)
                for name, spec in bench.QUICK_MODELS.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model,blocks", [("deep MLP (3 blocks)", 3), ("HF ViT (1 layer)", 1)])
def test_quick_lc_finetune_collapses_every_block(bench, rows, model, blocks):
    gelu, lc = rows[model]
    assert gelu["variant"] == "GELU fine-tune" and "lam" not in gelu
    # prepare found every MLP block from the recorded forward pass, and λ=1 carried each slope near 1
    assert lc["sites"] == blocks and lc["collapsed"] == blocks
    assert all(abs(s - 1) <= bench.THRESHOLD for s in lc["slopes"].values())
    assert lc["params_after"] < lc["params"]
    # the fine-tune learned something and the collapse cost at most a few test images (540 in all)
    assert lc["acc"] > 50 and abs(lc["acc"] - lc["acc_after"]) < 2
    o = lc["onnx"]
    assert o["validation"] == "passed" and o["chains"] == blocks
    assert o["rel_vs_torch"] < 1e-5 and abs(o["acc"] - lc["acc_after"]) < 0.2
    assert len(o["ms"]) == 3 and all(t > 0 for t in o["ms"])
    # the Figure-4 curve: one point per number of blocks collapsed, ending at the collapse of all of them
    assert len(lc["curve"]) == blocks + 1 and lc["curve"][0] == pytest.approx(lc["acc"])
    assert lc["curve"][-1] == pytest.approx(lc["acc_after"])


def test_write_replaces_only_its_own_section(bench, rows, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "HERE", tmp_path)
    results = tmp_path / "RESULTS_train.md"
    results.write_text("# digits\n\nthe digits table\n")
    args = argparse.Namespace(pre_epochs=2, ft_epochs=6, seeds=1, seed=0, runs=2)
    bench.write(rows, args, 1.0)
    bench.write(rows, args, 1.0)  # a rerun replaces the section instead of adding a second one
    text = results.read_text()
    assert text.startswith("# digits\n\nthe digits table\n") and text.count(bench.START) == 1
    assert "| deep MLP (3 blocks) | LC λ=1 |" in text and "λ=1 collapses 3/3 blocks" in text
    assert (tmp_path / "train_finetune.png").stat().st_size > 0

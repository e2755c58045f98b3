"""Smoke test of benchmarks/train_lm.py at its --quick sizes: tokenizer trained on the installed fortunes, GPT-2 and
Llama pretrained, every fine-tune arm run for both seeds, blocks collapsed one by one (torch and ONNX Runtime), the
tables and the section written. It checks that the pipeline ran end to end and what each stage must hold whatever
the numbers are; not the numbers themselves."""

from __future__ import annotations

import math

import pytest

from tests import scripts

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
torch = pytest.importorskip("torch")



@pytest.fixture(scope="module")
def bench():
    module = scripts.load("train_lm")
    if not module.MARKER.exists():  # .ci/run installs it; a checkout without it skips with the command to run
        pytest.skip(f"no {module.MARKER}: apt-get install fortunes")
    return module


@pytest.fixture(scope="module")
def out(bench):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench.run(bench.QUICK, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)


def test_every_arm_ran_for_every_seed(bench, out):
    q = bench.QUICK
    assert set(out["pre"]) == {"gpt2", "llama"}
    for p in out["pre"].values():  # pretraining learned something: better than a uniform guess over the vocabulary
        assert math.isfinite(p["ppl"]) and p["ppl"] < q.vocab and p["params"] > 0
    expected = {f"{arch}|{variant}|{seed}" for arch, variant, _, _, seed in bench.jobs(q)}
    assert set(out["rows"]) == expected and len(expected) == 5 * q.seeds
    assert {r["seed"] for r in out["rows"].values()} == set(range(q.seeds))
    # --kd-also: more λ with the KL term, after everything else (a rerun over saved results runs only those)
    wider = bench.replace(q, lambdas=(1.0, 10.0))
    assert bench.jobs(wider, kd_also=(10.0, 3.0))[-q.seeds:] == [("gpt2", "LC λ=10 + KD", 10.0, True, i)
                                                                   for i in range(q.seeds)]


def test_collapse_curves(bench, out):
    q = bench.QUICK
    for r in out["rows"].values():
        assert math.isfinite(r["ppl"])
        if r["lam"] is None:
            if r["arch"] == "gpt2":  # the GELU fine-tune's blocks made linear, starting from the model as it is
                assert len(r["plain"]["ppl"]) == q.layers + 1 and r["plain"]["ppl"][0] == pytest.approx(r["ppl"])
            continue
        c = r["curve"]
        assert r["sites"] == q.layers and len(r["slopes"]) == q.layers
        assert sorted(c["order"]) == sorted(r["slopes"])  # every block, once, in sensitivity's order
        assert len(c["ppl"]) == q.layers + 1 and c["ppl"][0] == pytest.approx(r["ppl"], rel=1e-6)
        # each collapse removes parameters: one Linear in place of two (GPT-2) or of three (Llama)
        assert all(a > b for a, b in zip(c["params"], c["params"][1:], strict=False))
        if r["arch"] == "gpt2":  # train.collapse computes what the slopes at exactly 1 compute (sensitivity's curve)
            assert c["ppl"][1:] == pytest.approx(c["linearized"], rel=1e-4)


def test_latency_of_the_exported_models(out, bench):
    timed = [r for r in out["rows"].values() if "ms" in r]
    assert {(r["arch"], r["seed"], r["lam"], r["distill"]) for r in timed} == {
        ("gpt2", 0, bench.QUICK.lam_main, False), ("llama", 0, bench.QUICK.lam_main, False)}
    for r in timed:
        assert r["ms"]["baseline"] > 0 and len(r["ms"]["curve"]) == bench.QUICK.layers + 1
        assert all(t > 0 for t in r["ms"]["curve"])


def test_gated_fold_is_the_model_at_beta_one(bench):
    """At β = 1 the gated block is down(up(x)): folding it into one Linear changes nothing but rounding."""
    torch.manual_seed(0)
    model = bench.llama(bench.QUICK).eval()
    bench.gate(model)
    with torch.no_grad():
        for g in bench.gates(model).values():
            g.beta.fill_(1.0)
    ids = torch.randint(0, bench.QUICK.vocab, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        names = list(bench.gates(model))
        bench.fold_gated(model, names)
        got = model(input_ids=ids).logits
    assert not bench.gates(model) and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_tables_and_section(bench, out, tmp_path, monkeypatch):
    q = bench.QUICK
    table = "\n".join(bench.finetune_table(out))
    for row in ("| GPT-2 | pretrained (GELU) |", "| GPT-2 | GELU fine-tune |", "| GPT-2 | LC λ=1 |",
                "| GPT-2 | LC λ=1 + KD |", "| Llama (gated) | pretrained (SiLU) |",
                "| Llama (gated) | SiLU fine-tune |", "| Llama (gated) | gated LC λ=1 |"):
        assert row in table
    curve = bench.curve_table(out, q)
    assert [line.split(" | ")[0] for line in curve[2:]] == [f"| {k}" for k in range(q.layers + 1)]
    assert "x |" in curve[-1]  # the latency ratios are there, for GPT-2 and Llama
    paper = bench.paper_table(out, q)
    assert any("paper" in line for line in paper) and any("here, LC λ=1 |" in line for line in paper)
    distill = bench.distill_table(out, q)
    assert len(distill) == 2 + q.layers + 1 + 1 and distill[-1].startswith("| blocks within")
    assert bench.distill_helps(out, q) in (True, False)
    results = tmp_path / "RESULTS_train.md"
    results.write_text("# earlier sections\n\ntheirs\n")
    bench.write(out, q, "python benchmarks/train_lm.py --quick", ["Reading: a test."], here=tmp_path)
    bench.write(out, q, "python benchmarks/train_lm.py --quick", ["Reading: a test."], here=tmp_path)
    text = results.read_text()
    assert text.startswith("# earlier sections\n\ntheirs\n") and text.count(bench.START) == 1
    assert "| GPT-2 | LC λ=1 + KD |" in text and "Reading: a test." in text
    assert (tmp_path / "train_lm.png").stat().st_size > 0

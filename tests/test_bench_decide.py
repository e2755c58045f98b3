"""Smoke test of benchmarks/decide.py at its --quick sizes (train_finetune's 3-block MLP, 2 + 6 epochs): estimate
and sensitivity before the fine-tune, optimize at --tol 0.05 and the default after it, and the three tables. The
structure of what it returns and prints, never its timings."""

from __future__ import annotations

import pytest

from tests import scripts

pytest.importorskip("sklearn")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")



@pytest.fixture(scope="module")
def decide():
    return scripts.load("decide")


@pytest.fixture(scope="module")
def quick(decide):
    """One --quick run on the 3-block MLP: what main returns (what it prints is `tables` of it)."""
    return decide.main(["--quick", "--only", "deep"])


def test_quick_run_measures_each_part(decide, quick):
    results = quick
    assert list(results) == ["deep MLP (3 blocks)"]
    r = results["deep MLP (3 blocks)"]
    n = len(r["sites"])
    assert n == 3 and len(r["slopes"]) == n
    # (a) estimate ran twice, each with the original first and then each block, the last half and all
    assert len(r["estimate"]) == 2
    for e in r["estimate"]:
        assert e["code"] == 0 and e["command"].startswith("lc-onnx estimate gelu.onnx --batch 1")
        assert [row["label"].split(":")[0] for row in e["rows"]] == ["original", "block 0", "block 1", "block 2",
                                                                     "last half (1)", "all (3)"]
        assert e["rows"][-1]["blocks"] == n and e["rows"][-1]["params"] < e["rows"][0]["params"]
    # the check after the fine-tune: two interleaved runs of GELU, the optimized export and the what-if of all
    assert len(r["timing"]) == 2 and all(len(t) == 3 and min(t) > 0 for t in r["timing"])
    assert r["timed"].startswith("lc-onnx optimize lc.onnx -o")
    # (b) sensitivity on every site prepare then took, each linearized alone and cumulatively
    s = r["sensitivity"]
    assert sorted(s["order"]) == sorted(s["alone"]) == sorted(r["sites"])
    assert len(s["cumulative"]) == n and s["cumulative"][0] == s["alone"][s["order"][0]]
    assert set(r["collapsed"]) <= set(r["sites"])
    assert all(0 <= r[k] <= 100 for k in ("acc_pre", "acc_gelu_ft", "acc_ft", "acc_after"))
    # (c) optimize with the defaults (the accuracy budget: never exit 1 for a slope's error) and all or nothing
    o = r["optimize"]
    assert set(o) == {"default", "no budget"} and o["default"]["code"] == 0
    assert "--no-budget" in o["no budget"]["command"]
    assert not o["default"]["left"] or o["default"]["budget"]  # a block left for the budget: the line says so
    for run in o.values():
        assert (run["chains"] is None) == (run["code"] != 0)
        assert run["code"] == 0 or run["message"].startswith("error:")
        assert run["chains"] is None or 0 <= run["chains"] <= n
    assert r["default_tol"] > 0


def test_tables_have_a_row_per_model_block_and_command(decide, quick):
    results = quick
    text = "\n".join([*decide.tables(results, runs=5), "", *decide.reading(results)])
    r = results["deep MLP (3 blocks)"]
    assert text.startswith("(a) estimate before the fine-tune")
    assert "(b) sensitivity before the fine-tune" in text and "(c) `lc-onnx optimize` on the fine-tuned export" in text
    assert "`lc-onnx estimate gelu.onnx --batch 1 --runs 3 --json estimate0.json`" in text
    for name in r["sites"]:
        assert f"| deep MLP (3 blocks) | {name} |" in text
    for run in r["optimize"].values():
        assert f"`{run['command']}`" in text
    # the reading: one line per question (a: only where the optimized export was timed)
    assert all(f"- ({q}) deep MLP (3 blocks): " in text for q in "bc")
    assert ("- (a) deep MLP (3 blocks): estimate said" in text) == bool(r["timing"])
    # every table is well formed: each row has as many cells as its header
    for block in text.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({line.replace("\\|", "").count("|") for line in rows}) == 1, block


def test_write_replaces_only_its_own_section(decide, quick, tmp_path, monkeypatch):
    results = quick
    monkeypatch.setattr(decide, "HERE", tmp_path)
    path = tmp_path / "RESULTS_train.md"
    path.write_text("# digits\n\n<!-- train_finetune.py: start -->\nits table\n<!-- train_finetune.py: end -->\n")
    decide.write(results, decide.QUICK, 9.0, ["--quick"])
    decide.write(results, decide.QUICK, 9.0, ["--quick"])  # a rerun replaces the section instead of adding one
    text = path.read_text()
    assert text.startswith("# digits\n\n<!-- train_finetune.py: start -->\nits table\n<!-- train_finetune.py: end -->")
    assert text.count(decide.START) == 1 and text.rstrip().endswith(decide.END)
    assert "Command: `python benchmarks/decide.py --quick`" in text

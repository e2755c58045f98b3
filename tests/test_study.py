"""The device study's code path (`benchmarks/study.py --provider`) on the CPU provider with tiny models: fp32 and
fp16 variants, rows for every batch, the MAC share, and a RESULTS section that replaces only its own. No timing
asserts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import study  # noqa: E402


def test_device_study_on_the_cpu_provider_writes_only_its_section(tmp_path):
    rows = study.device_study("cpu", quick=True, folder=tmp_path / "work", batches=(1, 2), models=("BERT-base",),
                              runs=2, warmup=1, threads=1)
    assert [(r.model, r.dtype, r.batch) for r in rows] == [
        ("BERT-base", "fp32", 1), ("BERT-base", "fp32", 2), ("BERT-base", "fp16", 1), ("BERT-base", "fp16", 2)]
    for r in rows:
        assert len(r.ms) == 4 and all(m > 0 for m in r.ms) and r.runs == 2
        assert 0.5 < r.share < 1 and r.mac_ratio > 1  # the tiny BERT's MLPs hold most of its MACs
    fp32, fp16 = rows[0], rows[2]
    assert fp32.rel_err < 1e-5 and fp16.rel_err < 1e-2  # lc-onnx against the original on the provider
    assert rows[0].share == pytest.approx(rows[1].share, rel=1e-3)  # batch scales every MatMul alike

    results = tmp_path / "RESULTS.md"
    before = "# Latency study\n\n| cpu table |\n\n## CPU provider, device study path\n\nOLD-BODY\n\n## Later\n\nkept\n"
    results.write_text(before)
    body = study.device_section("cpu", rows, True, "python benchmarks/study.py --provider cpu --quick")
    results.write_text(study.replace_section(results.read_text(), study.SECTION["cpu"], body))
    text = results.read_text()
    assert text.startswith("# Latency study\n\n| cpu table |\n\n## CPU provider, device study path\n")
    assert "OLD-BODY" not in text and text.endswith("\n## Later\n\nkept\n")
    assert "| BERT-base | fp16 | " in text and "IOBinding" in text and "onnxruntime" in text
    summary = [x for x in text.splitlines() if x.startswith("| BERT-base | fp32 | ") and x.count("|") == 8]
    assert len(summary) == 1  # model, dtype, batch 1, batch 2, ideal / lc-onnx, vs own activation, MAC share


def test_replace_section_appends_where_there_is_none_and_keeps_the_rest():
    text = "# A\n\nx\n\n## CUDA\n\nold table\n"
    assert study.replace_section(text, "## CUDA", "## CUDA\n\nnew\n") == "# A\n\nx\n\n## CUDA\n\nnew\n"
    assert study.replace_section("# A\n", "## CUDA", "## CUDA\n\nnew\n") == "# A\n\n## CUDA\n\nnew\n"
    assert study.section(text, "## CUDA") == "## CUDA\n\nold table\n"
    assert study.section("# A\n\n## CUDA\n\nt\n\n## B\n", "## CUDA") == "## CUDA\n\nt\n"
    assert study.section(text, "## CPU") is None


def test_cuda_graph_rows_time_pinned_models_with_graph_capture_asked(tmp_path, monkeypatch):
    """--cuda-graph's path up to ONNX Runtime (no GPU here): each batch's models pinned to its input shapes,
    the provider asked for `enable_cuda_graph`, inputs bound on the device; its own RESULTS heading."""
    seen = []

    def interleaved(models, feeds, runs, warmup, threads, providers, io_binding, names):
        dims = [[d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] for m in models]
        seen.append((dims, providers, io_binding, names))
        return [bench.Latency(1.0, 1.0, 1.0, runs)] * len(models)

    from lc_onnx import bench

    monkeypatch.setattr(study.bench, "interleaved", interleaved)
    rows = study.device_study("cpu", quick=True, folder=tmp_path / "work", batches=(1, 3),
                              models=("ViT-T/16", "BERT-base"), dtypes=("fp32",), runs=2, cuda_graph=True)
    assert [(r.model, r.batch) for r in rows] == [("ViT-T/16", 1), ("ViT-T/16", 3), ("BERT-base", 1), ("BERT-base", 3)]
    shapes = [[1, 3, 64, 64], [3, 3, 64, 64], [1, 16], [3, 16]]
    for (dims, providers, io_binding, names), shape in zip(seen, shapes, strict=True):
        assert dims == [shape] * 4 and io_binding
        assert providers == [("CPUExecutionProvider", {"enable_cuda_graph": "1"})]
        assert [Path(n).name for n in names] == ["original.onnx", "lc.onnx", "ideal.onnx", "own.onnx"]
    body = study.device_section("cpu", rows, False, study.shown_command(["--provider", "cuda", "--cuda-graph",
                                                                         "--out", "/x/R.md"]), cuda_graph=True)
    assert body.startswith(study.GRAPH_SECTION + "\n\nCommand: `python benchmarks/study.py --provider cuda "
                                                 "--cuda-graph`")
    assert "CUDA graph" in body and "IOBinding" in body


def test_a_full_study_keeps_the_sections_it_does_not_measure():
    """The full run writes its own sections; the device study's and pipeline.py's (copied by hand) stay."""
    old = "# A\n\nold\n\n## Targets\n\nold targets\n\n## CUDA\n\ngpu rows\n\n## In a deployment pipeline\n\np\n"
    new = "# A\n\nnew\n\n## Targets\n\nnew targets\n"
    out = study.keep_others(new, old)
    assert out.startswith(new) and "old targets" not in out
    assert study.section(out, "## CUDA") == "## CUDA\n\ngpu rows\n"
    assert study.section(out, "## In a deployment pipeline") == "## In a deployment pipeline\n\np\n"

"""Users 1, items 7 and 8 (graph side): bench says the shapes it ran at and which dims it guessed (--batch sets
only the batch dim, the graph pins the rest), warns where a speedup is within the spread, gives every model's MAC
line, aligns its table, records samples, versions and a timestamp in --json; --plot on bench and inspect. No
timing asserts: fields and structure only."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import onnx
import pytest
from click.testing import CliRunner

from lc_onnx import api, bench
from lc_onnx.cli import main
from tests.builder import conv_mlp, mlp

PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _open(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """The model with its input's dims renamed `names` (open); None keeps a dim as it is."""
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim, names, strict=False):
        if name is not None:
            d.dim_param = name
    return model


@pytest.fixture
def seq(tmp_path):
    """x [batch, seq, 8]: a transformer MLP's input with its sequence length left open, as BERT's is."""
    path = tmp_path / "seq.onnx"
    onnx.save(_open(mlp(rank=3), "batch", "seq"), path)
    return path


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(rank=3), a)
    onnx.save(mlp(rank=3, slope=0.5), b)  # a slope outside --tol: nothing to collapse
    return a, b


def test_bench_prints_each_input_and_warns_which_open_dims_it_guessed(seq):
    result = invoke("bench", seq, "--runs", 2, "--warmup", 0)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "input x: [2, 2, 8] float32, N(0, 1); guessed dim 0 (batch) = 2, dim 1 (seq) = 2 (open dims 2)" in lines
    (warning,) = [line for line in lines if line.startswith("warning: open dims guessed")]
    assert "x dim 0 (batch) = 2, x dim 1 (seq) = 2" in warning
    assert "--input-shape NAME:D1,D2,.." in warning and "--batch N" in warning
    result = invoke("bench", seq, "--runs", 2, "--warmup", 0, "--input-shape", "x:1,128,8")
    assert "input x: [1, 128, 8] float32, N(0, 1)" in result.stdout.splitlines() and "guessed" not in result.stdout


def test_dims_named_like_those_of_a_sized_input_are_not_a_guess(tmp_path):
    from onnx import helper

    from tests.builder import Builder

    b = Builder()
    (x,) = b.node("Add", ["x", "m"])
    b.nodes.append(helper.make_node("Identity", [b.linear(b.prelu(b.linear(x, 8, 32), 1.0), 32, 8)], ["y"]))
    path = tmp_path / "two.onnx"
    onnx.save(b.model([("x", ["batch", "seq", 8]), ("m", ["batch", "seq", 8])], [("y", None)]), path)
    result = invoke("bench", path, "--runs", 1, "--warmup", 0, "--input-shape", "x:1,16,8")
    assert result.exit_code == 0, result.output
    assert "input m: [1, 16, 8] float32, N(0, 1); dim 0 (batch) = 1, dim 1 (seq) = 16 from x (same dim name)" \
        in result.stdout.splitlines()
    assert "warning" not in result.stdout


def test_batch_sets_only_the_first_dim_and_leaves_the_others_to_the_guess(seq):
    result = invoke("bench", seq, "--runs", 2, "--warmup", 0, "--batch", 4)
    assert result.exit_code == 0, result.output
    assert "input x: [4, 2, 8] float32, N(0, 1); dim 0 (batch) = 4 from --batch; guessed dim 1 (seq) = 2" \
        in result.stdout
    (warning,) = [line for line in result.stdout.splitlines() if line.startswith("warning: open dims")]
    assert "x dim 1 (seq) = 2" in warning and "dim 0" not in warning and "--batch" not in warning
    # every open dim but the batch declared: nothing guessed, no warning
    fixed = seq.with_name("fixed.onnx")
    onnx.save(mlp(rank=3), fixed)
    result = invoke("bench", fixed, "--runs", 2, "--warmup", 0, "--batch", 4)
    assert "dim 0 (N) = 4 from --batch" in result.stdout and "guessed" not in result.stdout


def test_batch_lets_the_graph_pin_a_convs_channels(tmp_path):
    """`--batch` used to set every open dim to 2 before the guess: a Conv's 8 input channels became 2 and the run
    failed. Now only the batch is set, and the channels come from the Conv's weight."""
    path = tmp_path / "conv.onnx"
    model = _open(conv_mlp(), "N", "C", "H", "W")
    onnx.save(model, path)
    shapes, where = bench.feed_shapes(model, 4, {}, {})
    assert shapes == {"x": [4, 8, 2, 2]} and where["x"]["batch"] and where["x"]["guessed"] == [1, 2, 3]
    assert "8 channels from the weight of Conv" in where["x"]["why"]
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", "C", "H", "W"]  # as was
    out = tmp_path / "conv.json"
    result = invoke("bench", path, "--runs", 1, "--warmup", 0, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["inputs"] == {"x": [4, 8, 2, 2]}


def _result(*models: tuple[str, float, float, float]) -> bench.BenchResult:
    result = bench.BenchResult("cpu", 1, 5, 1, {"x": [1, 8]})
    for path, median, p10, p90 in models:
        result.models.append({"path": path, "median_ms": median, "p10_ms": p10, "p90_ms": p90, "runs": 5,
                              "samples_ms": [p10, median, median, median, p90],
                              "speedup_vs_first": models[0][1] / median})
    return result


def test_a_speedup_within_either_models_spread_is_said_to_be_unresolved():
    resolved = _result(("a.onnx", 2.0, 1.9, 2.1), ("b.onnx", 1.0, 0.95, 1.05))
    assert resolved.warnings() == [] and "warning" not in resolved.table()
    noisy = _result(("a.onnx", 2.0, 1.7, 2.3), ("b.onnx", 1.6, 1.55, 1.65), ("c.onnx", 1.0, 0.99, 1.01))
    (warning,) = noisy.warnings()  # b is 0.4 ms faster and a spreads over 0.6 ms; c, 1 ms faster, is resolved
    assert warning.startswith("the speedup of b.onnx (1.25x) is not resolved") and "0.600 ms of a.onnx" in warning
    wide = _result(("a.onnx", 2.0, 1.9, 2.1), ("b.onnx", 1.0, 0.5, 3.0))  # the second model's own spread
    assert "b.onnx (2.00x) is not resolved" in wide.warnings()[0]
    assert "warning: the speedup of b.onnx" in wide.table()
    assert "not resolved" in json.loads(wide.to_json())["warnings"][0]


def test_table_columns_line_up_whatever_the_widths():
    table = _result(("a", 123456.789, 0.5, 200000.0), ("a/much/longer/path.onnx", 0.012, 0.011, 0.013)).table()
    rows = table.splitlines()[:3]
    assert rows[0].split() == ["model", "median", "ms", "p10", "ms", "p90", "ms", "speedup", "vs", "first"]
    assert len({len(r) for r in rows}) == 1  # right-aligned numbers: every row as wide as the header
    for header in ("median ms", "p10 ms", "p90 ms"):
        end = rows[0].index(header) + len(header)
        assert all(r[end - 1] != " " and r[end] == " " for r in rows[1:])  # each number ends under its header
    assert rows[1].endswith("1.00x") and rows[2].endswith("10288065.75x")


def test_every_model_gets_its_mac_line(pair, tmp_path):
    out = tmp_path / "m.json"
    result = invoke("bench", *pair, "--runs", 1, "--warmup", 0, "--batch", 4, "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    (first,) = [line for line in lines if line.startswith(f"MACs of {pair[0]}: ")]
    (second,) = [line for line in lines if line.startswith(f"MACs of {pair[1]}: ")]
    assert "the 1 collapsible chain(s) hold 100.0%" in first and "(8.00x fewer)" in first
    assert "the 0 collapsible chain(s) hold 0.0%" in second and "(1.00x fewer)" in second
    models = json.loads(out.read_text())["models"]
    assert [m["macs"]["chain_count"] for m in models] == [1, 0]
    assert json.loads(out.read_text())["macs"] == models[0]["macs"]  # the first model's, where it always was


def test_a_model_inspect_cannot_read_says_so_on_its_own_mac_line(pair, monkeypatch):
    real = api.inspect

    def inspect(path, **kw):
        if str(path) == str(pair[1]):
            raise api.InputError("cannot read it")
        return real(path, **kw)

    monkeypatch.setattr(api, "inspect", inspect)
    result = invoke("bench", *pair, "--runs", 1, "--warmup", 0)
    assert result.exit_code == 0, result.output
    assert f"MACs of {pair[1]}: not computed (cannot read it)" in result.stdout.splitlines()
    assert any(line.startswith(f"MACs of {pair[0]}: ") for line in result.stdout.splitlines())


def test_json_records_samples_versions_provider_threads_shapes_and_time(seq, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "r.json"
    result = invoke("bench", seq, seq, "--runs", 3, "--warmup", 1, "--threads", 1, "--batch", 3, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [len(m["samples_ms"]) for m in data["models"]] == [3, 3]
    for m in data["models"]:
        assert all(s > 0 for s in m["samples_ms"]) and min(m["samples_ms"]) <= m["median_ms"] <= max(m["samples_ms"])
    assert data["versions"]["onnxruntime"] == ort.__version__ and data["versions"]["onnx"] == onnx.__version__
    assert data["versions"]["lc-onnx"]
    assert data["provider"] == "cpu" and data["ort_provider"] == "CPUExecutionProvider" and data["threads"] == 1
    assert data["inputs"] == {"x": [3, 2, 8]}
    assert data["input_details"]["x"] == {"shape": [3, 2, 8], "dtype": "float32", "drawn": "N(0, 1)", "batch": True,
                                          "guessed": [1], "alike": {}, "why": "open dims 2",
                                          "dim_names": ["batch", "seq", None]}
    when = datetime.fromisoformat(data["timestamp"])
    assert when.tzinfo is not None and when.year >= 2024
    assert any(w.startswith("open dims guessed") for w in data["warnings"])


def _png(path, least: int = 5000) -> tuple[int, ...]:
    from matplotlib import image

    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > least
    pixels = image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0  # drawn, not a blank canvas
    return pixels.shape


def test_bench_plot_draws_each_models_distribution(pair, tmp_path):
    png = tmp_path / "lat.png"
    result = invoke("bench", *pair, "--runs", 5, "--warmup", 0, "--plot", png)
    assert result.exit_code == 0, result.output
    _png(png)


def _no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def test_a_plot_without_matplotlib_is_one_line_exit_2_before_any_timing(pair, tmp_path, monkeypatch):
    _no_matplotlib(monkeypatch)

    def no_timing(*a, **k):
        raise AssertionError("timed although the plot cannot be drawn")

    monkeypatch.setattr(bench, "bench_files", no_timing)
    monkeypatch.setattr(api, "inspect", no_timing)
    png = tmp_path / "lat.png"
    for command in (["bench", *pair], ["inspect", pair[0]]):
        result = invoke(*command, "--plot", png)
        assert result.exit_code == 2, result.output
        assert result.stderr == f'error: --plot {png}: needs matplotlib, which is not installed (pip install ' \
                                f'"lc-onnx[plot]")\n'
        assert not png.exists()


def test_plot_refuses_a_format_it_does_not_write_and_the_json_path(pair, tmp_path):
    result = invoke("bench", pair[0], "--plot", tmp_path / "lat.txt")
    assert result.exit_code == 2 and "name a .png, .svg, .pdf file" in result.stderr
    both = tmp_path / "both.png"
    result = invoke("bench", pair[0], "--json", both, "--plot", both)
    assert result.exit_code == 2 and "is also the --json file" in result.stderr


def test_inspect_plot_draws_slopes_against_the_band_and_macs(tmp_path):
    import numpy as np

    from tests.test_bench import _split

    slopes = np.ones(32)
    slopes[[3, 17]] = 0.25
    path, png = tmp_path / "split.onnx", tmp_path / "inspect.png"
    onnx.save(_split(slopes), path)
    result = invoke("inspect", path, "--plot", png)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("chain 0:")  # the listing as without --plot
    _png(png)


def test_row_macs_follow_each_rule(tmp_path, pair):
    import numpy as np

    from tests.test_bench import _split

    assert bench.row_macs(api.inspect(pair[0]), onnx.load(pair[0])) == [(32 * 16, 8 * 8)]  # folds to 8x8
    assert bench.row_macs(api.inspect(pair[1]), onnx.load(pair[1])) == [(32 * 16, 32 * 16)]  # left
    slopes = np.ones(32)
    slopes[[3, 17]] = 0.25
    model = _split(slopes)
    found = api.inspect(model)
    assert [c.rule for c in found if c.kind == "chain"] == [None, "split_linear_units"]  # the Tanh block is left
    assert bench.row_macs(found, model) == [(8 * (32 + 16), 8 * (32 + 16)),
                                            (32 * 16, 8 * 8 + 2 * (8 + 8))]  # direct 8x8, narrow 8>2>8

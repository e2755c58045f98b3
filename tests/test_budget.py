"""The graph side's accuracy budget: the default --tol is the paper's 0.05, so the slopes a fine-tune leaves
(0.993-0.999) fold and 0.9 stays; where folding every chain within tol would take an output past --rtol, the
chains are folded in order of least error per MAC saved and each one that would break the bound is left, with its
measured error in the report. ValidationError only where the exact rewrites alone fail, or with budget=False."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lc_onnx
from lc_onnx import api
from lc_onnx.cli import main
from lc_onnx.errors import ValidationError
from passes.budget import REASON
from tests.harness import count_ops, optimized

D, H = 16, 64


def stack(slopes: list[float], shift: float = 1.0, seed: int = 0, fan_out: bool = False,
          hidden_out: bool = False) -> onnx.ModelProto:
    """Blocks `Gemm → PRelu(slope) → Gemm`, joined by Tanh (so that each block is its own chain). `shift` moves the
    pre-activations below 0, where a slope other than 1 changes the output: the larger, the more each fold moves
    it. `fan_out`: the last block's hidden tensor feeds two layers; `hidden_out`: it is also a graph output."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    x = "x"
    for k, slope in enumerate(slopes):
        w1 = const(f"w1_{k}", rng.standard_normal((D, H)) / 4)
        b1 = const(f"b1_{k}", np.full(H, -shift))
        nodes += [helper.make_node("Gemm", [x, w1, b1], [f"h_{k}"], name=f"fc1_{k}"),
                  helper.make_node("PRelu", [f"h_{k}", const(f"a_{k}", np.array([slope]))], [f"p_{k}"],
                                   name=f"act_{k}")]
        heads = 2 if fan_out and k == len(slopes) - 1 else 1
        for j in range(heads):
            w2 = const(f"w2_{k}_{j}", rng.standard_normal((H, D)) / 8)
            nodes.append(helper.make_node("Gemm", [f"p_{k}", w2], [f"y_{k}_{j}"], name=f"fc2_{k}_{j}"))
        if heads == 2:
            nodes.append(helper.make_node("Add", [f"y_{k}_0", f"y_{k}_1"], [f"y_{k}_0s"], name=f"sum_{k}"))
            nodes.append(helper.make_node("Tanh", [f"y_{k}_0s"], [f"t_{k}"], name=f"tanh_{k}"))
        else:
            nodes.append(helper.make_node("Tanh", [f"y_{k}_0"], [f"t_{k}"], name=f"tanh_{k}"))
        x = f"t_{k}"
    outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, D]))
    if hidden_out:
        outputs.append(helper.make_tensor_value_info(f"p_{len(slopes) - 1}", TensorProto.FLOAT, [4, H]))
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def folded(result: lc_onnx.OptimizeResult) -> list[tuple[float, float]]:
    """The slope ranges the rewrites took as 1."""
    return [r.slope_range for r in result.report.rewrites if r.error_coefficient > 0]


def activations(model: onnx.ModelProto) -> int:
    """PRelu and LeakyRelu nodes: a left scalar PRelu runs as LeakyRelu (prelu_to_leaky_relu, exact)."""
    return count_ops(model, "PRelu") + count_ops(model, "LeakyRelu")


def left(result: lc_onnx.OptimizeResult) -> list[str]:
    """Why each chain left for the budget was left (a fan-out block is listed per head and whole, as any left one)."""
    return [c.reason for c in result.report.skipped if REASON in c.reason]


def moved(reason: str) -> float:
    """The measured error a left chain's reason states."""
    return float(re.search(r"by ([0-9.e+-]+) \(rel L2\)", reason).group(1))


def test_the_default_tol_is_the_papers():
    assert api.DEFAULT_TOL == 0.05


def test_default_run_folds_fine_tuned_slopes_and_leaves_0_9():
    result = optimized(stack([0.993, 0.996, 0.999, 0.9], shift=0.0), rewrites=3, rtol=1e-2, atol=1e-2)
    assert sorted(lo for lo, _ in folded(result)) == pytest.approx([0.993, 0.996, 0.999])
    (chain,) = [c for c in result.report.skipped if c.slope_range and c.slope_range[0] < 0.95]
    assert "outside tolerance 0.05" in chain.reason
    assert result.report.validation.passed and not result.report.budget


@pytest.mark.parametrize("dynamo", [False, True])
def test_default_run_on_a_torch_export(tmp_path, dynamo):
    """A fine-tuned MLP as torch exports it: slopes 0.993-0.999 fold with the defaults, 0.9 stays."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layers = []
    for slope in (0.993, 0.999, 0.9):
        act = torch.nn.PReLU()
        act.weight.data.fill_(slope)
        layers += [torch.nn.Linear(D, H), act, torch.nn.Linear(H, D), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(net, (torch.randn(4, D),), str(path), dynamo=dynamo, opset_version=18)
    result = lc_onnx.optimize(path)
    assert sorted(round(lo, 3) for lo, _ in folded(result)) == [0.993, 0.999]
    assert any("0.9 is 0.1 from 1" in c.reason for c in result.report.skipped)
    assert result.report.validation.passed


def test_a_block_whose_fold_breaks_the_budget_is_left_and_reported():
    model = stack([0.999, 0.96, 0.995])
    with pytest.raises(ValidationError):  # all of them at once: over the bound
        lc_onnx.optimize(model, rtol=3e-3, budget=False)
    result = lc_onnx.optimize(model, rtol=3e-3)
    assert sorted(lo for lo, _ in folded(result)) == pytest.approx([0.995, 0.999])
    (reason,) = left(result)
    assert "output 't_2'" in reason and "over rtol 0.003" in reason and moved(reason) > 3e-3
    assert result.report.validation.passed and result.report.validation.rtol == 3e-3
    assert "2 of 3 blocks" in result.report.budget and "1 left" in result.report.budget
    assert activations(result.model) == 1
    table = result.report.table()
    assert "left for the accuracy budget: folding it moves output 't_2'" in table and "budget: 2 of 3" in table
    assert result.report.to_dict()["budget"] == result.report.budget


def test_the_chain_with_least_error_per_mac_is_folded_first():
    """Graph order puts the costly slope first: the budget still takes the cheap one."""
    result = lc_onnx.optimize(stack([0.96, 0.999]), rtol=1e-3)
    assert [round(lo, 3) for lo, _ in folded(result)] == [0.999]
    assert len(left(result)) == 1


def test_every_fold_over_budget_leaves_every_block():
    """Every block left: only the exact rewrite of their PRelus to LeakyRelu is made; and where even that is
    skipped, the input comes back as it was."""
    model = stack([0.99, 0.98])
    result = lc_onnx.optimize(model, rtol=1e-9, atol=0.0)
    assert {r.rule for r in result.report.rewrites} == {"prelu_to_leaky_relu"} and len(left(result)) == 2
    assert activations(result.model) == 2 and result.report.validation.passed
    assert result.report.budget.startswith("0 of 2")
    result = lc_onnx.optimize(model, rtol=1e-9, atol=0.0, skip=("prelu_to_leaky_relu",))
    assert result.model.SerializeToString() == model.SerializeToString()
    assert not result.report.rewrites and len(left(result)) == 2
    assert result.report.budget.startswith("0 of 2")


def test_exact_rewrites_that_fail_still_raise():
    """A slope of exactly 1 is no budget choice: rounding alone breaks rtol=atol=0, and nothing may be left."""
    with pytest.raises(ValidationError):
        lc_onnx.optimize(stack([1.0, 0.99]), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("shape", ["fan_out", "hidden_out"])
def test_a_left_activation_is_taken_by_no_other_rule(shape):
    """The fan-out rule, and eliminate_unit_activation (where the hidden tensor is a graph output, no chain rule
    fires and the PRelu alone would be dropped), must leave an activation the budget left."""
    model = stack([0.96], fan_out=shape == "fan_out", hidden_out=shape == "hidden_out")
    loose = lc_onnx.optimize(model, rtol=1.0)
    assert count_ops(loose.model, "PRelu") == 0 and folded(loose)  # without a budget problem, a rule takes it
    tight = lc_onnx.optimize(model, rtol=1e-6, atol=0.0)
    assert activations(tight.model) == 1 and left(tight) and all(moved(r) > 1e-6 for r in left(tight))


def test_cli_reports_the_budget_and_no_budget_fails(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(stack([0.999, 0.96, 0.995]), path)
    runner = CliRunner()
    done = runner.invoke(main, ["optimize", str(path), "--rtol", "3e-3"])
    assert done.exit_code == 0, done.output
    assert "left for the accuracy budget" in done.output and "budget: 2 of 3" in done.output
    strict = runner.invoke(main, ["optimize", str(path), "--rtol", "3e-3", "--no-budget", "-o",
                                  str(tmp_path / "s.onnx")])
    assert strict.exit_code == 1 and "validation failed" in strict.output
    assert "--no-budget" in runner.invoke(main, ["optimize", "--help"]).output


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slopes=st.lists(st.floats(0.95, 1.0), min_size=2, max_size=5), rtol=st.sampled_from([1e-4, 1e-3, 5e-3]),
       seed=st.integers(0, 3))
def test_budget_always_ends_within_rtol(slopes, rtol, seed):
    """Whatever the slopes: the result validates within rtol, every chain is folded or left for the budget, and
    each left chain's measured error is over rtol."""
    model = stack(slopes, seed=seed)
    result = lc_onnx.optimize(model, rtol=rtol)
    v = result.report.validation
    assert v is None or v.passed
    approx = sum(0 < abs(float(np.float32(s)) - 1) <= api.DEFAULT_TOL for s in slopes)
    assert len(folded(result)) + len(left(result)) == approx
    assert all(moved(r) > rtol for r in left(result))


def test_an_activation_removed_alone_and_left_has_its_own_line():
    """`Gemm → PRelu(0.97) → Tanh → Gemm`: no chain holds the PRelu, a node rule removes it; left by the budget,
    it still says why."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) / 4).astype(np.float32), n)
             for n, s in (("w1", (D, H)), ("w2", (H, D)))]
    inits += [numpy_helper.from_array(np.full(H, -1.0, np.float32), "b1"),
              numpy_helper.from_array(np.array([0.97], np.float32), "a")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("PRelu", ["h", "a"], ["p"], name="act"),
             helper.make_node("Tanh", ["p"], ["t"], name="tanh"),
             helper.make_node("Gemm", ["t", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "lone", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert [r.rule for r in lc_onnx.optimize(model, rtol=1.0).report.rewrites] == ["eliminate_unit_activation"]
    result = lc_onnx.optimize(model, rtol=1e-6, atol=0.0)
    (entry,) = [c for c in result.report.skipped if REASON in c.reason]
    assert entry.names == ["act"] and moved(entry.reason) > 1e-6 and activations(result.model) == 1


def test_a_split_left_by_the_budget_says_so_first():
    """A per-channel PRelu, some units within tol: split_linear_units takes it when rtol allows; left, the reason
    leads with the budget and its measured error, then what else holds it back."""
    rng = np.random.default_rng(0)
    slopes = np.where(np.arange(H) < 60, 0.96, 0.5).astype(np.float32)
    inits = [numpy_helper.from_array((rng.standard_normal((D, H)) / 4).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full(H, -1.0, np.float32), "b1"),
             numpy_helper.from_array(slopes, "a"),
             numpy_helper.from_array((rng.standard_normal((H, D)) / 8).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("PRelu", ["h", "a"], ["p"], name="act"),
             helper.make_node("Gemm", ["p", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert [r.rule for r in lc_onnx.optimize(model, rtol=1.0).report.rewrites] == ["split_linear_units"]
    (entry,) = lc_onnx.optimize(model, rtol=1e-6, atol=0.0).report.skipped
    assert entry.reason.startswith(REASON + ": folding it moves output 'y'") and "outside tolerance" in entry.reason


def test_exact_rewrites_that_fail_say_no_budget_helps():
    with pytest.raises(ValidationError, match="the exact rewrites alone fail it, so no budget helps") as info:
        lc_onnx.optimize(stack([1.0, 0.99]), rtol=0.0, atol=0.0)
    assert info.value.report.budget.startswith("validation fails with every block of slopes other than 1 left")


def test_the_budget_runs_the_original_once(monkeypatch):
    """Each try runs only its candidate: the original's outputs are kept from the first comparison."""
    from lc_onnx import validate

    runs = []
    real = validate.session

    def counting(model, *args, **kwargs):
        runs.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(validate, "session", counting)
    model = stack([0.999, 0.96, 0.995, 0.97])
    result = lc_onnx.optimize(model, rtol=3e-3)
    tries = int(re.search(r"; (\d+) tries", result.report.budget).group(1))
    assert len(runs) == 2 + tries  # the first comparison (original, candidate), then one candidate a try
    assert runs[0] is model and sum(m is model for m in runs) == 1


def test_why_nothing_folded_names_the_budget(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(stack([0.99, 0.98]), path)
    done = CliRunner().invoke(main, ["optimize", str(path), "--rtol", "1e-9", "--atol", "0"])
    assert done.exit_code == 0, done.output
    why = done.output.split("why no chain was folded: ")[1]
    assert "2 chains are left for the accuracy budget" in why  # beside the Tanh between the blocks
    assert "raise --rtol if that error is acceptable" in done.output


def test_no_validate_warns_that_slopes_other_than_1_went_unchecked(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(stack([0.96]), path)
    done = CliRunner().invoke(main, ["optimize", str(path), "--no-validate"])
    assert done.exit_code == 0 and "warning: 1 block(s) took slopes up to 0.04 from 1 as 1" in done.output
    onnx.save(stack([1.0]), path)
    assert "warning" not in CliRunner().invoke(main, ["optimize", str(path), "--no-validate", "--overwrite",
                                                      "-o", str(tmp_path / "x.onnx")]).output


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_budget_on_a_real_hf_export(tmp_path, dynamo):
    """A tiny GPT-2 prepared and exported as users do, its slopes spread over 0.955..0.999: with the defaults every
    block is folded or left with its measured error over rtol, and the result validates (both exporters)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lc_onnx import train

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=4, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    names = train.prepare(model, example_inputs=inputs)
    with torch.no_grad():
        for act, slope in zip(train.blocks(model).values(), (0.999, 0.955, 0.99, 0.96), strict=True):
            act.weight.fill_(slope)
    path = tmp_path / "gpt2.onnx"
    train.export(model, inputs, path, dynamo=dynamo)
    result = lc_onnx.optimize(path, rtol=2e-3)
    assert result.report.validation.passed
    taken = [r for r in result.report.rewrites if r.rule == "collapse_linear_chain"]
    assert len(taken) + len(left(result)) == len(names) == 4 and taken and left(result)
    assert all(moved(r) > 2e-3 for r in left(result))


def test_a_left_prelu_still_runs_as_leaky_relu():
    """prelu_to_leaky_relu is exact and faster: a left scalar PRelu becomes a LeakyRelu that stays left."""
    result = lc_onnx.optimize(stack([0.999, 0.96]), rtol=1e-3)
    assert count_ops(result.model, "PRelu") == 0 and count_ops(result.model, "LeakyRelu") == 1
    assert [r.rule for r in result.report.rewrites].count("prelu_to_leaky_relu") == 1
    (reason,) = left(result)
    assert moved(reason) > 1e-3


def test_the_json_report_has_each_left_blocks_numbers(tmp_path):
    path, report = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(stack([0.999, 0.96, 0.995]), path)
    assert CliRunner().invoke(main, ["optimize", str(path), "--rtol", "3e-3", "--report", str(report)]).exit_code == 0
    (entry,) = json.loads(report.read_text())["budget_left"]
    assert entry["output"] == "t_2" and entry["rel_l2"] > entry["rtol"] == 3e-3
    assert entry["names"] == ["fc1_1", "act_1", "fc2_1_0"] and entry["rule"] == "collapse_linear_chain"


def test_no_budget_failure_says_what_the_budget_would_do():
    with pytest.raises(ValidationError, match="without --no-budget, the blocks that break it would be left"):
        lc_onnx.optimize(stack([0.999, 0.96, 0.995]), rtol=3e-3, budget=False)


def test_inspect_says_optimize_may_leave_blocks_with_slopes_other_than_1(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(stack([0.999, 1.0]), path)
    out = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "2 of 3 chain(s) would be rewritten at tol 0.05 (1 with slopes other than 1: optimize leaves any" in out


def test_bench_says_which_collapsible_blocks_optimize_left(tmp_path):
    """The stamp records how many blocks the budget left; bench's MAC line for that model says so."""
    path = tmp_path / "m.onnx"
    onnx.save(stack([0.999, 0.96, 0.995]), path)
    assert CliRunner().invoke(main, ["optimize", str(path), "--rtol", "3e-3"]).exit_code == 0
    out = tmp_path / "m.lc.onnx"
    stamp = json.loads(next(p.value for p in onnx.load(out).metadata_props if p.key == api.STAMP_KEY))
    assert stamp["left_for_budget"] == 1
    done = CliRunner().invoke(main, ["bench", str(path), str(out), "--runs", "2", "--warmup", "1", "--input-shape",
                                     "x:4,16"])
    assert done.exit_code == 0, done.output
    lines = [line for line in done.output.splitlines() if line.startswith("MACs of")]
    assert "left 1 block(s) of this model for the accuracy budget" in lines[1] and "accuracy" not in lines[0]

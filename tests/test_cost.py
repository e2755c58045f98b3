"""The cost model with shared weights: chains that read the same weights (ALBERT runs one MLP in every layer)
fold only where the model's parameters do not grow, unless allow_growth / --allow-growth."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

import lc_onnx
from lc_onnx.cli import main
from passes.cost import split_cost
from tests.builder import Builder
from tests.harness import count_ops, optimized


def shared_mlp(layers: int, d: int, h: int):
    """x_{i+1} = x_i + W_B·PRelu(1)(W_A·x_i + b_A) + b_B with one W_A, W_B for all layers."""
    b = Builder()
    wa, wb = b.const(b.weights(d, h)), b.const(b.weights(h, d))
    x = "x"
    for _ in range(layers):
        y = b.linear(b.prelu(b.linear(x, d, h, weight=wa), 1.0), h, d, weight=wb)
        (x,) = b.node("Add", [x, y])
    return b.model([("x", ["N", 3, d])], [(x, ["N", 3, d])])


def test_few_sharers_collapse_all_and_say_so():
    # 3 x 8x8 fused (216 params with biases) against 2 x 8x32 shared (512) + biases: no growth
    result = optimized(shared_mlp(3, 8, 32), rewrites=3)
    assert {r.rule for r in result.report.rewrites} == {"collapse_linear_chain"}
    assert all("3 chain(s) read shared weights" in r.note and "no growth" in r.note for r in result.report.rewrites)
    assert result.report.after.params < result.report.before.params
    assert "read shared weights" in result.report.table()


def test_albert_like_sharing_is_left_by_default():
    # 12 x 16x16 fused (3,264 params) against 2 x 16x32 shared (1,024) + biases: the file would triple
    model = shared_mlp(12, 16, 32)
    result = optimized(model, rewrites=0)
    assert count_ops(result.model, "MatMul") == 24 and count_ops(result.model, "PRelu") == 0  # activations dropped
    assert {r.rule for r in result.report.rewrites} == {"eliminate_unit_activation"}
    reasons = {c.reason for c in result.report.skipped}
    assert len(reasons) == 1
    (reason,) = reasons
    assert "12 chain(s) read shared weights" in reason and "--allow-growth" in reason
    assert result.report.after.params <= result.report.before.params


def test_allow_growth_collapses_anyway():
    model = shared_mlp(12, 16, 32)
    result = optimized(model, rewrites=12, allow_growth=True, rtol=1e-4, atol=1e-4)
    assert all("allowed by --allow-growth" in r.note for r in result.report.rewrites)
    assert result.report.after.params > result.report.before.params and result.report.allow_growth
    assert count_ops(result.model, "MatMul") == 12


def test_inspect_says_why_and_what_allow_growth_does():
    model = shared_mlp(12, 16, 32)
    chains = [c for c in lc_onnx.inspect(model) if c.kind == "chain"]
    assert len(chains) == 12 and all(c.rule is None and "--allow-growth" in c.reason for c in chains)
    chains = [c for c in lc_onnx.inspect(model, allow_growth=True) if c.kind == "chain"]
    assert all(c.rule == "collapse_linear_chain" for c in chains)


def test_cli_allow_growth(tmp_path):
    import onnx

    path = tmp_path / "albert.onnx"
    onnx.save(shared_mlp(12, 16, 32), path)
    for flag, folded in (([], 0), (["--allow-growth"], 12)):
        out = CliRunner().invoke(main, ["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--overwrite",
                                        "--report", str(tmp_path / "r.json"), *flag])
        assert out.exit_code == 0, out.output
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["allow_growth"] == bool(flag)
        assert sum(r["rule"] == "collapse_linear_chain" for r in report["rewrites"]) == folded
        assert ("allowed by --allow-growth" in out.output) == bool(flag)


def test_split_cost_arithmetic():
    c = split_cost(64, 256, 64, 16, 64 * 256 * 2 + 256 + 64, 64 * 256 * 2 + 256 + 64, bias_in=True, bias_out=True)
    assert (c.macs_before, c.macs_after) == (256 * 128, 64 * 64 + 16 * 128) and not c.grows
    assert np.isclose(c.macs_before / c.macs_after, 32768 / 6144)


def test_split_cost_counts_only_the_biases_there_are():
    """The direct map has a bias where either layer had one, the narrow MLP where the first had one."""
    params, n = 64 * 256 * 2, 16
    weights_and_slopes = 64 * 64 + n * (64 + 64) + n
    for bias_in, bias_out, biases in ((0, 0, 0), (0, 1, 64), (1, 0, 64 + n), (1, 1, 64 + n)):
        c = split_cost(64, 256, 64, n, params, params, bias_in=bias_in, bias_out=bias_out)
        assert c.params_after == weights_and_slopes + biases


def test_split_without_biases_reports_the_params_it_writes():
    slopes = np.ones(32)
    slopes[[3, 17]] = 0.25
    b = Builder()
    y = b.linear(b.prelu(b.linear("x", 8, 32, bias=False), slopes, (32,)), 32, 8, bias=False)
    result = optimized(b.model([("x", ["N", 8])], [(y, ["N", 8])]), rewrites=1)
    (r,) = result.report.rewrites
    written = sum(int(np.prod(t.dims)) for t in result.model.graph.initializer)
    assert r.rule == "split_linear_units" and r.params_after == written == 8 * 8 + 2 * (8 + 8) + 2


def test_shared_weights_with_per_layer_biases_free_every_bias():
    # 10 x 8x8 fused (720 params) against 2 x 8x32 shared (512) + 10 x (32 + 8) biases of their own (400): no growth
    result = optimized(shared_mlp(10, 8, 32), rewrites=10, rtol=1e-4, atol=1e-4)
    assert all("params 912 -> 720: no growth" in r.note for r in result.report.rewrites)
    assert result.report.after.params < result.report.before.params


def test_cli_inspect_allow_growth(tmp_path):
    import onnx

    path = tmp_path / "albert.onnx"
    onnx.save(shared_mlp(12, 16, 32), path)
    for flag, fire in (([], 0), (["--allow-growth"], 12)):
        out = CliRunner().invoke(main, ["inspect", str(path), *flag])
        assert out.exit_code == 0, out.output
        assert f"{fire} of 12 chain(s) would be rewritten" in out.output


def bn_block(shared_scale: bool):
    """24 → Gemm (no bias; its weight also read by another MatMul) → BatchNorm(16) → PRelu (15 of 16 slopes 1) →
    Gemm 16 → 4. The split writes 24·4 + 1·(24+4) weights, 1 slope and 4 + 1 biases = 130 params; what dies is W_B
    and b_B (68), the BatchNormalization's 4·16 = 64 stored values and the 16 slopes: 148, so the model does not
    grow. Counting only its folded bias (16) gave 100: "grows". With the BN's scale and B also read elsewhere, 32 of
    them stay: 116."""
    b = Builder()
    w = b.const(b.weights(24, 16))
    h = b.batchnorm(b.linear("x", 24, 16, "gemm", bias=False, weight=w), 16)
    scale, shift = b.nodes[-1].input[1], b.nodes[-1].input[2]
    s = np.ones(16)
    s[5] = 0.25
    y = b.linear(b.prelu(h, s, (16,)), 16, 4, "gemm")
    (other,) = b.node("MatMul", ["x", w])
    outs = [(y, ["N", 4]), (other, ["N", 16])]
    if shared_scale:
        outs += [(b.node("Neg", [scale])[0], [16]), (b.node("Neg", [shift])[0], [16])]
    return b.model([("x", ["N", 24])], outs)


def test_a_folded_batchnorm_frees_its_four_stored_vectors():
    result = optimized(bn_block(shared_scale=False), rewrites=1, skip=("prelu_to_leaky_relu",), seeds=(0, 1, 2))
    (r,) = result.report.rewrites
    assert r.rule == "split_linear_units" and r.params_after == 130 and not r.note.count("grows")
    assert r.params_before == 24 * 16 + 4 * 16 + 16 * 4 + 4 + 16  # stored: W_A, the BN's 4 vectors, W_B, b_B, slopes


def test_a_batchnorm_scale_read_elsewhere_does_not_count():
    model = bn_block(shared_scale=True)
    result = optimized(model, rewrites=0, skip=("prelu_to_leaky_relu",))
    (reason,) = [c.reason for c in result.report.skipped if "split_linear_units" in c.reason]
    assert "grows the model by +14 params" in reason and "3 weight(s) also read elsewhere stay" in reason
    assert "allowed by --allow-growth" in optimized(model, rewrites=1, skip=("prelu_to_leaky_relu",),
                                                    allow_growth=True).report.rewrites[0].note


def test_freed_counts_batchnorm_roots_once_through_views():
    """sharing.freed on the block: the BN's 4 roots (each once), W_B and b_B die; W_A stays."""
    import onnx_graphsurgeon as gs

    from passes import sharing
    from passes.chain import find_chain

    graph = gs.import_onnx(bn_block(shared_scale=False))
    outputs = {t.name for t in graph.outputs}
    second = next(n for n in graph.nodes if n.op == "Gemm" and any(p.op == "PRelu" for p in n.inputs[0].inputs))
    chain = find_chain(second, outputs, float("inf"))
    assert sharing.freed([chain.first, chain.second], chain.nodes, outputs) == (16 * 4 + 4 + 4 * 16, 1)
    assert chain.first.params == 24 * 16 + 4 * 16  # no stored bias: the one folded from the BN is not counted

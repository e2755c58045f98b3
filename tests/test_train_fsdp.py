"""FSDP2 (`fully_shard`) on 2 processes (torchrun, gloo, CPU): the regularizer in the loss trains the shards, the
slope stepper's Adam steps DTensor slopes, `slopes()` and the stats read whole values alike on every rank, and a
sharded model collapses through `collapse_sharded`; no step is a collective on one rank only, so nothing hangs
(each run is bounded by a timeout, so a hang fails the test). Every rank also trains an unsharded copy on both
ranks' data, which FSDP's gradient averaging must reproduce."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

COMMON = textwrap.dedent("""
    import copy, os, sys, warnings
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lc_onnx import train
    from lc_onnx.train.slope_step import SlopeStepper
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)


    def make(seed=0, per_channel=False):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))
        train.prepare(model, X, per_channel=per_channel)
        return model


    def shard(model):
        # each Linear its own group, the slopes in the root's: a 1-element slope is [1] on rank 0, [0] on rank 1
        mesh = init_device_mesh("cpu", (2,))
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return [tuple(p.to_local().shape) for p in train.slope_parameters(model)]


    def task(out):
        return out.square().mean()


    def batches(steps):
        gens = [torch.Generator().manual_seed(r) for r in (0, 1)]  # each rank its own data
        return [[torch.randn(8, 16, generator=g) for g in gens] for _ in range(steps)]


    def report(result):
        out = [None, None]
        dist.all_gather_object(out, result)
        if rank == 0:
            print(repr(out), flush=True)
        dist.barrier()
        dist.destroy_process_group()
        # torch's own teardown: after DTensor gathers on gloo, about 1 exit in 24 aborts ("terminate called without
        # an active exception", seen with plain fully_shard + full_tensor too); the results are out by now
        sys.stdout.flush()
        os._exit(0)
""")

REGULARIZER = COMMON + textwrap.dedent("""
    model = make()
    ref = copy.deepcopy(model)  # unsharded, trained on both ranks' batches: what FSDP's averaging computes
    shapes = shard(model)
    opt = torch.optim.AdamW(train.param_groups(model, lr=1e-3, slope_lr=5e-2))
    ref_opt = torch.optim.AdamW(train.param_groups(ref, lr=1e-3, slope_lr=5e-2))
    kinds = set()
    for i, xs in enumerate(batches(40)):
        if i % 2:  # after the forward (the root's parameters unsharded) and before it (sharded DTensors)
            loss = task(model(xs[rank])) + 1.0 * train.regularizer(model)
        else:
            reg = train.regularizer(model)
            kinds.add(type(reg).__name__)
            loss = 1.0 * reg + task(model(xs[rank]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = (task(ref(xs[0])) + task(ref(xs[1]))) / 2 + 1.0 * train.regularizer(ref)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    report((shapes, sorted(kinds), train.slopes(model), train.slopes(ref)))
""")

STEPPER = COMMON + textwrap.dedent("""
    results = []
    # one slope a block (rank 1 holds none of it) or one a channel (half on each rank); the slopes' Adam, or the
    # paper's decoupled step (the AdamW below then steps the task gradient of the slopes too)
    for per_channel, mode in ((False, "adam"), (True, "adam"), (False, "decoupled")):
        model = make(per_channel=per_channel)
        ref = copy.deepcopy(model)
        shapes = shard(model)
        try:
            SlopeStepper(1.0, collapse_threshold=0.05).start(model)
            refused = ""
        except ValueError as e:
            refused = str(e)
        core, ref_core = (SlopeStepper(1.0, slope_lr=5e-2, mode=mode) for _ in range(2))
        core.start(model)
        ref_core.start(ref)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        for xs in batches(30):
            opt.zero_grad()
            task(model(xs[rank])).backward()
            stepped = core.step() or mode == "decoupled"  # step() steps nothing in mode="decoupled"
            opt.step()
            core.after_step()
            stats = core.stats(model)  # on every rank, as the Trainer's on_log and Lightning's batch end call it
            ref_opt.zero_grad()
            ((task(ref(xs[0])) + task(ref(xs[1]))) / 2).backward()
            ref_core.step()
            ref_opt.step()
            ref_core.after_step()
        results.append((shapes, refused, stepped, stats, train.slopes(model), ref_core.stats(ref), train.slopes(ref)))
    report(results)
""")

COLLAPSE = COMMON + textwrap.dedent("""
    model = make()
    shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for xs in batches(5):  # the weights move away from make()'s: the copy must get them from the shards
        opt.zero_grad()
        task(model(xs[rank])).backward()
        opt.step()
    with torch.no_grad():
        for p in train.slope_parameters(model):
            p.fill_(1.0)  # each rank its shard
    try:
        train.collapse(model)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    try:
        train.collapse_sharded(model, lambda: nn.Sequential(nn.Linear(16, 4)))  # not the model: fails on rank 0
        failed = ""
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
    collapsed, names = train.collapse_sharded(model, lambda: make(seed=1))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)  # the prepared model at slope 1 (a collective: on every rank)
        diff = float((collapsed(x) - want).abs().max()) if collapsed is not None else None
    kinds = sorted({type(m).__name__ for m in collapsed.modules()}) if collapsed is not None else None
    report((refused, failed, list(names), collapsed is None, diff, kinds))
""")


def run_two(tmp_path, script: str) -> list:
    """`script` on 2 processes (torchrun, gloo); the list rank 0 printed last: one entry a rank."""
    if not dist.is_available():
        pytest.skip("torch without distributed")
    pytest.importorskip("torch.distributed.fsdp")
    path = tmp_path / "worker.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(path)], capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return eval(run.stdout.strip().splitlines()[-1])


def test_fsdp2_regularizer_in_the_loss_trains_the_shards_alike_on_both_ranks(tmp_path):
    (shapes0, kinds0, slopes0, ref0), (shapes1, kinds1, slopes1, ref1) = run_two(tmp_path, REGULARIZER)
    assert shapes0 == [(1,), (1,)] and shapes1 == [(0,), (0,)]  # rank 1 holds no part of either slope
    assert kinds0 == kinds1 == ["Tensor"]  # a plain tensor, which adds to any loss
    assert slopes0 == slopes1  # read whole on both ranks, bitwise equal
    assert all(abs(s - 1) < 0.2 for s in slopes0.values()), slopes0  # pulled to 1 from 0.01
    assert slopes0 == pytest.approx(ref0, abs=1e-5)  # as one process trained on both ranks' batches
    assert ref0 == ref1


def test_fsdp2_slope_stepper_adam_and_decoupled_and_stats_read_whole_slopes_alike_on_both_ranks(tmp_path):
    rank0, rank1 = run_two(tmp_path, STEPPER)
    for (shapes0, refused0, stepped0, stats0, slopes0, ref_stats, ref_slopes), \
            (shapes1, refused1, stepped1, stats1, slopes1, *_), want in zip(
                rank0, rank1, ([[(1,), (1,)], [(0,), (0,)]], [[(16,), (8,)], [(16,), (8,)]],
                               [[(1,), (1,)], [(0,), (0,)]]), strict=True):
        assert [shapes0, shapes1] == want  # one slope: all on rank 0; per channel: half on each rank
        for refused in (refused0, refused1):  # on both ranks, before training: the collapse at the end could not run
            assert "sharded" in refused and "collapse_threshold=None" in refused and "collapse_sharded" in refused
        assert stepped0 and stepped1
        assert stats0 == stats1 and slopes0 == slopes1  # read whole, alike on both ranks
        assert stats0["lc_slope_min"] > 0.3, stats0  # every slope pulled up from 0.01 by the slopes' Adam
        assert stats0 == pytest.approx(ref_stats, abs=1e-5) and slopes0 == pytest.approx(ref_slopes, abs=1e-5)


def test_fsdp2_collapse_is_refused_in_place_and_collapse_sharded_equals_the_model_at_slope_one(tmp_path):
    (refused0, failed0, names0, none0, diff, kinds), (refused1, failed1, names1, none1, *_) = \
        run_two(tmp_path, COLLAPSE)
    for refused in (refused0, refused1):  # one line, on both ranks, no hang
        assert "sharded" in refused and "collapse_sharded(model, make_model)" in refused and "\n" not in refused
        assert "get_model_state_dict" in refused
    assert "loading state_dict" in failed0 and "failed on rank 0" in failed1  # rank 0's error raised on every rank
    assert names0 == names1 == ["1", "3"]
    assert not none0 and none1  # the copy on rank 0 only
    assert diff < 1e-5
    assert "LayerCollapsePReLU" not in kinds


def test_the_callback_decides_by_the_model_not_by_the_trainers_fsdp_argument():
    """transformers' `fsdp=` on the CPU runs DDP: the model is plain, so mode="adam" works and is not refused."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    train.prepare(model, (torch.randn(4, 16),))
    pytest.importorskip("transformers")
    callback = train.LayerCollapseCallback(1.0)
    args = types.SimpleNamespace(fsdp="full_shard", deepspeed=None, output_dir="unused")
    state = types.SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(args, state, None, model=model)
    assert callback._optimizer is not None  # the slopes' Adam, built

"""The order with distributed engines: prepare the bare model, then wrap it. A model already wrapped (DDP, FSDP2's
fully_shard, accelerator.prepare) is refused in one line; after collapse, an optimizer or DDP wrapper built before
it refuses to train on. And a real 2-process DDP run (torchrun, gloo) keeps the slopes equal on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402

X = (torch.randn(4, 16, generator=torch.Generator().manual_seed(7)),)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture
def group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch without distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def quiet_prepare(model, inputs=X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train.prepare(model, inputs)


def test_prepare_after_ddp_wrapping_is_refused_on_the_wrapper_and_on_its_module(group):
    ddp = nn.parallel.DistributedDataParallel(Mlp())
    for model in (ddp, ddp.module):
        with pytest.raises(ValueError, match="DistributedDataParallel.*prepare the bare model first"):
            quiet_prepare(model)
    assert not train.blocks(ddp)


def test_prepare_after_fully_shard_is_refused(group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match="DTensors.*prepare the bare model first"):
        quiet_prepare(model)


def test_prepare_after_accelerator_prepare_is_refused():
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.Accelerator(cpu=True).prepare(Mlp())
    with pytest.raises(ValueError, match="accelerator.prepare"):
        quiet_prepare(model)


def test_a_dropped_wrapper_does_not_count(group):
    model = Mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    del ddp
    assert list(quiet_prepare(model)) == ["act"]


def test_after_collapse_an_optimizer_built_before_refuses_to_step_and_a_new_one_trains():
    model = Mlp()
    quiet_prepare(model)
    opt = torch.optim.AdamW(train.param_groups(model, lr=1e-3))
    with torch.no_grad():
        train.slope_parameters(model)[0].fill_(1.0)
    train.collapse(model)
    model(*X).sum().backward()
    with pytest.raises(RuntimeError, match="AdamW was built before collapse.*build a new optimizer"):
        opt.step()
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.fc2.weight.detach().clone()
    fresh.step()
    assert not torch.equal(before, model.fc2.weight)


def test_after_collapse_a_ddp_wrapper_built_before_refuses_its_forward(group):
    model = Mlp()
    quiet_prepare(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    with torch.no_grad():
        train.slope_parameters(model)[0].fill_(1.0)
    train.collapse(model)
    with pytest.raises(RuntimeError, match="DistributedDataParallel wrapper was built before collapse"):
        ddp(*X)


WORKER = textwrap.dedent("""
    import sys, warnings
    import torch, torch.distributed as dist
    from torch import nn
    from lc_onnx import train
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))
    train.prepare(model, (torch.randn(4, 16),))
    late = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    ddp_late = nn.parallel.DistributedDataParallel(late)
    try:
        train.prepare(late, (torch.randn(4, 16),))
        refused = False
    except ValueError:
        refused = True
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(train.param_groups(ddp, lr=1e-3, slope_lr=5e-2))
    g = torch.Generator().manual_seed(rank)  # each rank its own data: only the gradient sync keeps them equal
    for _ in range(60):
        x = torch.randn(8, 16, generator=g)
        loss = ddp(x).square().mean() + 1.0 * train.regularizer(ddp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    slopes = train.slopes(model)
    done = train.collapse(model, threshold=0.05)
    out = [None, None]
    dist.all_gather_object(out, (refused, slopes, done))
    if rank == 0:
        print(repr(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_ddp_ranks_keep_equal_slopes_and_collapse_the_same_blocks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch without distributed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script)], capture_output=True, text=True, timeout=150, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[:3000]
    (refused0, slopes0, done0), (refused1, slopes1, done1) = eval(run.stdout.strip().splitlines()[-1])
    assert refused0 and refused1  # prepare after DDP wrapping, on both ranks
    assert slopes0 == slopes1 and done0 == done1  # bitwise: the slopes' gradients were averaged
    assert done0 == ["1", "3"], slopes0


TRAINER_WORKER = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    import torch, torch.distributed as dist
    import transformers
    from lc_onnx import train
    sys.path.insert(0, sys.argv[1])
    from test_train_callback import Tokens, tiny_bert

    torch.set_num_threads(1)
    model, names = tiny_bert()  # prepared before the Trainer wraps it in DDP
    args = transformers.TrainingArguments(output_dir=sys.argv[2], report_to=[], use_cpu=True, max_steps=100,
                                          per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                                          seed=0, data_seed=0, ddp_backend="gloo", logging_steps=30)
    callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=0.05)
    snap = {}

    class Slopes(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            snap.update(train.slopes(model))

    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[Slopes(), callback])
    trainer.train()
    out = [None, None]
    dist.all_gather_object(out, (snap, list(callback.collapsed)))
    if dist.get_rank() == 0:
        print(repr(out), flush=True)
    dist.barrier()
""")


def test_two_trainer_ranks_under_torchrun_keep_equal_slopes_and_collapse_the_same_blocks(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if not dist.is_available():
        pytest.skip("torch without distributed")
    script = tmp_path / "trainer_worker.py"
    script.write_text(TRAINER_WORKER)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(script), tests, str(tmp_path / "out")], capture_output=True, text=True, timeout=150,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[:3000]
    (slopes0, done0), (slopes1, done1) = eval(run.stdout.strip().splitlines()[-1])
    assert slopes0 == slopes1 and done0 == done1, (slopes0, slopes1)  # bitwise: gradients averaged by DDP
    assert len(slopes0) == 3 and sorted(done0) == sorted(slopes0), slopes0

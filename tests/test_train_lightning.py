"""`lc_onnx.train.lightning.LayerCollapse` in real `lightning` runs of a tiny MLP on synthetic data: slopes to 1 and
the collapse at the end, a resume from a checkpoint, gradient accumulation, and 2 DDP processes on CPU (gloo)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")
from torch import nn  # noqa: E402

from lc_onnx import train  # noqa: E402
from lc_onnx.train.lightning import LayerCollapse  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
              pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*finds sites by module names:UserWarning")]

THRESHOLD = 0.05
# the cross-entropy here pushes the slopes past 1: at λ=1 they peak at 1.09 and are still 1.06 after 200 steps (as
# in the plain param_groups loop, see the last test); at λ=4 they stay within 0.03 of 1 from step 80
LAM = 4.0
X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
Y = (X @ torch.randn(16, 4, generator=torch.Generator().manual_seed(1))).argmax(1)  # a linear teacher's labels


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    # without a logger Lightning's folder is the working directory: the slope plot lands there, not in the repo
    monkeypatch.chdir(tmp_path)


class Net(L.LightningModule):
    """Linear → GELU → Linear → GELU → Linear: two blocks in a row (the middle Linear is in both)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader(batch_size=32):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch_size)


def trainer(callbacks, **kw):
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1, **kw}
    return L.Trainer(callbacks=callbacks, **kw)


class Snapshot(L.Callback):
    """A copy of the module as training ends, before LayerCollapse (after it in the list) collapses it."""

    def on_train_end(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module)


@pytest.mark.parametrize("mode", ["adam", "decoupled"])
def test_slopes_reach_one_logged_and_the_collapse_keeps_the_slope_one_output(mode):
    snap, callback = Snapshot(), LayerCollapse(lam=LAM, collapse_threshold=THRESHOLD, example_inputs=(X[:4],),
                                               mode=mode)
    model, t = Net(), trainer([snap, callback], max_steps=100)
    t.fit(model, loader())

    before = train.slopes(snap.model)
    assert sorted(before) == ["net.1", "net.3"]
    assert all(abs(s - 1) <= THRESHOLD for s in before.values()), before
    logged = t.callback_metrics
    assert logged["lc_blocks_within"] == 2 and abs(float(logged["lc_slope_mean"]) - 1) <= THRESHOLD
    assert callback.collapsed == ["net.1", "net.3"] and train.slopes(model) == {}
    assert sum(isinstance(m, nn.Linear) for m in model.net) == 1  # three Linear layers fused into one
    with torch.no_grad():
        for m in train.blocks(snap.model).values():
            m.weight.fill_(1.0)  # what collapse computes: the prepared model with slope exactly 1
        torch.testing.assert_close(model(X), snap.model(X), rtol=1e-5, atol=1e-5)
    if mode == "adam":  # the slopes' own Adam stepped them, the module's AdamW never did
        slope_ids = set(map(id, callback.core.params))
        assert set(map(id, callback.core.optimizer.state)) == slope_ids
        assert not slope_ids & set(map(id, t.optimizers[0].state))


def test_accumulated_and_clipped_gradients_step_the_slopes_once_per_optimizer_step():
    callback = LayerCollapse(lam=LAM, example_inputs=(X[:4],))
    model, t = Net(), trainer([callback], max_steps=80, accumulate_grad_batches=4, gradient_clip_val=0.5)
    t.fit(model, loader(batch_size=8))  # 32 batches an epoch, 8 optimizer steps
    assert t.global_step == 80
    assert [int(s["step"]) for s in callback.core.optimizer.state.values()] == [80, 80]
    assert not set(map(id, callback.core.params)) & set(map(id, t.optimizers[0].state))  # hidden from AdamW
    assert all(abs(s - 1) <= THRESHOLD for s in train.slopes(model).values()), train.slopes(model)


def fit_with_checkpoints(folder, ckpt_path=None):
    """2 epochs of 8 steps, checkpointing each epoch's end; the slope tensors at the end and the callback."""
    callback = LayerCollapse(lam=1.0, example_inputs=(X[:4],))
    save = L.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
    model, t = Net(), trainer([callback, save], max_epochs=2, enable_checkpointing=True)
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return [p.detach().clone() for p in train.slope_parameters(model)], callback


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_does(tmp_path):
    uninterrupted, _ = fit_with_checkpoints(tmp_path / "a")
    first = tmp_path / "a" / "epoch=0-step=8.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, callback = fit_with_checkpoints(tmp_path / "b", ckpt_path=first)
    assert not [w for w in caught if "LayerCollapse" in str(w.message)]
    assert [int(s["step"]) for s in callback.core.optimizer.state.values()] == [16, 16]  # 8 restored + 8 here
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)  # bitwise on one CPU thread

    # the same resume without the callback's state: warned, and the slopes take another path
    stripped = tmp_path / "stripped.ckpt"
    ckpt = torch.load(first, weights_only=False)
    assert set(ckpt["callbacks"]["LayerCollapse"]) == {"slopes", "optimizer", "history"}
    del ckpt["callbacks"]["LayerCollapse"]
    torch.save(ckpt, stripped)
    with pytest.warns(UserWarning, match="resuming at step 8 without the slopes' Adam state"):
        drifted, _ = fit_with_checkpoints(tmp_path / "c", ckpt_path=stripped)
    assert max(float((a - b).abs().max()) for a, b in zip(drifted, uninterrupted, strict=True)) > 1e-3


def test_an_unprepared_module_without_example_inputs_stops_before_training():
    model, t = Net(), trainer([LayerCollapse(lam=1.0)], max_steps=1)
    with pytest.raises(ValueError, match="no prepared blocks; pass LayerCollapse\\(example_inputs=...\\)"):
        t.fit(model, loader())
    assert t.global_step == 0
    with pytest.raises(ValueError, match="overshoots"):
        LayerCollapse(lam=100.0, mode="decoupled")


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    import lc_onnx.train, lc_onnx.train.lightning
    early = sorted(m for m in sys.modules if m.split(".")[0].endswith("lightning"))  # [] : lightning not imported
    import torch
    from torch import nn
    import lightning.pytorch as L
    from lc_onnx import train
    from lc_onnx.train.lightning import LayerCollapse
    from tests.test_train_lightning import Net, Snapshot, X, loader, trainer

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)

    class Wrapped(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.ddp = isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel)

    snap, wrapped = Snapshot(), Wrapped()
    callback = LayerCollapse(lam=4.0, collapse_threshold=0.05, example_inputs=(X[:4],))
    t = trainer([wrapped, snap, callback], max_steps=80, devices=2, strategy="ddp")
    model = Net()
    t.fit(model, loader(batch_size=16))  # the DistributedSampler gives each rank its own half of the data
    out = {"early": early, "ddp": wrapped.ddp, "slopes": train.slopes(snap.model), "collapsed": callback.collapsed,
           "steps": t.global_step, "blocks_within": float(t.callback_metrics["lc_blocks_within"])}
    with open(os.path.join(sys.argv[1], f"rank{t.global_rank}.json"), "w") as f:
        json.dump(out, f)
""")


def run_bounded(cmd, timeout, **kw):
    """Run `cmd` in its own session; on timeout kill that whole session (the launcher and both ranks), so that a
    hang fails the test instead of holding it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd} did not end in {timeout} s")
    return proc.returncode, out, err


def test_two_ddp_processes_keep_equal_slopes_and_collapse_the_same_blocks(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch without distributed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # torchrun starts both ranks at once (Lightning then sees an external launcher); Lightning's own launcher
    # (rank 0 starting rank 1 from Trainer(devices=2)) gives the same slopes, but imports one rank after the other:
    # Lightning's import alone is ~6 s of CPU, which made this test 10 s slower on 2 busy cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tmp_path)]
    code, out, err = run_bounded(cmd, timeout=150, env=env, cwd=tmp_path)
    assert code == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    print("slopes per rank:", [r["slopes"] for r in ranks])
    assert ranks[0]["early"] == [], ranks[0]["early"]  # import lc_onnx.train, lc_onnx.train.lightning: no lightning
    assert all(r["ddp"] and r["steps"] == 80 for r in ranks)  # prepared in setup, then Lightning wrapped it in DDP
    assert ranks[0]["slopes"] == ranks[1]["slopes"]  # bitwise: DDP averaged the slopes' gradients
    assert all(abs(s - 1) <= THRESHOLD for s in ranks[0]["slopes"].values()), ranks[0]["slopes"]
    assert ranks[0]["collapsed"] == ranks[1]["collapsed"] == ["net.1", "net.3"]
    assert ranks[0]["blocks_within"] == ranks[1]["blocks_within"] == 2


def test_the_callback_steps_the_slopes_as_the_plain_param_groups_recipe_does():
    """The README's plain loop (AdamW over `param_groups`, λ·regularizer in the loss) and the callback (the module's
    AdamW, the slopes' own Adam at the same slope_lr, the pull added to their gradient) take the same path."""
    callback = LayerCollapse(lam=1.0, example_inputs=(X[:4],))
    model, t = Net(), trainer([callback], max_steps=40)
    t.fit(model, loader())

    plain = Net()
    train.prepare(plain, (X[:4],))
    opt = torch.optim.AdamW(train.param_groups(plain, lr=1e-3, weight_decay=0.01))
    for x, y in [b for _ in range(5) for b in loader()][:40]:  # 8 batches an epoch
        loss = nn.functional.cross_entropy(plain(x), y) + 1.0 * train.regularizer(plain)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert train.slopes(model) == pytest.approx(train.slopes(plain), abs=1e-5)
    assert 0.7 < min(train.slopes(model).values())


def test_the_collapse_at_the_end_keeps_the_metric_within_max_drop():
    """eval_fn/max_drop reach `collapse` at the end of training: a metric that only the first block's fold hurts
    leaves that block (with its drop in `.collapsed.left`) and folds the other."""
    def eval_fn(m: nn.Module) -> float:
        return -1.0 if train.slopes(m).get("net.1") == 1.0 else 0.0

    callback = LayerCollapse(LAM, THRESHOLD, example_inputs=(X[:4],), eval_fn=eval_fn, max_drop=0.5, plot=False)
    module = Net()
    trainer([callback], max_steps=120).fit(module, loader())
    assert callback.collapsed == ["net.3"] and callback.collapsed.left == {"net.1": 1.0}
    assert list(train.blocks(module)) == ["net.1"]
    with pytest.raises(ValueError, match="go together"):
        LayerCollapse(LAM, THRESHOLD, eval_fn=eval_fn)
    with pytest.raises(ValueError, match="needs a collapse_threshold"):
        LayerCollapse(LAM, eval_fn=eval_fn, max_drop=0.5)

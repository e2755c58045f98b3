"""Users 1 item 8 (training side): the callbacks' slope trajectories, one line a block against the threshold band,
saved beside the checkpoint at the end of training (HF: output_dir/lc_slopes.png; Lightning: the logger's folder),
kept in the checkpoints so that a resumed run's plot starts at step 0; each block's slope in the logs (up to 32
blocks) and, through a TensorBoard integration, a histogram each logging step; without matplotlib a warning by
default and a one-line error for plot=True."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from lc_onnx import plots, train
from lc_onnx.train import slope_step
from lc_onnx.train.callbacks import PLOT_NAME, SLOPE_HISTORY_NAME
from tests.test_train_callback import Tokens, tiny_bert, trainer_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
NO_MPL = "matplotlib is not installed"


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


class Writer:
    """Stands in for TensorBoard's SummaryWriter (tensorboard is not a test dependency): records histograms."""

    def __init__(self):
        self.histograms = []

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, step, len(values)))

    def add_scalar(self, *a, **k):
        pass

    add_text = add_scalar
    flush = close = add_scalar


def fake_tensorboard():
    """transformers' TensorBoardCallback with a Writer (its own __init__ refuses without tensorboard)."""
    from transformers.integrations import TensorBoardCallback

    class FakeTensorBoard(TensorBoardCallback):
        def __init__(self):
            self.tb_writer = self.writer = Writer()
            self.logging_dir = None

    return FakeTensorBoard


def block_keys(logs: dict) -> list[str]:
    return sorted(k for k in logs if k.startswith("lc_slope/"))


def test_trainer_run_writes_the_plot_logs_each_block_and_a_histogram_through_tensorboard(tmp_path, monkeypatch):
    tb = fake_tensorboard()
    monkeypatch.setattr("transformers.trainer.get_reporting_integration_callbacks", lambda report_to: [tb])
    callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=0.05)
    model, names, trainer = trainer_for(tmp_path, None, steps=40, logging_steps=10)
    callback.attach(trainer)
    integration = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, tb))
    trainer.train()

    assert is_png(tmp_path / PLOT_NAME)
    assert [step for step, _ in callback.core.history] == [10, 20, 30, 40]  # the logging steps, not every step
    assert all(sorted(slopes) == sorted(names) for _, slopes in callback.core.history)
    assert callback.core.history[0][1][names[0]] < callback.core.history[-1][1][names[0]]  # on their way to 1
    logged = [h for h in trainer.state.log_history if "lc_slope_min" in h]
    assert all(block_keys(h) == sorted(f"lc_slope/{n}" for n in names) for h in logged)
    at_40 = dict(callback.core.history[-1][1])
    assert {n: logged[-1][f"lc_slope/{n}"] for n in names} == at_40
    # once a logging step (the end-of-training summary logs step 40 again)
    assert integration.writer.histograms == [("train/lc_slopes", s, 3) for s in (10, 20, 30, 40)]


def test_more_blocks_than_the_cap_log_min_max_mean_only_and_no_histogram_without_attach(tmp_path, monkeypatch):
    tb = fake_tensorboard()
    monkeypatch.setattr("transformers.trainer.get_reporting_integration_callbacks", lambda report_to: [tb])
    monkeypatch.setattr(slope_step, "MAX_LOGGED_BLOCKS", 2)  # the tiny BERT has 3
    callback = train.LayerCollapseCallback(lam=1.0, plot=False)
    _, _, trainer = trainer_for(tmp_path, [callback], steps=10, logging_steps=5)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "lc_slope_min" in h]
    assert logged and not any(block_keys(h) for h in logged)
    # without attach() the hooks are never given the other callbacks: no TensorBoard writer to find, quietly
    assert next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, tb)).writer.histograms == []
    assert [step for step, _ in callback.core.history] == [5, 10]  # the plot's history is not capped
    assert not (tmp_path / PLOT_NAME).exists()  # plot=False


def run_saving(out, callback, resume_from=None):
    """12 steps logging every 3 and saving every 6 (checkpoint-6, checkpoint-12)."""
    model, _ = tiny_bert()
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=12,
                                          per_device_train_batch_size=8, logging_steps=3, save_strategy="steps",
                                          save_steps=6, disable_tqdm=True, seed=0, data_seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))


def test_a_resumed_trainer_run_continues_the_history(tmp_path):
    first = train.LayerCollapseCallback(lam=1.0)
    run_saving(tmp_path, first)
    assert [s for s, _ in first.core.history] == [3, 6, 9, 12]
    saved = json.loads((tmp_path / "checkpoint-6" / SLOPE_HISTORY_NAME).read_text())
    assert saved["global_step"] == 6 and [s for s, _ in saved["history"]] == [3, 6]

    (tmp_path / PLOT_NAME).unlink()
    resumed = train.LayerCollapseCallback(lam=1.0)
    run_saving(tmp_path, resumed, resume_from=tmp_path / "checkpoint-6")
    assert [s for s, _ in resumed.core.history] == [3, 6, 9, 12]  # steps 3 and 6 from the checkpoint
    assert resumed.core.history[:2] == first.core.history[:2]
    assert is_png(tmp_path / PLOT_NAME)


def test_without_matplotlib_the_default_warns_once_and_plot_true_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert not plots.available()
    with pytest.raises(ImportError, match="needs matplotlib") as err:
        train.LayerCollapseCallback(lam=1.0, plot=True)
    assert "\n" not in str(err.value) and "lc-onnx[plot]" in str(err.value)

    for plot, warned in ((None, 1), (False, 0)):
        callback = train.LayerCollapseCallback(lam=1.0, plot=plot)
        _, _, trainer = trainer_for(tmp_path / str(plot), [callback], steps=4, logging_steps=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert len([w for w in caught if NO_MPL in str(w.message)]) == warned
        assert not (tmp_path / str(plot) / PLOT_NAME).exists()
        assert [s for s, _ in callback.core.history] == [2, 4]  # recorded all the same


def test_the_plot_draws_many_blocks_and_an_infinite_threshold(tmp_path):
    history = [(s, {f"block.{i}": 0.01 + s / 100 + i / 100 for i in range(15)}) for s in range(0, 100, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an infinite band once made matplotlib's transforms warn of NaN
        plots.slope_history_plot(history, 0.05, tmp_path / "a.png", collapsed=["block.3"])
        plots.slope_history_plot(history[:1], float("inf"), tmp_path / "b.png")
    assert is_png(tmp_path / "a.png") and is_png(tmp_path / "b.png")


# ---- Lightning --------------------------------------------------------------------------------------------------

@pytest.fixture
def tl():
    """tests.test_train_lightning's tiny module and trainer (Lightning imported only for these tests)."""
    pytest.importorskip("lightning.pytorch")
    import tests.test_train_lightning as tl

    return tl


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.parametrize("logger", ["none", "csv"])
def test_lightning_run_writes_its_plot_and_logs_each_block(tmp_path, tl, logger):
    from lightning.pytorch.loggers import CSVLogger

    from lc_onnx.train.lightning import LayerCollapse

    callback = LayerCollapse(lam=tl.LAM, collapse_threshold=0.05, example_inputs=(tl.X[:4],))
    kw = {"logger": CSVLogger(tmp_path / "csv")} if logger == "csv" else {}
    t = tl.trainer([callback], max_steps=20, log_every_n_steps=5, default_root_dir=tmp_path, **kw)
    t.fit(tl.Net(), tl.loader())

    folder = tmp_path / "csv" / "lightning_logs" / "version_0" if logger == "csv" else tmp_path  # the logger's
    assert is_png(folder / PLOT_NAME)
    assert [s for s, _ in callback.core.history] == [5, 10, 15, 20]
    assert sorted(k for k in t.callback_metrics if k.startswith("lc_slope/")) == ["lc_slope/net.1", "lc_slope/net.3"]
    assert float(t.callback_metrics["lc_slope/net.1"]) == pytest.approx(callback.core.history[-1][1]["net.1"])


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
def test_a_resumed_lightning_run_continues_the_history(tmp_path, tl):
    import lightning.pytorch as L

    from lc_onnx.train.lightning import LayerCollapse

    def fit(folder, ckpt_path=None):
        callback = LayerCollapse(lam=1.0, example_inputs=(tl.X[:4],))
        save = L.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
        t = tl.trainer([callback, save], max_epochs=2, enable_checkpointing=True, log_every_n_steps=4,
                       default_root_dir=folder)
        t.fit(tl.Net(), tl.loader(), ckpt_path=ckpt_path)  # 8 steps an epoch
        return callback

    first = fit(tmp_path / "a")
    assert [s for s, _ in first.core.history] == [4, 8, 12, 16]
    resumed = fit(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=0-step=8.ckpt")
    assert [s for s, _ in resumed.core.history] == [4, 8, 12, 16]
    assert resumed.core.history[:2] == first.core.history[:2]
    assert is_png(tmp_path / "b" / PLOT_NAME)


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
def test_lightning_without_matplotlib_warns_once_and_plot_true_is_a_one_line_error(tmp_path, tl, monkeypatch):
    from lc_onnx.train.lightning import LayerCollapse

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"LayerCollapse\(plot=True\): needs matplotlib"):
        LayerCollapse(lam=1.0, plot=True)
    callback = LayerCollapse(lam=1.0, example_inputs=(tl.X[:4],))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tl.trainer([callback], max_steps=4, default_root_dir=tmp_path).fit(tl.Net(), tl.loader())
    assert len([w for w in caught if NO_MPL in str(w.message)]) == 1
    assert not (tmp_path / PLOT_NAME).exists()

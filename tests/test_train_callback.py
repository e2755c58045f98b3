"""LayerCollapseCallback in a real transformers.Trainer run on a tiny BERT and synthetic data."""

import copy

import pytest
import torch

from lc_onnx import train

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

THRESHOLD = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 64, (2, 8))
    names = train.prepare(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, names


class Tokens(torch.utils.data.Dataset):
    """Token sequences labelled by the parity of their first token."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 64, (n, 8), generator=g)
        self.y = self.x[:, 0] % 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.y[i]}


class Snapshot(transformers.TrainerCallback):
    """Keeps a copy of the model as it is when training ends, before the collapse (it runs first)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = copy.deepcopy(model)


def trainer_for(tmp_path, callbacks, steps=100, logging_steps=20):
    model, names = tiny_bert()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=steps,
                                          per_device_train_batch_size=8, logging_steps=logging_steps,
                                          save_strategy="no", disable_tqdm=True, seed=0, data_seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    return model, names, trainer


def run(tmp_path, callback, steps=100, extra=()):
    model, names, trainer = trainer_for(tmp_path, [*extra, callback], steps)
    trainer.train()
    return model, names, trainer


def test_callback_moves_slopes_to_one_logs_them_and_collapses(tmp_path):
    snap = Snapshot()
    callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=THRESHOLD)
    assert isinstance(callback, transformers.TrainerCallback) and isinstance(callback, train.LayerCollapseCallback)
    model, names, trainer = run(tmp_path, callback, extra=[snap])
    assert len(names) == 3  # two MLPs and the pooler's tanh, which feeds the classifier

    before = train.slopes(snap.model)
    assert all(abs(s - 1) <= THRESHOLD for s in before.values()), before
    logged = [h for h in trainer.state.log_history if "lc_slope_min" in h]
    assert len(logged) == 100 // 20 + 1  # every logging step and the end-of-training summary
    assert logged[0]["lc_slope_min"] < 0.5  # still on its way after 20 steps from 0.01
    last = logged[-1]
    assert last["lc_blocks_within"] == 3 and abs(last["lc_slope_mean"] - 1) <= THRESHOLD
    assert last["lc_slope_min"] <= last["lc_slope_mean"] <= last["lc_slope_max"]

    assert sorted(callback.collapsed) == sorted(names) and train.slopes(model) == {}
    ids = Tokens(4).x
    model.eval()
    snap.model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        trained = snap.model(input_ids=ids).logits
        for m in train.blocks(snap.model).values():
            m.weight.fill_(1.0)  # what collapse computes: the blocks with slope exactly 1
        exact = snap.model(input_ids=ids).logits
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-6)
    # and the slopes' last |α−1| (~0.01) moves the trained model's output by about as much
    assert float((got - trained).norm() / trained.norm()) <= THRESHOLD


def test_callback_steps_the_slopes_alone_at_slope_lr(tmp_path):
    # mode="adam": the Trainer's optimizer never steps the slopes (no state for them, so no weight decay
    # either); with lam=0 they follow the task gradient alone, at most about slope_lr a step.
    callback = train.LayerCollapseCallback(lam=0.0)
    model, _, trainer = run(tmp_path, callback, steps=20)
    slopes = set(map(id, train.slope_parameters(model)))
    assert not any(id(p) in slopes for p in trainer.optimizer.state)
    assert set(map(id, callback._optimizer.state)) == slopes
    for s in train.slopes(model).values():
        assert s != 0.01 and abs(s - 0.01) <= 20 * 2e-2 * 1.05


class Integration(transformers.TrainerCallback):
    """Shaped like the `report_to` integrations (TensorBoardCallback, WandbCallback): records what on_log gets."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("how", ["callbacks", "callbacks_and_attach", "attach"])
def test_report_to_integrations_see_the_slope_stats_after_attach(tmp_path, monkeypatch, how):
    # added as report_to adds its integrations: the Trainer puts them before the user's callbacks
    monkeypatch.setattr("transformers.trainer.get_reporting_integration_callbacks", lambda report_to: [Integration])
    callback = train.LayerCollapseCallback(lam=1.0)
    _, _, trainer = trainer_for(tmp_path, [callback] if how != "attach" else None, steps=20, logging_steps=10)
    if how != "callbacks":
        assert callback.attach(trainer) is trainer
        callback.attach(trainer)  # a second attach changes nothing
    callbacks = trainer.callback_handler.callbacks
    integration = next(cb for cb in callbacks if isinstance(cb, Integration))
    assert [cb for cb in callbacks if cb is callback] == [callback]
    assert callbacks.index(integration) < callbacks.index(callback)  # attach() leaves the callback in its place
    trainer.train()

    assert len(integration.logs) == 3  # two logging steps and the end-of-training summary
    logged = [h for h in trainer.state.log_history if "lc_slope_mean" in h]
    assert len(logged) == 3
    if how == "callbacks":  # the limitation attach() lifts: the integration ran before the callback's on_log
        assert not any("lc_slope_mean" in logs for logs in integration.logs)
    else:
        assert [{k: v for k, v in h.items() if k != "step"} for h in logged] == integration.logs
        assert integration.logs[0]["lc_slope_mean"] < integration.logs[1]["lc_slope_mean"]


def test_decoupled_mode_follows_the_papers_update(tmp_path):
    model, _, _ = run(tmp_path, train.LayerCollapseCallback(lam=1.0, mode="decoupled"), steps=100)
    # (1 - 2·lr·λ)^100 = 0.96^100 ≈ 0.017 of the distance left, plus the task's own pull at the Trainer's lr
    for s in train.slopes(model).values():
        assert abs(s - 1) <= THRESHOLD


def test_callback_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        train.LayerCollapseCallback(lam=1.0, mode="sgd")
    with pytest.raises(ValueError, match="overshoots"):
        train.LayerCollapseCallback(lam=100.0, mode="decoupled")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    bare = transformers.BertForSequenceClassification(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=bare, args=args, train_dataset=Tokens(),
                                   callbacks=[train.LayerCollapseCallback(lam=1.0)])
    with pytest.raises(ValueError, match="no prepared blocks"):
        trainer.train()


def test_callback_without_transformers_says_what_to_install(monkeypatch):
    import lc_onnx.train.callbacks as cb

    monkeypatch.setattr(cb, "_BOUND", {})
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        cb.LayerCollapseCallback(lam=1.0)


def test_blocks_found_by_names_stop_training_before_it_starts_unless_they_can_be_verified(tmp_path):
    """The collapse at the end refuses name-found blocks without inputs: the callback says so at the start, and
    with collapse_inputs it verifies them (on the model's device) and collapses."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    ids = torch.randint(0, 64, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    for kw in ({}, {"collapse_inputs": inputs}):
        model = transformers.BertForSequenceClassification(cfg)
        with pytest.warns(UserWarning, match="finds sites by module names"):
            names = train.prepare(model)  # no example inputs: by names
        callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=float("inf"), **kw)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
        if not kw:
            with pytest.raises(ValueError, match="found by names alone.*collapse_inputs"):
                trainer.train()
            assert trainer.state.global_step == 0
        else:
            trainer.train()
            assert sorted(callback.collapsed) == sorted(names) and not train.slopes(model)


def test_collapse_inputs_that_do_not_prove_a_name_found_block_stop_training_before_it_starts():
    """Names say fc1 -> act -> fc2, but a residual reads the hidden tensor: the inputs are checked at the start,
    not by the collapse after the whole run."""
    from types import SimpleNamespace

    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) + h

    args, state = SimpleNamespace(deepspeed=None, fsdp=None), SimpleNamespace(global_step=0)
    model = Block()
    with pytest.warns(UserWarning, match="finds sites by module names"):
        train.prepare(model)
    callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=0.05, collapse_inputs=(torch.randn(4, 8),))
    with pytest.raises(RuntimeError, match="does not run fc1 -> act -> fc2 alone"):
        callback.on_train_begin(args, state, None, model=model)
    assert not model.act.verified


def test_the_collapse_at_the_end_keeps_the_metric_within_max_drop(tmp_path):
    """eval_fn/max_drop reach `collapse` at the end of trainer.train(): a metric that only the pooler's fold hurts
    leaves the pooler and folds both MLPs."""
    def eval_fn(m) -> float:
        pooler = [s for name, s in train.slopes(m).items() if "pooler" in name]
        return -1.0 if pooler == [1.0] else 0.0

    callback = train.LayerCollapseCallback(lam=1.0, collapse_threshold=THRESHOLD, eval_fn=eval_fn, max_drop=0.5,
                                           plot=False)
    model, names, _ = run(tmp_path, callback)
    (pooler,) = [n for n in names if "pooler" in n]
    assert sorted(callback.collapsed) == sorted(n for n in names if n != pooler)
    assert callback.collapsed.left == {pooler: 1.0} and list(train.slopes(model)) == [pooler]

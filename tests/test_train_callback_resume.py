"""LayerCollapseCallback across `trainer.train(resume_from_checkpoint=...)`: the slopes' own Adam is checkpointed.

One uninterrupted run of 12 steps writes checkpoint-6 and checkpoint-12; each test resumes a fresh model and
callback from (a copy of) checkpoint-6 and compares the slopes at step 12 with the uninterrupted run's.
"""

import shutil
import warnings

import pytest
import torch

from lc_onnx import train
from lc_onnx.train.callbacks import SLOPE_STATE_NAME
from tests.test_train_callback import Tokens, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS, SAVE_AT = 12, 6  # 8 batches an epoch: the resume starts mid-epoch and crosses into the next
LOST = "without the slopes' Adam state"


def train_run(out, callback, resume_from=None, args_resume=None):
    """A 12-step run saving every 6 steps; the slope tensors at its end."""
    model, _ = tiny_bert()
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, max_steps=STEPS,
                                          per_device_train_batch_size=8, logging_steps=STEPS, disable_tqdm=True,
                                          save_strategy="steps", save_steps=SAVE_AT, seed=0, data_seed=0,
                                          resume_from_checkpoint=args_resume)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return [p.detach().clone() for p in train.slope_parameters(model)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, train_run(out, train.LayerCollapseCallback(lam=1.0))


def resume_copy(uninterrupted, tmp_path, name="out"):
    """checkpoint-6 of the uninterrupted run, copied to tmp_path/name (resuming writes checkpoint-12 again)."""
    folder = tmp_path / name / f"checkpoint-{SAVE_AT}"
    shutil.copytree(uninterrupted[0] / f"checkpoint-{SAVE_AT}", folder)
    return folder


def resume(folder, output_dir, args_resume=None):
    callback = train.LayerCollapseCallback(lam=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slopes = train_run(output_dir, callback, resume_from=folder, args_resume=args_resume)
    lost = [w for w in caught if LOST in str(w.message)]
    return slopes, callback, lost


@pytest.mark.parametrize("where", ["output_dir", "named_in_args"])
def test_resumed_run_continues_the_slopes_adam(uninterrupted, tmp_path, where):
    if where == "output_dir":  # trainer.train(resume_from_checkpoint=output_dir/checkpoint-6)
        folder = resume_copy(uninterrupted, tmp_path)
        slopes, callback, lost = resume(folder, tmp_path / "out")
    else:  # a checkpoint elsewhere: found when TrainingArguments(resume_from_checkpoint=...) names it too
        folder = resume_copy(uninterrupted, tmp_path, name="elsewhere")
        slopes, callback, lost = resume(folder, tmp_path / "out", args_resume=str(folder))
    assert lost == []
    assert all(int(s["step"]) == STEPS for s in callback._optimizer.state.values())  # 6 restored + 6 here
    torch.testing.assert_close(slopes, uninterrupted[1], rtol=0, atol=1e-6)  # bitwise equal on one CPU thread


@pytest.mark.parametrize("loss", ["file_missing", "other_step", "moved_checkpoint"])
def test_resume_without_the_saved_state_warns_once_and_the_slopes_drift(uninterrupted, tmp_path, loss):
    # the same resume with the slopes' Adam restarted: the test above would catch a state that is not restored
    folder = resume_copy(uninterrupted, tmp_path, name="elsewhere" if loss == "moved_checkpoint" else "out")
    if loss == "file_missing":  # a checkpoint of mode="decoupled" or of an older lc-onnx
        (folder / SLOPE_STATE_NAME).unlink()
    elif loss == "other_step":
        shutil.copy(uninterrupted[0] / f"checkpoint-{STEPS}" / SLOPE_STATE_NAME, folder / SLOPE_STATE_NAME)
    slopes, callback, lost = resume(folder, tmp_path / "out")
    assert len(lost) == 1, [str(w.message) for w in lost]
    assert all(int(s["step"]) == STEPS - SAVE_AT for s in callback._optimizer.state.values())
    with pytest.raises(AssertionError):
        torch.testing.assert_close(slopes, uninterrupted[1], rtol=0, atol=1e-6)  # bitwise equal on one CPU thread
    assert max(float((a - b).abs().max()) for a, b in zip(slopes, uninterrupted[1], strict=True)) > 1e-3


def test_decoupled_mode_saves_no_state_and_resumes_quietly(tmp_path):
    train_run(tmp_path, train.LayerCollapseCallback(lam=1.0, mode="decoupled"))
    assert not (tmp_path / f"checkpoint-{SAVE_AT}" / SLOPE_STATE_NAME).exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_run(tmp_path, train.LayerCollapseCallback(lam=1.0, mode="decoupled"),
                  resume_from=tmp_path / f"checkpoint-{SAVE_AT}")
    assert not [w for w in caught if "LayerCollapseCallback" in str(w.message)]

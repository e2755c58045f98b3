"""`LayerCollapseCallback`: the LayerCollapse regularization inside a normal `transformers.Trainer` run.

    names = prepare(model, example_inputs={"input_ids": ids})
    callback = LayerCollapseCallback(lam=1.0, collapse_threshold=0.05)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])
    trainer.train()          # slopes pulled to 1 alongside the task; blocks within 0.05 collapsed at the end

The user's loss is not touched: the callback (a thin adapter over `slope_step.SlopeStepper`, which Lightning's
`lightning.LayerCollapse` shares) adds λ·∂Σ(α−1)²/∂α to the slopes' gradients before each optimizer
step and steps the slopes with its own Adam at `slope_lr` (no weight decay), taking them out of the Trainer's
step (a torch optimizer skips a parameter whose `.grad` is None). With Adam a parameter moves about its lr a
step whatever the gradient, so at the Trainer's lr (5e-5 by default) a slope could not travel from 0.01 to 1;
at the default `slope_lr=2e-2` (λ=1) it gets within 0.05 of 1 in about 70 steps and stays there (Adam's
second moment remembers the early, large pulls, so the step shrinks as the slope nears 1).

That Adam's state goes into each checkpoint folder as `lc_slope_optimizer.pt` (on `on_save`, next to the
Trainer's `optimizer.pt`), and `trainer.train(resume_from_checkpoint=...)` picks it up again. The `report_to`
integrations run before user callbacks, so they see the slope stats only with `callback.attach(trainer)`.
Each logging step also records every block's slope; at the end of training they are drawn, one line a block
against the threshold band, in `output_dir/lc_slopes.png` (where matplotlib is installed), and each checkpoint
keeps them (`lc_slope_history.json`) so that a resumed run's plot starts at step 0.
transformers is imported only when the callback is built.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import weakref

import torch
from torch import nn

from lc_onnx import plots
from lc_onnx.train.distill import Distiller
from lc_onnx.train.regularize import blocks
from lc_onnx.train.slope_step import OnCore, SlopeStepper, block_logs

logger = logging.getLogger(__name__)

SLOPE_STATE_NAME = "lc_slope_optimizer.pt"  # in each checkpoint folder, with mode="adam"
SLOPE_HISTORY_NAME = "lc_slope_history.json"  # in each checkpoint folder: the slope plot's history so far
PLOT_NAME = "lc_slopes.png"  # in output_dir at the end of training

_BOUND: dict[str, type] = {}


def _with_transformers(cls: type | None = None) -> type:
    """`cls` (LayerCollapseCallback by default) with transformers.TrainerCallback as a base (built once)."""
    cls = cls or LayerCollapseCallback
    if cls.__name__ not in _BOUND:
        try:
            from transformers import TrainerCallback
        except ImportError:
            raise ImportError("LayerCollapseCallback needs transformers: pip install transformers accelerate") \
                from None
        _BOUND[cls.__name__] = type(cls.__name__, (cls, TrainerCallback),
                                    {"__module__": __name__, "__doc__": cls.__doc__})
    return _BOUND[cls.__name__]


def _checkpoint_folder(output_dir: str, step: int) -> str:
    """Where the Trainer writes the checkpoint of `step` (outside a hyperparameter search)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


class LayerCollapseCallback:
    """A `transformers.TrainerCallback` that pulls every prepared slope toward 1 during `trainer.train()`.

    `lam`: λ of the regularizer λ·Σ(α−1)² (per block; the mean over channels when per-channel).
    `mode="adam"` (default): the slopes get the task's gradient plus λ·2(α−1) and their own Adam at `slope_lr`,
    without weight decay; the Trainer's optimizer leaves them alone. `mode="decoupled"`: the paper's update
    α ← α − slope_lr·λ·2(α−1) after each step, the Trainer's optimizer stepping the task gradient as usual.
    `collapse_threshold`: at the end of training, collapse the blocks whose slopes are within it of 1
    (names in `.collapsed`); with `eval_fn(model) -> float` and `max_drop`, only while that metric stays within
    `max_drop` of the uncollapsed model's (`collapse`'s budget: the blocks left, with their drops, in
    `.collapsed.left`; under DDP `eval_fn` must give every rank the same number, or the ranks fold different
    blocks). Blocks `prepare` found by names alone need `collapse_inputs` (example inputs, as
    `collapse` takes them, to verify them on) or `trust_names=True`; without either, training does not start.
    Logs `lc_slope_min/max/mean` and `lc_blocks_within` (slopes within
    `collapse_threshold`, or `report_threshold` when that is None) with the Trainer's logs, and each block's slope
    as `lc_slope/<block>` (up to 32 blocks; beyond that the min/max/mean only, to keep the logs bounded);
    `attach(trainer)` gets them to the `report_to` integrations too, and to a TensorBoard integration a
    histogram of the slopes each logging step. With mode="adam" each checkpoint gets the slopes' Adam state
    (`lc_slope_optimizer.pt`), which `trainer.train(resume_from_checkpoint=...)` continues.
    `plot`: draw the slopes over the logged steps in `output_dir/lc_slopes.png` at the end of training. By
    default (None) drawn where matplotlib is installed, with one warning at the start where it is not;
    plot=True without matplotlib is an ImportError here, plot=False draws nothing.
    `teacher`: a copy of the model taken before `prepare` (its own GELU); while training, each forward of the
    model also runs it (no grad) and adds `distill_weight`·KL(teacher ‖ model)·T² on the logits (`temperature`
    T) to the loss the model returns (`distill.Distiller`; call the model with labels)."""

    def __new__(cls, *args, **kwargs):
        if cls is LayerCollapseCallback:
            cls = _with_transformers()
        return super().__new__(cls)

    def __init__(self, lam: float, collapse_threshold: float | None = None, *, slope_lr: float = 2e-2,
                 mode: str = "adam", betas: tuple[float, float] = (0.9, 0.999), report_threshold: float = 0.05,
                 collapse_inputs=None, trust_names: bool = False, plot: bool | None = None, eval_fn=None,
                 max_drop: float | None = None, higher_is_better: bool = True, teacher: nn.Module | None = None,
                 distill_weight: float = 1.0, temperature: float = 1.0):
        if teacher is not None and not (distill_weight >= 0 and temperature > 0):
            raise ValueError(f"LayerCollapseCallback: needs distill_weight >= 0 and temperature > 0 (got "
                             f"{distill_weight!r}, {temperature!r})")
        self.teacher, self.distill_weight, self.temperature = teacher, distill_weight, temperature
        self._distiller: Distiller | None = None
        self.core = SlopeStepper(lam, collapse_threshold, slope_lr=slope_lr, mode=mode, betas=betas,
                                 report_threshold=report_threshold, collapse_inputs=collapse_inputs,
                                 trust_names=trust_names, who="LayerCollapseCallback", eval_fn=eval_fn,
                                 max_drop=max_drop, higher_is_better=higher_is_better)
        if plot:
            plots.require("LayerCollapseCallback")
        self.plot = plot
        self.collapsed: list[str] = []
        self._warned_unsaved = False
        self._handler = None  # attach()'s trainer's callback handler (a weak reference): where TensorBoard is
        self._histogram_at: int | None = None  # the step of the last histogram (the final summary logs it again)

    lam, collapse_threshold, slope_lr, mode, betas, report_threshold, collapse_inputs, trust_names = (
        OnCore() for _ in range(8))  # the core's: set here, it sees them

    @property
    def _optimizer(self) -> torch.optim.Optimizer | None:  # the slopes' Adam (mode="adam", once training began)
        return self.core.optimizer

    @property
    def _params(self) -> list[nn.Parameter]:
        return self.core.params

    def attach(self, trainer):
        """Add this callback to `trainer` so that its `report_to` integrations (TensorBoard, wandb, ...) log the
        slope stats too; returns the trainer.

        The Trainer puts the integrations before user callbacks and hands one `logs` dict to each in turn, and
        no hook gets the callback list; so a small callback that only adds the stats in `on_log` goes first in
        `trainer.callback_handler.callbacks`. This callback keeps its place for every other event (the collapse
        still runs after the callbacks listed before it)."""
        callbacks = trainer.callback_handler.callbacks
        self._handler = weakref.ref(trainer.callback_handler)
        if not any(cb is self for cb in callbacks):
            trainer.add_callback(self)
        if not any(getattr(cb, "owner", None) is self for cb in callbacks):
            callbacks.insert(0, _with_transformers(_SlopeStatsFirst)(self))
        return trainer

    # ---- the regularization ------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.core.start(model, "call lc_onnx.train.prepare(model, example_inputs) before building the Trainer")
        # FSDP is judged by the model in core.start (transformers' fsdp= on the CPU runs DDP, where adam works)
        if self.mode == "adam" and getattr(args, "deepspeed", None):
            raise ValueError("LayerCollapseCallback: mode='adam' needs the slopes' gradients in .grad, which "
                             "DeepSpeed shards; pass mode='decoupled'")
        if self.mode == "adam" and state.global_step > 0:  # the Trainer resumed: it loaded global_step from there
            self._resume_optimizer(args, state.global_step)
        self.core.history = self._saved_history(args, state.global_step) if state.global_step > 0 else []
        if self.teacher is not None and model is not None:  # the KL term goes into the loss the model returns
            if self._distiller is not None:
                self._distiller.remove()
            self.teacher.to(next(model.parameters()).device)
            self._distiller = Distiller(model, self.teacher, self.distill_weight, self.temperature,
                                        accumulation=args.gradient_accumulation_steps, who="LayerCollapseCallback")
        if self.plot is None and state.is_world_process_zero and not plots.available():
            warnings.warn(f'LayerCollapseCallback: matplotlib is not installed, so no {PLOT_NAME} is drawn at the '
                          f'end of training (pip install "lc-onnx[plot]", or plot=False)', stacklevel=2)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        """After clipping, before the Trainer's step: step the slopes here and hide them from that step."""
        self.core.step()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.core.after_step()

    # ---- the slopes' Adam in checkpoints -----------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        """The Trainer just wrote checkpoint-<global_step>: add the slopes' Adam state (its optimizer.pt
        leaves the slopes out, as they are not stepped by it). A file, not transformers' `ExportableState`:
        that keeps JSON in trainer_state.json, and with `restore_callback_states_from_checkpoint` the Trainer
        would replace this callback by a new object, leaving the user's `.collapsed` empty."""
        if not args.should_save:
            return
        # save_only_model: the Trainer saves no optimizer either, and cannot resume from it
        adam = self._optimizer is not None and not getattr(args, "save_only_model", False)
        folder = _checkpoint_folder(args.output_dir, state.global_step)
        if not os.path.isdir(folder):
            if adam:
                self._warn_unsaved(folder)
            return
        if self.core.history:  # both modes: the plot of a resumed run starts at step 0
            with open(os.path.join(folder, SLOPE_HISTORY_NAME), "w") as f:
                json.dump({"global_step": state.global_step, "history": self.core.history}, f)
        if adam:
            torch.save({"global_step": state.global_step, **self.core.state_dict()},
                       os.path.join(folder, SLOPE_STATE_NAME))

    def _warn_unsaved(self, folder: str) -> None:
        if not self._warned_unsaved:
            self._warned_unsaved = True
            warnings.warn(f"LayerCollapseCallback: no checkpoint folder {folder} (a hyperparameter search or a "
                          f"custom checkpoint layout?); the slopes' Adam state is not saved, and a run resumed "
                          f"from these checkpoints restarts it", stacklevel=2)

    def _resume_optimizer(self, args, step: int) -> None:
        """Continue the slopes' Adam from the checkpoint the Trainer resumed from; warn and start it afresh
        when that checkpoint has none (mode="decoupled", an older lc-onnx) or one of another state."""
        saved, reasons = self._saved_state(args, step)
        if saved is None:
            warnings.warn(f"LayerCollapseCallback: resuming at step {step} without the slopes' Adam state "
                          f"({'; '.join(reasons)}), so it starts afresh and the slopes take another path than "
                          f"in an uninterrupted run. A checkpoint outside output_dir is found when "
                          f"TrainingArguments(resume_from_checkpoint=...) names it too", stacklevel=2)
            return
        self.core.load_state_dict(saved)

    def _saved_state(self, args, step: int) -> tuple[dict | None, list[str]]:
        """The state saved at `step` with exactly the slopes the Trainer just loaded, and why others were not.
        The folder is args.resume_from_checkpoint when set, else output_dir/checkpoint-<step>: the hooks are
        not told which folder `trainer.train(resume_from_checkpoint=...)` got."""
        reasons = []
        for folder in _resumed_folders(args, step):
            path = os.path.join(folder, SLOPE_STATE_NAME)
            if not os.path.isfile(path):
                reasons.append(f"no {path}")
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("global_step") != step:
                reasons.append(f"{path} was saved at step {saved.get('global_step')}")
            elif not self.core.matches(saved):
                reasons.append(f"{path} holds other slopes than the checkpoint's model")
            else:
                return saved, reasons
        return None, reasons

    @staticmethod
    def _saved_history(args, step: int) -> list[tuple[int, dict[str, float]]]:
        """The slope history saved with the checkpoint of `step` the Trainer resumed from; [] where it has none
        (an older lc-onnx): the plot then starts at the resume."""
        for folder in _resumed_folders(args, step):
            path = os.path.join(folder, SLOPE_HISTORY_NAME)
            if os.path.isfile(path):
                with open(path) as f:
                    saved = json.load(f)
                if saved.get("global_step") == step:
                    return [(int(at), dict(slopes)) for at, slopes in saved["history"] if at <= step]
        return []

    # ---- logging and the collapse ------------------------------------------------------------------------

    def stats(self, model: nn.Module) -> dict[str, float]:
        """Slope min/max/mean over every slope, and how many blocks lie within the threshold of 1."""
        return self.core.stats(model)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        """Add the slope stats to this log: to `logs` (callbacks after this one: progress bar, printer) and to
        the entry the Trainer just put in `state.log_history` (it copies `logs` before the callbacks run)."""
        if logs is None or model is None or "lc_slope_min" in logs:  # already added by attach()'s first callback
            return
        extra = self.stats(model)
        slopes = self.core.record(state.global_step, model)  # on every rank: under FSDP2 it gathers the slopes
        extra.update(block_logs(slopes))
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self._histogram(state, slopes)

    def _histogram(self, state, slopes: dict[str, float]) -> None:
        """The blocks' slopes as a TensorBoard histogram at this step, once a step, where `attach` found a
        TensorBoard integration with a writer (rank zero's); quietly nothing otherwise."""
        handler = self._handler() if self._handler is not None else None
        writer = _tensorboard_writer(handler.callbacks) if handler is not None else None
        if writer is None or not slopes or not state.is_world_process_zero or state.global_step == self._histogram_at:
            return
        self._histogram_at = state.global_step
        writer.add_histogram("train/lc_slopes", torch.tensor(list(slopes.values())), state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._distiller is not None:  # the model's forward is its own again
            self._distiller.remove()
            self._distiller = None
        if self.collapse_threshold is not None and model is not None:
            self.collapsed = self.core.finish(model)
            left = len(blocks(model))
            logger.info("LayerCollapse: collapsed %d blocks within %g of slope 1, %d left",
                        len(self.collapsed), self.collapse_threshold, left)
        if self.plot is not False and state.is_world_process_zero:
            threshold = self.collapse_threshold if self.collapse_threshold is not None else self.report_threshold
            plots.save_slope_plot(self.core.history, threshold, os.path.join(args.output_dir, PLOT_NAME),
                                  self.collapsed, "LayerCollapseCallback")


def _resumed_folders(args, step: int) -> list[str]:
    """Where the checkpoint a resumed run started from is: args.resume_from_checkpoint when set, then
    output_dir/checkpoint-<step> (the hooks are not told which folder `trainer.train(resume_from_checkpoint=...)`
    got)."""
    named = getattr(args, "resume_from_checkpoint", None)
    folders = [named] if isinstance(named, str) else []
    folders.append(_checkpoint_folder(args.output_dir, step))
    return list(dict.fromkeys(folders))


def _tensorboard_writer(callbacks: list):
    """The writer of a transformers `TensorBoardCallback` among `callbacks`, if one has a writer that draws
    histograms; else None."""
    try:
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        return None
    for cb in callbacks:
        writer = getattr(cb, "tb_writer", None) if isinstance(cb, TensorBoardCallback) else None
        if writer is not None and hasattr(writer, "add_histogram"):
            return writer
    return None


class _SlopeStatsFirst:
    """Put first in the Trainer's callbacks by `LayerCollapseCallback.attach`: adds `owner`'s slope stats to
    each log before the `report_to` integrations see it, and does nothing else."""

    def __init__(self, owner: LayerCollapseCallback):
        self.owner = owner

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        self.owner.on_log(args, state, control, model=model, logs=logs)

"""`LayerCollapse`: the LayerCollapse regularization inside a Lightning `trainer.fit`.

    from lc_onnx.train.lightning import LayerCollapse

    callback = LayerCollapse(lam=1.0, collapse_threshold=0.05, example_inputs=(x,))  # prepares in setup()
    trainer = L.Trainer(max_steps=600, callbacks=[callback], strategy="ddp", devices=2)
    trainer.fit(module, loader)   # slopes pulled to 1 with the task; blocks within 0.05 collapsed at the end

A thin adapter over `slope_step.SlopeStepper`, the core the transformers callback uses too; this maps Lightning's
hooks onto it, chosen by when Lightning wraps and steps the model:
- `setup("fit")` runs before the strategy wraps the module (DDP) and before `configure_optimizers`: the module is
  prepared there (with `example_inputs`), so DDP syncs the slopes' gradients and the user's optimizer sees them.
  A module that builds its layers in `configure_model` or in its own `setup` (which Lightning calls after the
  callbacks') must be prepared by hand before `trainer.fit`.
- `on_before_optimizer_step`: the slopes get the pull λ·2(α−1), their own Adam step at `slope_lr`, and are
  hidden from the Lightning optimizer (`.grad` None). With `accumulate_grad_batches` it runs once per optimizer
  step, on the accumulated gradient.
- `on_train_batch_end`: mode="decoupled"'s step, after each optimizer step; the slope stats through
  `pl_module.log` (`lc_slope_min/max/mean`, `lc_blocks_within`, and `lc_slope/<block>` up to 32 blocks); and
  every `log_every_n_steps` optimizer steps each block's slope recorded for the slope plot.
- `on_train_end`: the collapse of the blocks within `collapse_threshold`, on every rank; on rank zero the slopes
  over the recorded steps drawn in `lc_slopes.png` in the logger's folder (`default_root_dir` without a logger).
- `state_dict`/`load_state_dict`: the slopes' Adam state and the recorded slopes in Lightning's checkpoint, so
  that `trainer.fit(ckpt_path=...)` continues both.

Lightning is imported only here, and only when `LayerCollapse` is first looked up: `import lc_onnx.train` does not
import it. `lightning.pytorch` is used, or `pytorch_lightning` where only that is installed.
"""

from __future__ import annotations

import logging
import os
import warnings

from torch import nn

from lc_onnx import plots
from lc_onnx.train.prepare import prepare
from lc_onnx.train.regularize import blocks, slopes
from lc_onnx.train.slope_step import OnCore, SlopeStepper, block_logs, on_device

logger = logging.getLogger(__name__)

SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")  # slopes' .grad sharded or absent
PLOT_NAME = "lc_slopes.png"  # in the logger's folder at the end of training


class _LayerCollapse:
    """A Lightning `Callback` that pulls every prepared slope toward 1 during `trainer.fit`.

    `lam`, `collapse_threshold`, `slope_lr`, `mode`, `betas`, `report_threshold`, `collapse_inputs`,
    `trust_names`, `eval_fn`, `max_drop`, `higher_is_better`: as `LayerCollapseCallback` takes them (the same
    core). `example_inputs`: when given, `setup` prepares the LightningModule with them (`prepare(pl_module,
    example_inputs, **prepare_kwargs)`: its forward runs once), before Lightning wraps it; without them the module
    must be prepared before `trainer.fit`.
    `log_stats`: log the slope stats each training batch (each block's slope too, up to 32 blocks).
    `plot`: draw the slopes over the recorded steps in `lc_slopes.png` at the end of training (the logger's
    `log_dir`, or its `save_dir`, or `trainer.default_root_dir`). By default (None) drawn where matplotlib is
    installed, with one warning at the start where it is not; plot=True without matplotlib is an ImportError
    here, plot=False draws nothing.

    Clipping: Lightning calls `on_before_optimizer_step` before it clips gradients (transformers' Trainer calls
    its `on_pre_optimizer_step` after), so here the slopes step on their unclipped gradient and, their `.grad`
    then None, are neither clipped nor counted in the norm that clips the rest. Deliberately so: Adam's step
    hardly depends on the gradient's scale, the pull toward 1 is added unclipped in both frameworks, and the
    only way to step after Lightning's clipping would be a hook inside the user's optimizer.

    Logging: every rank calls `pl_module.log` without `sync_dist` (Lightning's loggers write rank zero's): the
    slopes are equal on every rank by construction (DDP averages their gradients and each rank runs the same
    slope step), so an all-reduce a step would add nothing, and monitors (`EarlyStopping`, `ModelCheckpoint`)
    may still read the stats on every rank."""

    lam, collapse_threshold, slope_lr, mode, betas, report_threshold, collapse_inputs, trust_names = (
        OnCore() for _ in range(8))  # the core's: set here, it sees them

    def __init__(self, lam: float = 1.0, collapse_threshold: float | None = None, *, example_inputs=None,
                 prepare_kwargs: dict | None = None, slope_lr: float = 2e-2, mode: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), report_threshold: float = 0.05, collapse_inputs=None,
                 trust_names: bool = False, log_stats: bool = True, plot: bool | None = None, eval_fn=None,
                 max_drop: float | None = None, higher_is_better: bool = True):
        self.core = SlopeStepper(lam, collapse_threshold, slope_lr=slope_lr, mode=mode, betas=betas,
                                 report_threshold=report_threshold, collapse_inputs=collapse_inputs,
                                 trust_names=trust_names, who="LayerCollapse", eval_fn=eval_fn, max_drop=max_drop,
                                 higher_is_better=higher_is_better)
        if plot:
            plots.require("LayerCollapse")
        self.plot = plot
        self.example_inputs, self.prepare_kwargs, self.log_stats = example_inputs, prepare_kwargs or {}, log_stats
        self.collapsed: list[str] = []
        self._saved: dict | None = None  # a checkpoint's state, until training starts
        self._paired = None  # the (torch) optimizer of the user's whose step steps the slopes
        self._seen_step = 0

    # ---- before Lightning wraps the module, and when training starts -------------------------------------

    def setup(self, trainer, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit":
            return
        if self.mode == "adam" and any(c.__name__ in SHARDED for c in type(trainer.strategy).__mro__):
            raise ValueError(f"LayerCollapse: mode='adam' needs the slopes' whole gradients in .grad, which "
                             f"{type(trainer.strategy).__name__} shards; pass mode='decoupled'")
        if self.example_inputs is not None:
            prepare(pl_module, on_device(self.example_inputs, pl_module), **self.prepare_kwargs)
        self.core.start(pl_module, "pass LayerCollapse(example_inputs=...) or call "
                                   "lc_onnx.train.prepare(model, example_inputs) before trainer.fit")

    def on_train_start(self, trainer, pl_module: nn.Module) -> None:
        """After the strategy moved the module and every checkpoint is restored: pair the slopes with the
        optimizer holding them (the first one if none does), and continue their Adam from the checkpoint."""
        optimizers = [_raw(o) for o in trainer.optimizers]
        slopes = {id(p) for p in self.core.params}
        holding = [o for o in optimizers if any(id(p) in slopes for g in o.param_groups for p in g["params"])]
        self._paired = (holding or optimizers or [None])[0]
        self._seen_step = trainer.global_step
        saved, self._saved = self._saved, None
        history = (saved or {}).pop("history", None)
        self.core.history = [(int(at), dict(s)) for at, s in history or () if at <= trainer.global_step] \
            if trainer.global_step > 0 else []
        saved = saved or None  # a checkpoint of mode="decoupled" holds the history alone
        if self.plot is None and trainer.is_global_zero and not plots.available():
            warnings.warn(f'LayerCollapse: matplotlib is not installed, so no {PLOT_NAME} is drawn at the end of '
                          f'training (pip install "lc-onnx[plot]", or plot=False)', stacklevel=2)
        if self.core.optimizer is None:
            return
        if saved and self.core.matches(saved):
            self.core.load_state_dict(saved)  # now, on the slopes' device
        elif trainer.global_step > 0:
            why = "the checkpoint has none" if not saved else "the checkpoint's is for other slopes than its model's"
            warnings.warn(f"LayerCollapse: resuming at step {trainer.global_step} without the slopes' Adam state "
                          f"({why}), so it starts afresh and the slopes take another path than in an "
                          f"uninterrupted run", stacklevel=2)

    # ---- each step -----------------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer, pl_module: nn.Module, optimizer) -> None:
        """Gradients accumulated and unscaled, not yet clipped: the pull, the slopes' own step, hide them."""
        if _raw(optimizer) is self._paired:
            self.core.step()

    def on_train_batch_end(self, trainer, pl_module: nn.Module, outputs, batch, batch_idx: int) -> None:
        now = None
        if trainer.global_step != self._seen_step:  # an optimizer step ended this batch (not an accumulating one)
            self._seen_step = trainer.global_step
            self.core.after_step()
            if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
                now = self.core.record(trainer.global_step, pl_module)
        if self.log_stats:
            stats = self.core.stats(pl_module)
            if stats:
                stats.update(block_logs(now if now is not None else slopes(pl_module)))
                pl_module.log_dict({k: float(v) for k, v in stats.items()}, on_step=True, on_epoch=False,
                                   sync_dist=False, batch_size=1)

    # ---- the end, and checkpoints ----------------------------------------------------------------------

    def on_train_end(self, trainer, pl_module: nn.Module) -> None:
        self.core.record(trainer.global_step, pl_module)  # the last step, before the collapse takes the blocks
        self.collapsed = self.core.finish(pl_module)
        if self.collapse_threshold is not None and trainer.is_global_zero:
            logger.info("LayerCollapse: collapsed %d blocks within %g of slope 1, %d left",
                        len(self.collapsed), self.collapse_threshold, len(blocks(pl_module)))
        if self.plot is not False and trainer.is_global_zero:  # not trainer.log_dir: that broadcasts
            first = trainer.loggers[0] if trainer.loggers else None
            folder = getattr(first, "log_dir", None) or getattr(first, "save_dir", None) or trainer.default_root_dir
            threshold = self.collapse_threshold if self.collapse_threshold is not None else self.report_threshold
            plots.save_slope_plot(self.core.history, threshold, os.path.join(folder, PLOT_NAME), self.collapsed,
                                  "LayerCollapse")

    def state_dict(self) -> dict:
        """The slopes' Adam state (mode="adam") and the slopes it belongs to; the slopes recorded for the plot."""
        return {**(self.core.state_dict() or {}), "history": [[at, dict(s)] for at, s in self.core.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Kept until `on_train_start`: Lightning restores callbacks before the strategy moves the module to its
        device (DDP), and the Adam state belongs on the slopes' device."""
        self._saved = dict(state_dict) or None


def _raw(optimizer):
    """The torch optimizer under a `LightningOptimizer`."""
    return getattr(optimizer, "_optimizer", optimizer)


def _callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("lc_onnx.train.lightning.LayerCollapse needs Lightning: pip install "
                              "'lc-onnx[lightning]' (or pip install lightning)") from None
    return Callback


def __getattr__(name: str):
    """`LayerCollapse`, built on first use with Lightning's `Callback` as a base (Lightning imported then), and
    kept in this module so that pickling it (`strategy="ddp_spawn"` pickles the Trainer) finds the same class."""
    if name != "LayerCollapse":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = type("LayerCollapse", (_LayerCollapse, _callback_base()),
               {"__module__": __name__, "__qualname__": "LayerCollapse", "__doc__": _LayerCollapse.__doc__})
    globals()["LayerCollapse"] = cls
    return cls

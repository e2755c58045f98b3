"""`SlopeStepper`: the one slope-stepping core under every framework's callback.

transformers' Trainer (`callbacks.LayerCollapseCallback`) and Lightning (`lightning.LayerCollapse`) are thin
adapters that map their framework's hooks onto it: `start` when training starts, `step` just before the
framework's optimizer steps (adds the pull λ·∂Σ(α−1)²/∂α to the slopes' gradients, steps them with their own Adam
at `slope_lr`, and hides them from that optimizer), `after_step` just after it (mode="decoupled"), `stats` for
the logs, `state_dict`/`load_state_dict` for checkpoints, and `finish` at the end (the collapse). How a framework
names its checkpoint folders, logs and events stays in its adapter; nothing here imports a framework.
"""

from __future__ import annotations

import torch
from torch import nn

from lc_onnx.train import wrapped
from lc_onnx.train.collapse import collapse, verify
from lc_onnx.train.regularize import blocks, decoupled_update, full, penalty, sharded
from lc_onnx.train.trace import map_tensors

MODES = ("adam", "decoupled")
MAX_LOGGED_BLOCKS = 32  # more blocks than this: the logs get the min/max/mean only, not one scalar a block


class SlopeStepper:
    """The LayerCollapse regularization of one model's prepared slopes, whatever runs the training loop.

    `lam`: λ of λ·Σ(α−1)² (per block; the mean over channels when per-channel). `mode="adam"`: the slopes get the
    task's gradient plus λ·2(α−1) and their own Adam at `slope_lr` (no weight decay); `mode="decoupled"`: the
    paper's α ← α − slope_lr·λ·2(α−1) after each step, the framework's optimizer stepping the task gradient.
    `collapse_threshold`, `collapse_inputs`, `trust_names`: what `finish` collapses, as `collapse` takes them.
    `who` starts each error message (the adapter's name)."""

    def __init__(self, lam: float, collapse_threshold: float | None = None, *, slope_lr: float = 2e-2,
                 mode: str = "adam", betas: tuple[float, float] = (0.9, 0.999), report_threshold: float = 0.05,
                 collapse_inputs=None, trust_names: bool = False, who: str = "LayerCollapse", eval_fn=None,
                 max_drop: float | None = None, higher_is_better: bool = True):
        if (eval_fn is None) != (max_drop is None):
            raise ValueError(f"{who}: eval_fn and max_drop go together (the metric, and how far the collapse at the "
                             f"end may move it)")
        if max_drop is not None and (collapse_threshold is None or not max_drop >= 0):
            raise ValueError(f"{who}: max_drop needs a collapse_threshold and must be >= 0 (got {max_drop!r})")
        if mode not in MODES:
            raise ValueError(f"{who}: mode must be 'adam' or 'decoupled', not {mode!r}")
        if lam < 0 or slope_lr <= 0:
            raise ValueError(f"{who}: needs lam >= 0 and slope_lr > 0 (got lam={lam}, slope_lr={slope_lr})")
        if mode == "decoupled" and 2 * slope_lr * lam >= 1:
            raise ValueError(f"{who}: the decoupled step overshoots 1 when 2·slope_lr·lam >= 1 "
                             f"(got {2 * slope_lr * lam:g}); lower lam or slope_lr")
        self.lam, self.collapse_threshold, self.slope_lr, self.mode = lam, collapse_threshold, slope_lr, mode
        self.betas, self.report_threshold = betas, report_threshold
        self.collapse_inputs, self.trust_names, self.who = collapse_inputs, trust_names, who
        self.eval_fn, self.max_drop, self.higher_is_better = eval_fn, max_drop, higher_is_better
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self._acts: list[nn.Module] = []
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, each block's slope), for the slope plot

    # ---- the start and each step ------------------------------------------------------------------------

    def start(self, model: nn.Module, how_to_prepare: str = "call lc_onnx.train.prepare(model, example_inputs) "
              "before training") -> None:
        """Take the model's prepared slopes, prove the blocks the final collapse needs proven, and build the
        slopes' Adam (mode="adam"; its state appears at the first step, on the slopes' device)."""
        self._acts = list(blocks(model).values())
        self.params = [m.weight for m in self._acts]
        if not self.params:
            raise ValueError(f"{self.who}: the model has no prepared blocks; {how_to_prepare}")
        self._check_sharding(model)
        self._check_collapsible(model)
        self.optimizer = None
        if self.mode == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=self.slope_lr, betas=self.betas, weight_decay=0.0)

    def step(self) -> bool:
        """Just before the framework's optimizer steps, gradients final: add λ·∂Σ(α−1)²/∂α to the slopes'
        gradients, step them with their own Adam, and leave their `.grad` None, so that the framework's optimizer
        skips them (a torch optimizer skips a parameter without a gradient: no second step, no weight decay) and
        its gradient clipping after this neither counts nor clips them. Skipped (False) when a gradient is not
        finite (an fp16 overflow step, which the framework skips too), and in mode="decoupled". Under FSDP2 the
        pull gathers each slope and the finiteness is all-reduced: every rank runs it, as every framework does."""
        if self.optimizer is None:
            return False
        with torch.enable_grad():
            reg = self.lam * penalty(self._acts)
            pulls = torch.autograd.grad(reg, self.params, allow_unused=True) if reg.requires_grad else \
                [None] * len(self.params)
        grads = []
        for p, pull in zip(self.params, pulls, strict=True):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(g + pull if pull is not None else g)
        stepped = _all_finite(grads)
        if stepped:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self.optimizer.step()
        for p in self.params:
            p.grad = None
        return stepped

    def after_step(self) -> None:
        """Just after the framework's optimizer stepped: mode="decoupled"'s α ← α − slope_lr·λ·2(α−1)."""
        if self.mode == "decoupled":
            decoupled_update(self.params, self.slope_lr, self.lam)

    def _check_sharding(self, model: nn.Module) -> None:
        """Decided by what the model is, not by what the framework was asked for (transformers' `fsdp=` on the CPU
        runs DDP): FSDP2's DTensor slopes step with mode="adam" too, but `collapse_threshold` cannot collapse
        them in place; FSDP1 keeps the slopes' gradients in its flat shards, out of mode="adam"'s reach."""
        if self.collapse_threshold is not None and any(sharded(p) for p in self.params):
            raise ValueError(f"{self.who}: the model is sharded (FSDP2's fully_shard: its slopes are DTensors), "
                             f"which collapse_threshold cannot collapse in place; pass collapse_threshold=None, "
                             f"and after training call lc_onnx.train.collapse_sharded(model, make_model) on every "
                             f"rank")
        if self.mode == "adam" and wrapped._distributed() and any(
                isinstance(m, wrapped._fsdp1()) for m in model.modules()):
            raise ValueError(f"{self.who}: mode='adam' needs the slopes' gradients in .grad, which FSDP1 "
                             f"(FullyShardedDataParallel) keeps in its flat shards; pass mode='decoupled', or "
                             f"shard with FSDP2's fully_shard")

    def _check_collapsible(self, model: nn.Module) -> None:
        """`collapse` at the end refuses blocks found by names alone that inputs do not prove: prove them now
        (they stay proven), or say so before training, not after it."""
        if self.collapse_threshold is None or self.trust_names:
            return
        unverified = [name for name, act in blocks(model).items() if not act.verified]
        if unverified and self.collapse_inputs is not None:
            verify(model, on_device(self.collapse_inputs, model))
        elif unverified:
            raise ValueError(f"{self.who}: {', '.join(unverified)} were found by names alone, which the collapse "
                             f"at the end of training refuses; pass collapse_inputs=<example inputs> to verify "
                             f"them on, trust_names=True, or prepare the model with example_inputs")

    # ---- what the logs show -----------------------------------------------------------------------------

    def stats(self, model: nn.Module) -> dict[str, float]:
        """Slope min/max/mean over every slope, and how many blocks lie within the threshold of 1
        (`collapse_threshold`, or `report_threshold` when that is None)."""
        found = blocks(model)
        if not found:
            return {}
        weights = [full(m.weight.detach()) for m in found.values()]  # FSDP2: gathered, on every rank alike
        values = torch.cat([w.double().flatten() for w in weights])
        threshold = self.collapse_threshold if self.collapse_threshold is not None else self.report_threshold
        within = sum(float((w - 1).abs().max()) <= threshold for w in weights)
        return {"lc_slope_min": float(values.min()), "lc_slope_max": float(values.max()),
                "lc_slope_mean": float(values.mean()), "lc_blocks_within": int(within)}

    def record(self, step: int, model: nn.Module) -> dict[str, float]:
        """Each block's slope now (`regularize.slopes`: the one farthest from 1 when per-channel), appended to
        `history` as (step, slopes). Adapters call it at their logging cadence, not every step, so the history
        stays small; a step logged again (or an earlier one: a new run) replaces what followed it."""
        from lc_onnx.train.regularize import slopes

        now = slopes(model)
        while self.history and self.history[-1][0] >= step:
            self.history.pop()
        if now:
            self.history.append((step, now))
        return now

    # ---- the slopes' Adam in checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """The slopes' Adam state and the slopes it belongs to (on the CPU); None in mode="decoupled", whose
        state is the slopes themselves (in the model's checkpoint)."""
        if self.optimizer is None:
            return None
        return {"slopes": [p.detach().cpu() for p in self.params], "optimizer": self.optimizer.state_dict()}

    def matches(self, saved: dict) -> bool:
        """Whether `saved` (a `state_dict`) holds exactly the slopes the model has now: it was saved with the
        checkpoint the model was just loaded from."""
        slopes = saved.get("slopes")
        if slopes is None or len(slopes) != len(self.params):
            return False
        return all(s.shape == p.shape and torch.equal(s.to(p.dtype), p.detach().cpu())
                   for s, p in zip(slopes, self.params, strict=True))

    def load_state_dict(self, saved: dict) -> None:
        """Continue the slopes' Adam from `saved` (check `matches` first), at this run's slope_lr and betas."""
        self.optimizer.load_state_dict(saved["optimizer"])  # moves the state to the slopes' device
        for group in self.optimizer.param_groups:  # this run's slope_lr and betas, should they have changed
            group.update(lr=self.slope_lr, betas=self.betas)

    # ---- the end ----------------------------------------------------------------------------------------

    def finish(self, model: nn.Module) -> list[str]:
        """Collapse the blocks within `collapse_threshold` of slope 1 (none without one), in eval mode (a
        BatchNorm between the layers folds with its running stats), within `max_drop` of `eval_fn`'s metric where
        given (as `collapse` does); the names collapsed, with `.left`."""
        if self.collapse_threshold is None:
            return []
        training = model.training
        model.eval()
        try:
            return collapse(model, threshold=self.collapse_threshold,
                            example_inputs=on_device(self.collapse_inputs, model), trust_names=self.trust_names,
                            eval_fn=self.eval_fn, max_drop=self.max_drop, higher_is_better=self.higher_is_better)
        finally:
            model.train(training)


class OnCore:
    """An adapter's attribute that is its core's (`lam`, `slope_lr`, ...): set on the callback, the core sees it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj.core, self.name)

    def __set__(self, obj, value) -> None:
        setattr(obj.core, self.name, value)


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite. Under FSDP2 each rank sees its shards only, so the answer is all-reduced
    (every rank runs `step`): no rank steps its part of a slope while another skips."""
    local = [g.to_local() if sharded(g) else g for g in grads]
    finite = all(bool(torch.isfinite(g).all()) for g in local)
    if not any(sharded(g) for g in grads):
        return finite
    flag = torch.tensor(float(finite), device=local[0].device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def on_device(inputs, model: nn.Module):
    """Example inputs moved to the model's device (the framework may have moved the model to a GPU)."""
    if inputs is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return map_tensors(lambda t: t.to(device), inputs)


def block_logs(slopes: dict[str, float]) -> dict[str, float]:
    """`lc_slope/<block>` scalars for the logs, one a block; none beyond MAX_LOGGED_BLOCKS blocks (a bounded log)."""
    return {f"lc_slope/{name}": v for name, v in slopes.items()} if len(slopes) <= MAX_LOGGED_BLOCKS else {}

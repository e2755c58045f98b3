"""Distillation from the model as it was before `prepare` (its own GELU), beside the task loss, during the
LayerCollapse fine-tune: KL(teacher ‖ student) on the logits, the knowledge-distillation term.

On a GPT-2 pretrained here (benchmarks/train_lm.py, 4 blocks, 200 fine-tune steps at λ = 1 and 10) it kept
perplexity lower at every number of blocks collapsed than the same fine-tune without it, in both seeds. The plain
loop adds `distill_loss(logits, teacher_logits)` to its loss; `Distiller` does the same inside a model's forward (a
hook that adds the term to the `loss` an HF model returns), which is how `LayerCollapseCallback(teacher=...)` puts
it into a Trainer's loss without touching the Trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T))·T², over the last dim (the classes or vocabulary), averaged over
    every other position (each token of a language model), or over those where the boolean `mask` (the logits'
    shape without the last dim) is True. The teacher's logits are taken as constants."""
    if logits.shape != teacher_logits.shape:
        raise ValueError(f"distill_loss: student logits {tuple(logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"distill_loss: temperature must be > 0 (got {temperature!r})")
    v = logits.shape[-1]
    s = F.log_softmax(logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().reshape(-1, v).float() / temperature, dim=-1)
    per = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        m = mask.reshape(-1).to(per.device)
        if m.numel() != per.numel():
            raise ValueError(f"distill_loss: mask {tuple(mask.shape)} does not match the logits' positions "
                             f"{tuple(logits.shape[:-1])}")
        per = per[m.bool()]
    if per.numel() == 0:
        return logits.sum() * 0.0
    return per.mean() * temperature**2


def _positions(attention_mask, logits: torch.Tensor) -> torch.Tensor | None:
    """The tokens a language model's logits hold that are not padding: its `attention_mask`, where it has one per
    logit position (a classifier's logits have none: every example counts)."""
    if attention_mask is None or tuple(attention_mask.shape) != tuple(logits.shape[:-1]):
        return None
    return attention_mask.bool()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out


class Distiller:
    """A forward hook on `model` that, in training mode with gradients on, runs `teacher` (no grad, eval mode) on
    the same inputs (labels left out) and adds `weight·distill_loss` to the `loss` the model returns (an HF
    `ModelOutput` or dict with `loss` and `logits`: call the model with labels), over the positions its
    `attention_mask` keeps (padding left out) where it has one per logit position. `accumulation`: where the model
    normalizes its loss over the whole accumulated batch (the Trainer passes `num_items_in_batch` and then does
    not divide the loss by the accumulation steps), the term is divided by it, so each optimizer step gets the
    mean over its micro-batches. `last`: the last term added (a float), for logs. `remove()` takes the hook off."""

    def __init__(self, model: nn.Module, teacher: nn.Module, weight: float = 1.0, temperature: float = 1.0,
                 accumulation: int = 1, who: str = "Distiller"):
        if teacher is model:
            raise ValueError(f"{who}: the teacher must be another module (a copy of the model taken before "
                             "prepare), not the model being trained")
        if not weight >= 0 or not temperature > 0:
            raise ValueError(f"{who}: needs weight >= 0 and temperature > 0 (got {weight!r}, {temperature!r})")
        self.teacher, self.weight, self.temperature, self.accumulation, self.who = (
            teacher, weight, temperature, max(1, int(accumulation)), who)
        self.last: float | None = None
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        if not module.training or not torch.is_grad_enabled():
            return None
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(f"{self.who}: teacher= needs the model to return a loss (call it with labels): the "
                             "distillation term is added to that loss")
        inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch")}
        with torch.no_grad():
            t = self.teacher(*args, **inputs)
        logits = _logits(out)
        kd = distill_loss(logits, _logits(t), self.temperature, _positions(kwargs.get("attention_mask"), logits))
        if kwargs.get("num_items_in_batch") is not None:
            kd = kd / self.accumulation
        self.last = float(kd.detach())
        if isinstance(out, dict):  # an HF ModelOutput too (its item and attribute stay one): the Trainer reads
            out["loss"] = loss + self.weight * kd  # outputs["loss"]
        else:
            out.loss = loss + self.weight * kd
        return out

    def remove(self) -> None:
        self._handle.remove()

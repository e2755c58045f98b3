"""Distillation from the GELU model beside the LayerCollapse fine-tune: `distill_loss` (the plain loop) and
`LayerCollapseCallback(teacher=...)` (the Trainer), on a tiny GPT-2 and synthetic tokens."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lc_onnx import train

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

VOCAB = 48


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt2():
    """The GELU model (the teacher, left as it is) and a prepared copy of it (the student)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    student = copy.deepcopy(teacher)
    train.prepare(student, {"input_ids": torch.randint(0, VOCAB, (2, 8))})
    return teacher, student


def test_distill_loss_is_the_kl_from_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    kl = (p * (p.log() - q.log())).sum(-1)  # KL(teacher ‖ student) per position
    assert train.distill_loss(s, t) == pytest.approx(float(kl.mean()), rel=1e-5)
    assert float(train.distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    assert train.distill_loss(s, t, mask=mask) == pytest.approx(float(kl[0, :2].mean()), rel=1e-5)
    p2, q2 = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    kl2 = (p2 * (p2.log() - q2.log())).sum(-1).mean() * 4
    assert train.distill_loss(s, t, temperature=2.0) == pytest.approx(float(kl2), rel=1e-5)
    # the teacher is a constant: only the student's logits get a gradient, softmax(s) − softmax(t) per position
    s.requires_grad_(True)
    t.requires_grad_(True)
    train.distill_loss(s, t).backward()
    assert t.grad is None and torch.allclose(s.grad, (q - p) / 15, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        train.distill_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        train.distill_loss(s, t, temperature=0)


def loop(weight: float):
    """The plain loop as docs/training.md writes it: CE + λ·regularizer + weight·distill_loss against the GELU
    model; returns the KL from the teacher at each step, and the teacher."""
    teacher, model = tiny_gpt2()
    opt = torch.optim.AdamW(train.param_groups(model, lr=1e-3))
    g = torch.Generator().manual_seed(1)
    kls = []
    for _ in range(30):
        ids = torch.randint(0, VOCAB, (8, 12), generator=g)
        logits = model(input_ids=ids).logits
        with torch.no_grad():
            t = teacher(input_ids=ids).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        kd = train.distill_loss(logits, t)
        loss = ce + 1.0 * train.regularizer(model) + weight * kd
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(kd.item())
    return kls, teacher


def test_loop_recipe_with_a_teacher():
    with_kd, teacher = loop(10.0)
    without, _ = loop(0.0)
    assert with_kd[0] == pytest.approx(without[0])  # the same start and batches
    assert with_kd[-1] < 0.5 * without[-1]  # the term keeps the student near the teacher as CE moves it away
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_adds_the_term_to_the_models_loss():
    teacher, model = tiny_gpt2()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    model.train()
    plain = model(input_ids=ids, labels=ids)
    d = train.Distiller(model, teacher, weight=0.5)
    hooked = model(input_ids=ids, labels=ids)
    with torch.no_grad():
        kd = train.distill_loss(plain.logits, teacher(input_ids=ids).logits)
    assert hooked.loss.item() == pytest.approx((plain.loss + 0.5 * kd).item(), rel=1e-5)
    assert d.last == pytest.approx(float(kd), rel=1e-5) and hooked["loss"] is hooked.loss
    # the Trainer's normalization over an accumulated batch (num_items_in_batch): the term is split over the steps
    d.accumulation = 4
    n = int(ids[:, 1:].numel())
    acc = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(n))
    assert float(acc.loss) == pytest.approx(float(plain.loss + 0.5 * kd / 4), rel=1e-5)
    with torch.no_grad():  # evaluation: nothing added, the teacher not run
        assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(float(plain.loss), rel=1e-6)
    with pytest.raises(ValueError, match="needs the model to return a loss"):
        model(input_ids=ids)
    d.remove()
    assert float(model(input_ids=ids, labels=ids).loss) == pytest.approx(float(plain.loss), rel=1e-6)
    with pytest.raises(ValueError, match="another module"):
        train.Distiller(model, model)


def test_the_distiller_leaves_padding_out():
    """With an attention_mask per token, the KL is averaged over the tokens it keeps, not the padding."""
    teacher, model = tiny_gpt2()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    model.train()
    plain = model(input_ids=ids, attention_mask=mask, labels=ids)
    d = train.Distiller(model, teacher)
    model(input_ids=ids, attention_mask=mask, labels=ids)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits
    assert d.last == pytest.approx(float(train.distill_loss(plain.logits, t, mask=mask.bool())), rel=1e-5)
    assert d.last != pytest.approx(float(train.distill_loss(plain.logits, t)), rel=1e-3)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Losses(transformers.TrainerCallback):
    """The loss the model returns at each training forward, as a hook registered when training starts sees it:
    before the callback's Distiller hook (the model's own loss) or after it (what the Trainer gets)."""

    def __init__(self, cb=None):
        self.cb, self.losses, self.terms = cb, [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(m, a, out):
            if m.training:
                self.losses.append(float(out.loss))
                if self.cb is not None:
                    self.terms.append(self.cb._distiller.last)

        self.handle = model.register_forward_hook(hook)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


class LossesAfter(Losses):
    """The same, a class of its own (the Trainer keeps one callback of a class without a warning)."""


def test_callback_teacher_adds_the_kl_during_training_only(tmp_path):
    teacher, model = tiny_gpt2()
    cb = train.LayerCollapseCallback(lam=1.0, teacher=teacher, distill_weight=0.5, plot=False)
    before, after = Losses(), LossesAfter(cb)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=4,
                                          per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                          logging_steps=2, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[before, cb, after])
    trainer.train()
    assert len(before.losses) == len(after.losses) == 8  # 4 steps of 2 micro-batches, each through the hook
    added = [b - a for a, b in zip(before.losses, after.losses, strict=True)]
    assert all(t > 0 for t in after.terms)
    assert added == pytest.approx([0.5 * t for t in after.terms], abs=2e-6)  # the KL went into the Trainer's loss
    assert cb._distiller is None and cb.teacher is teacher  # the hook is off once training ended
    assert all(p.grad is None for p in teacher.parameters())
    ids = Tokens()[0]["input_ids"][None]
    model.train()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # no term after training: the model's own causal-LM loss
        ce = F.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert float(out.loss) == pytest.approx(float(ce), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        train.LayerCollapseCallback(lam=1.0, teacher=teacher, temperature=0.0)

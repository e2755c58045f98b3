"""LayerCollapse on a language model pretrained here on real English text (issue 20): the paper's text-generation row.

    python benchmarks/train_lm.py            # full run (~1 h on 2 cores): writes its section of RESULTS_train.md
    python benchmarks/train_lm.py --quick    # a smoke run (tiny models, few steps, < 1 min), writes nothing

Text: Debian's `fortunes` package (/usr/share/games/fortunes, BSD licence; `apt-get install fortunes`): 41 files,
~14,700 quotations and jokes, 2.4 MB of English (ascii-art files left out). Split by fortune (shuffled, seed 0): 5 %
held out. A byte-level BPE tokenizer (`tokenizers`, vocabulary 4096) trained on the training split here.

Models, pretrained here once (cached under benchmarks/.cache/train_lm/, ignored by git):
  - GPT-2: `GPT2LMHeadModel`, 4 layers, d 256, 4 heads, MLP 1024, gelu_new, context 128;
  - Llama: `LlamaForCausalLM` of the same size (4 layers, d 256, gated MLP 688 wide, tied embeddings), SiLU.
Per seed, from the same pretrained weights and the same batches, a fixed number of fine-tune steps of:
  - GPT-2 as it is (the GELU baseline);
  - GPT-2 after `train.prepare` (GELU -> PReLU(0.01)) with loss CE + λ·Σ(α−1)² (the README's plain loop:
    `train.param_groups`, slopes at their own lr), one run per λ; and at one λ with a distillation term
    KL(teacher || student) on the logits, the teacher being the pretrained GELU model;
  - Llama as it is, and Llama whose gate activation is β + (1−β)·silu(z) (β learnable, from 0: exactly SiLU) with
    λ·Σ(β−1)²; at β = 1 the block is down(up(x)), folded here into one Linear (W = down·up).
Then blocks are collapsed 1, 2, ... all (GPT-2: `train.sensitivity`'s order, least harmful first; `train.collapse`;
Llama: the same order, measured the same way, and the fold above): validation perplexity, parameters, and for one
seed ONNX Runtime latency of the exported model (batch 1, sequence 128, 1 thread, interleaved) against the GELU one.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lc_onnx import bench, train

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # train_finetune's replace_section, sections' cpu_model
from sections import cpu_model  # noqa: E402

CACHE = HERE / ".cache" / "train_lm"
TEXT = Path("/usr/share/games/fortunes")
MARKER = TEXT / "computers"  # a file of the `fortunes` package itself (`fortunes-min` has 3 of the 41 files)
SKIP_FILES = {"art", "ascii-art"}  # pictures made of characters, not text
START, END = "<!-- train_lm.py: start -->", "<!-- train_lm.py: end -->"
THRESHOLD = 0.05
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Sizes:
    vocab: int = 4096
    seq: int = 128
    d: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 1024          # GPT-2's MLP width
    gated: int = 688         # Llama's: 3·d·688 ≈ 2·d·1024, the same parameters per block
    batch: int = 16
    pre_steps: int = 1000    # pretraining, per model (~8 min each on 2 cores)
    pre_lr: float = 1e-3
    ft_steps: int = 200      # every fine-tune
    ft_lr: float = 3e-4
    slope_lr: float = 2e-2   # the slopes' (and β's) own AdamW group, as train.param_groups' default
    lambdas: tuple = (0.1, 1.0, 10.0)
    lam_main: float = 1.0    # the λ of the distillation, gated and latency runs
    kd: float = 1.0          # weight of the KL term
    seeds: int = 2
    val_blocks: int = 128    # held-out sequences of `seq` tokens scored
    runs: int = 200          # interleaved ONNX Runtime runs per model
    text_chars: int = 0      # 0: all the text; else the first N characters (the quick run)


QUICK = Sizes(vocab=512, seq=32, d=64, layers=2, heads=2, mlp=256, gated=176, batch=8, pre_steps=30, ft_steps=20,
              pre_lr=3e-3, ft_lr=1e-3, slope_lr=5e-2, lambdas=(1.0,), seeds=2, val_blocks=16, runs=3,
              text_chars=300_000)


# ---------------------------------------------------------------- text and tokens


def fortunes(limit: int = 0) -> list[str]:
    """Every fortune of the installed `fortunes` files (one string each), in a fixed order."""
    files = [p for p in sorted(TEXT.iterdir()) if p.is_file() and not p.is_symlink() and "." not in p.name
             and p.name not in SKIP_FILES] if MARKER.exists() else []
    if not files:
        raise SystemExit(f"train_lm: no text under {TEXT}; install it: apt-get install fortunes")
    out: list[str] = []
    for p in files:
        out += [f.strip() for f in p.read_text(encoding="latin-1").split("\n%\n") if f.strip()]
    if limit:
        random.Random(1).shuffle(out)
        kept, n = [], 0
        for f in out:
            kept.append(f)
            n += len(f)
            if n >= limit:
                break
        out = kept
    return out


@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor  # one stream of token ids, fortunes joined by EOS
    val: torch.Tensor    # (val_blocks, seq)


def data(s: Sizes) -> Data:
    from tokenizers import ByteLevelBPETokenizer

    texts = fortunes(s.text_chars)
    random.Random(0).shuffle(texts)
    n_val = max(1, len(texts) // 20)
    val_texts, train_texts = texts[:n_val], texts[n_val:]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_texts, vocab_size=s.vocab, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    eos = tok.token_to_id(EOS)

    def stream(ts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for e in tok.encode_batch(ts):
            ids += [*e.ids, eos]
        return torch.tensor(ids, dtype=torch.long)

    tr, va = stream(train_texts), stream(val_texts)
    blocks = len(va) // s.seq
    val = va[: blocks * s.seq].view(blocks, s.seq)[: s.val_blocks]
    return Data(tok, tr, val)


def batches(d: Data, s: Sizes, seed: int, steps: int):
    """`steps` batches of random windows of the training stream, the same for every arm with the same seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(d.train) - s.seq - 1, (s.batch,), generator=g)
        yield torch.stack([d.train[i: i + s.seq] for i in start.tolist()])


# ---------------------------------------------------------------- models


def gpt2(s: Sizes) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=s.vocab, n_positions=s.seq, n_embd=s.d, n_layer=s.layers, n_head=s.heads,
                     n_inner=s.mlp, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, loss_type="ForCausalLMLoss")
    return GPT2LMHeadModel(cfg)


def llama(s: Sizes) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.gated, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=s.seq,
                      hidden_act="silu", tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


BUILD = {"gpt2": gpt2, "llama": llama}


class BetaGate(nn.Module):
    """β + (1−β)·silu(z): SiLU at β = 0 (the start), the constant 1 at β = 1, where a Llama MLP is down(up(x))."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.beta + (1 - self.beta) * F.silu(z)


def gates(model: nn.Module) -> dict[str, BetaGate]:
    return {n.rsplit(".", 1)[0]: m for n, m in model.named_modules() if isinstance(m, BetaGate)}


def gate(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.mlp.act_fn = BetaGate()


def fold_gated(model: nn.Module, names: list[str]) -> None:
    """Each named Llama MLP (β taken as 1) replaced by one Linear: W = down·up, in float64."""
    for name in names:
        mlp = model.get_submodule(name)
        w = mlp.down_proj.weight.double() @ mlp.up_proj.weight.double()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w.to(lin.weight.dtype))
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lin)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- training and scoring


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor, batch: int = 32) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(val), batch):
        x = val[i: i + batch]
        total += float(lm_loss(model(input_ids=x).logits, x)) * x.shape[0]
        n += x.shape[0]
    model.train(was)
    return math.exp(total / n)


def regularizer(model: nn.Module) -> torch.Tensor:
    """λ-free: Σ(α−1)² over prepared slopes, or Σ(β−1)² over the gates."""
    g = gates(model)
    if g:
        return sum((m.beta - 1) ** 2 for m in g.values())
    return train.regularizer(model)


def fit(model: nn.Module, d: Data, s: Sizes, steps: int, seed: int, lr: float, lam: float | None = None,
        teacher: nn.Module | None = None, warmup: int = 0, log=print, tag: str = "") -> dict:
    """The plain loop: AdamW (slopes/β in their own group at `slope_lr`, no decay), CE (+ λ·regularizer) (+ kd·KL
    against `teacher`'s logits), gradient clipping on the model's weights, cosine decay after `warmup` steps when
    warming up (pretraining), a constant lr otherwise. Returns the last losses and the seconds taken."""
    torch.manual_seed(seed)
    special = [p for m in gates(model).values() for p in m.parameters()] or train.slope_parameters(model)
    ids = {id(p) for p in special}
    weights = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": weights, "lr": lr, "weight_decay": 0.01}]
    if special:
        groups.append({"params": special, "lr": s.slope_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    base = [g["lr"] for g in opt.param_groups]
    model.train()
    if teacher is not None:
        teacher.eval()
    start, last = time.time(), {}
    for step, x in enumerate(batches(d, s, seed, steps)):
        if warmup:
            f = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup)
                                                                                        / max(1, steps - warmup)))
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * f
        logits = model(input_ids=x).logits
        ce = lm_loss(logits, x)
        loss = ce
        if lam is not None:
            loss = loss + lam * regularizer(model)
        kl = None
        if teacher is not None:
            with torch.no_grad():
                t = teacher(input_ids=x).logits
            v = logits.shape[-1]
            kl = F.kl_div(F.log_softmax(logits.reshape(-1, v), -1), F.log_softmax(t.reshape(-1, v), -1),
                          log_target=True, reduction="batchmean")
            loss = loss + s.kd * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()
        last = {"ce": ce.item(), **({"kl": kl.item()} if kl is not None else {})}
        if log and (step + 1) % max(1, steps // 5) == 0:
            extra = f" kl {last['kl']:.3f}" if kl is not None else ""
            log(f"    {tag} step {step + 1}/{steps}: ce {last['ce']:.3f}{extra} ({time.time() - start:.0f}s)")
    model.eval()
    return {**last, "secs": time.time() - start}


def gate_betas(model: nn.Module) -> dict[str, float]:
    return {n: m.beta.item() for n, m in gates(model).items()}


def gated_sensitivity(model: nn.Module, val: torch.Tensor) -> tuple[list[str], float]:
    """`train.sensitivity` for the gates: perplexity with each gate's β set to 1 alone; least harmful first."""
    g = gates(model)
    alone = {}
    for name, m in g.items():
        kept = m.beta.detach().clone()
        with torch.no_grad():
            m.beta.fill_(1.0)
        alone[name] = perplexity(model, val)
        with torch.no_grad():
            m.beta.copy_(kept)
    return sorted(alone, key=alone.get), perplexity(model, val)


# ---------------------------------------------------------------- ONNX side


def export(model: nn.Module, path: Path, s: Sizes) -> None:
    ids = torch.zeros(2, s.seq, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        train.export(model, {"input_ids": ids}, path, dynamo=False)


def latency(models: list[nn.Module], s: Sizes, runs: int) -> list[float]:
    """Median ms of each model's ONNX export, batch 1, sequence `seq`, 1 thread, interleaved."""
    feeds = {"input_ids": np.random.default_rng(0).integers(0, s.vocab, (1, s.seq), dtype=np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, m in enumerate(models):
            paths.append(Path(tmp) / f"m{i}.onnx")
            export(m, paths[-1], s)
        lat = bench.interleaved(paths, feeds, runs=runs, warmup=10, threads=1)
    return [t.median_ms for t in lat]


# ---------------------------------------------------------------- the runs


def _key(s: Sizes, arch: str) -> str:
    files = sorted((p.name, p.stat().st_size) for p in TEXT.iterdir() if p.is_file()) if TEXT.is_dir() else []
    blob = json.dumps([arch, asdict(s)["vocab"], s.seq, s.d, s.layers, s.heads, s.mlp, s.gated, s.batch,
                       s.pre_steps, s.pre_lr, s.text_chars, files])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def pretrained(arch: str, d: Data, s: Sizes, cache: Path | None, log=print) -> tuple[nn.Module, float]:
    """The GELU/SiLU model pretrained for `pre_steps` (seed 0), from the cache when it holds this setting."""
    path = cache / f"{arch}-{_key(s, arch)}.pt" if cache else None
    torch.manual_seed(0)
    model = BUILD[arch](s)
    if path and path.exists():
        model.load_state_dict(torch.load(path))
        model.eval()
        log(f"  {arch}: pretrained weights from {path}")
        return model, json.loads(path.with_suffix(".json").read_text())["secs"]
    r = fit(model, d, s, s.pre_steps, 1000, s.pre_lr, warmup=min(50, s.pre_steps // 4), log=log, tag=f"{arch} pre")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parents[1] / ".gitignore").write_text("*\n")
        torch.save(model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps({"secs": r["secs"], "threads": torch.get_num_threads()}))
    return model, r["secs"]


def curve_gpt2(model: nn.Module, d: Data) -> dict:
    """Blocks collapsed 0, 1, ... all in `train.sensitivity`'s order (least harmful first): perplexity and
    parameters of the collapsed model itself; the models kept for timing."""
    sens = train.sensitivity(model, lambda m: perplexity(m, d.val), higher_is_better=False)
    ppl, nparams, models = [], [], []
    for k in range(len(sens.order) + 1):
        m = copy.deepcopy(model)
        if k:
            train.collapse(m, threshold=math.inf, only=sens.order[:k])
        ppl.append(perplexity(m, d.val))
        nparams.append(params(m))
        models.append(m)
    return {"order": sens.order, "ppl": ppl, "params": nparams, "linearized": sens.cumulative, "models": models}


def curve_gated(model: nn.Module, d: Data) -> dict:
    order, _ = gated_sensitivity(model, d.val)
    ppl, nparams, models = [], [], []
    for k in range(len(order) + 1):
        m = copy.deepcopy(model)
        fold_gated(m, order[:k])
        ppl.append(perplexity(m, d.val))
        nparams.append(params(m))
        models.append(m)
    return {"order": order, "ppl": ppl, "params": nparams, "models": models}


def curve_plain(model: nn.Module, d: Data) -> dict:
    """The GELU model's blocks made linear (activation -> identity) in `train.sensitivity`'s order: what collapsing
    them would cost without the LayerCollapse fine-tune."""
    ids = d.val[:2]
    sens = train.sensitivity(model, lambda m: perplexity(m, d.val), {"input_ids": ids}, higher_is_better=False)
    return {"order": sens.order, "ppl": [sens.baseline, *sens.cumulative]}


def jobs(s: Sizes, kd_also: tuple = ()) -> list[tuple[str, str, float | None, bool, int]]:
    """(arch, variant, λ, distill, seed), seed 0 of everything first, so a cut-off run still has a whole picture.
    `kd_also`: more λ of the sweep to fine-tune with the KL term too (after the rest: a rerun adds only them)."""
    out = []
    for i in range(s.seeds):
        out += [("gpt2", "GELU fine-tune", None, False, i)]
        out += [("gpt2", f"LC λ={lam:g}", lam, False, i) for lam in sorted(s.lambdas, key=lambda v: v != s.lam_main)]
        out += [("gpt2", f"LC λ={s.lam_main:g} + KD", s.lam_main, True, i)]
        out += [("llama", "SiLU fine-tune", None, False, i), ("llama", f"gated LC λ={s.lam_main:g}", s.lam_main,
                                                                    False, i)]
    extra = [lam for lam in kd_also if lam != s.lam_main and lam in s.lambdas]
    return out + [("gpt2", f"LC λ={lam:g} + KD", lam, True, i) for lam in extra for i in range(s.seeds)]


def run(s: Sizes, cache: Path | None = None, results: Path | None = None, log=print, kd_also: tuple = ()) -> dict:
    """Every job of `jobs(s)`; with `results`, each finished job is saved there and a rerun skips it."""
    t0 = time.time()
    d = data(s)
    log(f"text: {len(d.train):,} training tokens, {d.val.numel():,} held-out tokens scored; vocab {s.vocab}")
    saved = json.loads(results.read_text()) if results and results.exists() else {}
    key = json.dumps(asdict(s))
    out = saved if saved.get("sizes") == key else {"sizes": key, "rows": {}, "pre": {}}
    pre: dict[str, nn.Module] = {}
    for arch, variant, lam, distill, seed in jobs(s, kd_also):
        if arch not in pre:
            pre[arch], secs = pretrained(arch, d, s, cache, log)
            out["pre"].setdefault(arch, {"ppl": perplexity(pre[arch], d.val), "params": params(pre[arch]),
                                         "secs": secs})
            log(f"  {arch} pretrained: val ppl {out['pre'][arch]['ppl']:.2f}")
        name = f"{arch}|{variant}|{seed}"
        if name in out["rows"]:
            continue
        log(f"{arch} {variant}, seed {seed}")
        row = one(arch, variant, lam, distill, seed, pre[arch], d, s, log)
        out["rows"][name] = row
        if results:
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(out, indent=1))
    out["secs"] = out.get("secs", 0) + time.time() - t0
    if results:
        results.write_text(json.dumps(out, indent=1))
    return out


def one(arch: str, variant: str, lam: float | None, distill: bool, seed: int, pre: nn.Module, d: Data, s: Sizes,
        log=print) -> dict:
    model = copy.deepcopy(pre)
    row: dict = {"arch": arch, "variant": variant, "lam": lam, "distill": distill, "seed": seed}
    if lam is not None and arch == "gpt2":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a site prepare could not swap would be a bug here
            row["sites"] = len(train.prepare(model, {"input_ids": d.val[:2]}, init=0.01))
        row["ppl_swap"] = perplexity(model, d.val)
    elif lam is not None:
        gate(model)
        row["sites"] = len(gates(model))
        row["ppl_swap"] = perplexity(model, d.val)
    r = fit(model, d, s, s.ft_steps, 100 + seed, s.ft_lr, lam=lam, teacher=pre if distill else None, log=log,
            tag=variant)
    row.update(secs=r["secs"], ppl=perplexity(model, d.val))
    if lam is None:
        if arch == "gpt2":
            row["plain"] = curve_plain(model, d)
        row["params"] = params(model)
        log(f"  {variant}: ppl {row['ppl']:.2f} ({r['secs']:.0f}s)")
        if seed == 0:
            pre_ft[arch] = model  # the latency baseline of this arch
        return row
    row["slopes"] = train.slopes(model) if arch == "gpt2" else gate_betas(model)
    row["within"] = sum(abs(v - 1) <= THRESHOLD for v in row["slopes"].values())
    c = curve_gpt2(model, d) if arch == "gpt2" else curve_gated(model, d)
    models = c.pop("models")
    row["curve"] = c
    if seed == 0 and lam == s.lam_main and not distill and arch in pre_ft:
        ms = latency([pre_ft[arch], *models], s, s.runs)
        row["ms"] = {"baseline": ms[0], "curve": ms[1:]}
    sl = row["slopes"].values()
    log(f"  {variant}: ppl swap {row['ppl_swap']:.2f} -> ft {row['ppl']:.2f}, slopes {min(sl):.3f}..{max(sl):.3f}, "
        f"{row['within']}/{row['sites']} within {THRESHOLD}; collapsed 0..{len(c['ppl']) - 1}: "
        + " ".join(f"{p:.2f}" for p in c["ppl"]) + f" ({r['secs']:.0f}s)"
        + (f"; ORT ms GELU {row['ms']['baseline']:.2f} vs " + " ".join(f"{m:.2f}" for m in row["ms"]["curve"])
           if "ms" in row else ""))
    return row


pre_ft: dict[str, nn.Module] = {}  # seed 0's plain fine-tune of each arch, the latency baseline


# ---------------------------------------------------------------- report


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _rows(out: dict, arch: str, variant: str) -> list[dict]:
    return [r for r in out["rows"].values() if r["arch"] == arch and r["variant"] == variant]


def variants(out: dict, arch: str) -> list[str]:
    return list(dict.fromkeys(r["variant"] for r in out["rows"].values() if r["arch"] == arch))


def finetune_table(out: dict) -> list[str]:
    head = ("| model | variant | seeds | val ppl after swap | val ppl after fine-tune | slopes (β) min..max "
            "| blocks within 0.05 (per seed) | val ppl, every block collapsed | params → all collapsed |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for arch, label in (("gpt2", "GPT-2"), ("llama", "Llama (gated)")):
        if arch in out["pre"]:
            p = out["pre"][arch]
            lines.append(f"| {label} | pretrained ({'GELU' if arch == 'gpt2' else 'SiLU'}) | – | – | {p['ppl']:.2f} "
                         f"| – | – | – | {p['params']:,} |")
        for v in variants(out, arch):
            rs = _rows(out, arch, v)
            seeds = ", ".join(str(r["seed"]) for r in rs)
            if rs[0]["lam"] is None:
                last = ([_spread([r["plain"]["ppl"][-1] for r in rs])] if "plain" in rs[0] else ["–"])[0]
                lines.append(f"| {label} | {v} | {seeds} | – | {_spread([r['ppl'] for r in rs])} | – | – "
                             f"| {last} (activations → identity) | {rs[0]['params']:,} |")
                continue
            lo = min(min(r["slopes"].values()) for r in rs)
            hi = max(max(r["slopes"].values()) for r in rs)
            within = ", ".join(f"{r['within']}/{r['sites']}" for r in rs)
            c = rs[0]["curve"]
            lines.append(f"| {label} | {v} | {seeds} | {_spread([r['ppl_swap'] for r in rs])} "
                         f"| {_spread([r['ppl'] for r in rs])} | {lo:.3f}..{hi:.3f} | {within} "
                         f"| {_spread([r['curve']['ppl'][-1] for r in rs])} "
                         f"| {c['params'][0]:,} → {c['params'][-1]:,} |")
    return lines


def curve_table(out: dict, s: Sizes) -> list[str]:
    """Per number of blocks collapsed: every LC arm's perplexity (mean and range over seeds), params, latency."""
    arms = [("gpt2", v) for v in variants(out, "gpt2") if _rows(out, "gpt2", v)[0]["lam"] is not None]
    arms += [("llama", v) for v in variants(out, "llama") if _rows(out, "llama", v)[0]["lam"] is not None]
    gelu = _rows(out, "gpt2", "GELU fine-tune")
    cols = [f"GPT-2 {v}" for a, v in arms if a == "gpt2"] + [f"Llama {v}" for a, v in arms if a == "llama"]
    head = ("| blocks collapsed | GPT-2 GELU fine-tune, activations → identity | " + " | ".join(cols)
            + " | GPT-2 params | GPT-2 ORT speedup vs GELU | Llama params | Llama ORT speedup vs SiLU |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    n = max([len(r["curve"]["ppl"]) for a, v in arms for r in _rows(out, a, v)] or [0])
    main = {a: next((r for r in out["rows"].values() if r["arch"] == a and "ms" in r), None) for a in ("gpt2", "llama")}
    for k in range(n):
        cells = [_spread([r["plain"]["ppl"][k] for r in gelu]) if gelu and k < len(gelu[0]["plain"]["ppl"]) else "–"]
        for a, v in arms:
            cells.append(_spread([r["curve"]["ppl"][k] for r in _rows(out, a, v) if k < len(r["curve"]["ppl"])]))
        for a in ("gpt2", "llama"):
            rs = [r for r in out["rows"].values() if r["arch"] == a and "curve" in r]
            cells.append(f"{rs[0]['curve']['params'][k]:,}" if rs and k < len(rs[0]["curve"]["params"]) else "–")
            m = main[a]
            cells.append(f"{m['ms']['baseline'] / m['ms']['curve'][k]:.2f}x" if m and k < len(m["ms"]["curve"])
                         else "–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def paper_table(out: dict, s: Sizes) -> list[str]:
    """The paper's GPT-2 row beside ours: one block collapsed."""
    head = "| source | model | text | blocks collapsed | perplexity before → after | change |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|",
             "| paper (as quoted in issue 20) | GPT-2 (12 blocks) | – | 1 of 12 | – | +0.6 |"]
    gelu = _rows(out, "gpt2", "GELU fine-tune")
    for v in variants(out, "gpt2"):
        rs = _rows(out, "gpt2", v)
        if rs[0]["lam"] is None or not gelu:
            continue
        one_ = [r["curve"]["ppl"][1] for r in rs if len(r["curve"]["ppl"]) > 1]
        base = float(np.mean([r["ppl"] for r in gelu]))
        lines.append(f"| here, {v} | GPT-2 ({s.layers} blocks, d {s.d}) | fortunes | 1 of {s.layers} "
                     f"| {base:.2f} (GELU fine-tune) → {_spread(one_)} | {np.mean(one_) - base:+.2f} |")
    return lines


def _kd_pairs(out: dict) -> dict[float, tuple[dict, dict]]:
    """{λ: ({seed: LC row}, {seed: LC + KD row})} for every λ fine-tuned both ways."""
    pairs = {}
    for v in variants(out, "gpt2"):
        rs = _rows(out, "gpt2", v)
        if rs[0]["distill"]:
            plain = {r["seed"]: r for r in _rows(out, "gpt2", v.removesuffix(" + KD"))}
            kd = {r["seed"]: r for r in rs if r["seed"] in plain}
            if kd:
                pairs[rs[0]["lam"]] = ({i: plain[i] for i in kd}, kd)
    return pairs


def distill_table(out: dict, s: Sizes) -> list[str]:
    """LC with and without the KL term (each λ run both ways), seed by seed, per number of blocks collapsed."""
    pairs = _kd_pairs(out)
    if not pairs:
        return ["(the distillation runs did not finish)"]
    head = "| blocks collapsed | " + " | ".join(f"λ={lam:g}, seed {i}: LC → LC + KD" for lam, (ra, _) in pairs.items()
                                                for i in ra)
    head += " | " + " | ".join(f"λ={lam:g}: mean change" for lam in pairs) + " |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    n = len(next(iter(next(iter(pairs.values()))[0].values()))["curve"]["ppl"])
    for k in range(n):
        cells, means = [], []
        for ra, rb in pairs.values():
            d = [(ra[i]["curve"]["ppl"][k], rb[i]["curve"]["ppl"][k]) for i in ra]
            cells += [f"{x:.2f} → {y:.2f}" for x, y in d]
            means.append(f"{np.mean([y - x for x, y in d]):+.2f}")
        lines.append(f"| {k} | " + " | ".join(cells + means) + " |")
    within = [f"{ra[i]['within']} → {rb[i]['within']}" for ra, rb in pairs.values() for i in ra]
    return lines + [f"| blocks within {THRESHOLD} of 1 | " + " | ".join(within + ["–"] * len(pairs)) + " |"]


def distill_helps(out: dict, s: Sizes) -> bool | None:
    """True when KD's perplexity is lower at every number of blocks collapsed (≥ 1), in every seed, at every λ
    run both ways."""
    pairs = _kd_pairs(out)
    if not pairs:
        return None
    return all(rb[i]["curve"]["ppl"][k] < ra[i]["curve"]["ppl"][k] for ra, rb in pairs.values() for i in ra
               for k in range(1, len(ra[i]["curve"]["ppl"])))


def plot(out: dict, s: Sizes, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    gelu = _rows(out, "gpt2", "GELU fine-tune")
    if gelu:
        ys = np.array([r["plain"]["ppl"] for r in gelu])
        ax.plot(range(ys.shape[1]), ys.mean(0), "k--", marker="x", label="GPT-2 GELU fine-tune, activations → identity")
    for arch, style in (("gpt2", "-"), ("llama", ":")):
        for v in variants(out, arch):
            rs = _rows(out, arch, v)
            if rs[0]["lam"] is None:
                continue
            ys = np.array([r["curve"]["ppl"] for r in rs])
            xs = np.arange(ys.shape[1])
            ax.plot(xs, ys.mean(0), style, marker="o", label=f"{'GPT-2' if arch == 'gpt2' else 'Llama'} {v}")
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
    for arch, ls in (("gpt2", "-."), ("llama", ":")):
        plain = [r["ppl"] for r in out["rows"].values() if r["arch"] == arch and r["lam"] is None]
        if plain:
            ax.axhline(np.mean(plain), color="gray", ls=ls, lw=1,
                       label=f"{'GPT-2 GELU' if arch == 'gpt2' else 'Llama SiLU'} fine-tune, no collapse")
    ax.set_yscale("log")
    ax.set_xlabel("blocks collapsed (train.sensitivity's order, least harmful first)")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_xticks(range(s.layers + 1))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"fortunes, {s.layers}-block LMs, {s.ft_steps}-step fine-tunes (mean over seeds, band = min..max)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write(out: dict, s: Sizes, command: str, reading: list[str], here: Path | None = None) -> Path:
    here = here or HERE
    png = here / "train_lm.png"
    plot(out, s, png)
    import onnxruntime as ort
    import transformers

    lines = [
        START,
        "# A language model pretrained here on real text: LayerCollapse per block collapsed (issue 20)",
        "",
        f"Command: `{command}` ({out.get('secs', 0) / 60:.0f} min wall; the pretrained weights are cached under "
        "benchmarks/.cache/train_lm/, their pretraining took "
        + ", ".join(f"{a} {p['secs'] / 60:.0f} min" for a, p in out["pre"].items()) + ")  ",
        f"Machine: {cpu_model() or platform.processor()}, 2 cores, shared with another engineer's test runs "
        f"(loaded: the times are context, the latency ratios are interleaved), torch {torch.__version__} "
        f"(torch threads for training: {torch.get_num_threads()}), transformers {transformers.__version__}, "
        f"onnxruntime {ort.__version__}; {datetime.date.today().isoformat()}  ",
        "Text: Debian's `fortunes` (BSD licence, /usr/share/doc/fortunes/copyright; read from "
        "/usr/share/games/fortunes, nothing downloaded, nothing redistributed): 41 files, art files left out, "
        "split by fortune (seed 0), 5 % held "
        f"out; {s.val_blocks} held-out sequences of {s.seq} tokens scored. Tokenizer: byte-level BPE, vocabulary "
        f"{s.vocab}, trained on the training split.  ",
        f"Models: `GPT2LMHeadModel` ({s.layers} layers, d {s.d}, {s.heads} heads, MLP {s.mlp}, gelu_new, no dropout) "
        f"and `LlamaForCausalLM` ({s.layers} layers, d {s.d}, gated MLP {s.gated}, tied embeddings, SiLU), each "
        f"pretrained {s.pre_steps} steps of {s.batch}×{s.seq} tokens (AdamW lr {s.pre_lr:g}, warmup, cosine), "
        "seed 0.  ",
        f"Fine-tunes: {s.ft_steps} steps, AdamW lr {s.ft_lr:g} constant, the same batches per seed for every arm; "
        f"LayerCollapse: `train.prepare(model, {{\"input_ids\": ids}})` (GELU → PReLU(0.01)), loss CE + λ·Σ(α−1)², "
        f"slopes in their own group at lr {s.slope_lr:g} (the README's plain loop); + KD: plus {s.kd:g}·KL(teacher ‖ "
        "student) on the logits, teacher = the pretrained GELU model; gated: the gate's SiLU replaced by "
        "β + (1−β)·silu(z), β from 0, loss CE + λ·Σ(β−1)², β at the slopes' lr, folded as down·up.  ",
        "Collapse: no fine-tuning after it; blocks taken in `train.sensitivity`'s order (each block at slope 1 alone, "
        "least harmful first), then `train.collapse(only=..., threshold=inf)` (GPT-2) or the down·up fold (Llama); "
        "perplexity of the collapsed model itself. Latency: `train.export` (opset 17) of seed 0's collapsed models "
        f"and of the plain fine-tuned model, ONNX Runtime CPU, batch 1, sequence {s.seq}, 1 thread, median of "
        f"{s.runs} interleaved runs (`lc_onnx.bench.interleaved`).  ",
        "Perplexities: mean (min–max) over seeds.",
        "",
        "**Fine-tunes**",
        "",
        *finetune_table(out),
        "",
        "**Perplexity per block collapsed** (0 = the fine-tuned model as it is)",
        "",
        *curve_table(out, s),
        "",
        f"![perplexity vs blocks collapsed]({png.name})",
        "",
        "**Beside the paper's GPT-2 row**",
        "",
        *paper_table(out, s),
        "",
        f"**Distillation** (λ={s.lam_main:g}, same steps and batches, the KL term added)",
        "",
        *distill_table(out, s),
        "",
        *reading,
        END,
    ]
    path = here / "RESULTS_train.md"
    from train_finetune import replace_section

    replace_section(path, START, END, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps, nothing written or cached")
    ap.add_argument("--seeds", type=int, default=Sizes.seeds)
    ap.add_argument("--pre-steps", type=int, default=Sizes.pre_steps)
    ap.add_argument("--ft-steps", type=int, default=Sizes.ft_steps)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training (ORT timing: 1)")
    ap.add_argument("--reading", type=Path, help="a file of the reading to put under the tables (markdown)")
    ap.add_argument("--report-only", action="store_true", help="write the section from the saved results")
    ap.add_argument("--kd-also", type=float, action="append", default=[],
                    help="a λ of the sweep to fine-tune with the KL term too (after the rest; a rerun adds only it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.quick else args.threads)  # tiny ops: a second thread only waits
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.quick:
        out = run(QUICK, log=log)
        s = QUICK
    else:
        s = replace(Sizes(), seeds=args.seeds, pre_steps=args.pre_steps, ft_steps=args.ft_steps)
        results = CACHE / "results.json"
        if args.report_only:
            out = json.loads(results.read_text())
        else:
            out = run(s, CACHE, results, log, kd_also=tuple(args.kd_also))
    for table in (finetune_table(out), curve_table(out, s), paper_table(out, s), distill_table(out, s)):
        print("\n".join(table) + "\n")
    print(f"distillation better at every number of blocks collapsed, every seed: {distill_helps(out, s)}")
    if not args.quick:
        command = "python benchmarks/train_lm.py" + "".join(
            f" --{k} {v}" for k, v in (("seeds", args.seeds), ("pre-steps", args.pre_steps),
                                       ("ft-steps", args.ft_steps)) if v != getattr(Sizes, k.replace("-", "_")))
        command += f" --threads {args.threads}" if args.threads != 2 else ""
        command += "".join(f" --kd-also {lam:g}" for lam in args.kd_also)
        reading = args.reading.read_text().splitlines() if args.reading else []
        print(f"wrote {write(out, s, command, reading)}")
    return out


if __name__ == "__main__":
    main()

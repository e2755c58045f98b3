"""What an optimize run did: the chains it rewrote, the ones it left and why, totals and validation."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from lc_onnx.validate import Validation
from passes import Candidate, Rewrite
from passes.budget import REASON as BUDGET_REASON
from passes.chain import NOT_LINEAR


@dataclass
class Totals:
    nodes: int
    params: int
    bytes: int


@dataclass
class Report:
    tol: float
    allow_growth: bool = False  # chains reading shared weights folded even where the parameters grow
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)
    before: Totals | None = None
    after: Totals | None = None
    validation: Validation | None = None
    budget: str = ""  # where not every chain within tol could be folded within rtol: how many were left
    # each block the budget left: its nodes, the output it moved most, by how much (rel_l2, max_abs or the share
    # `mismatch`), against rtol/atol
    budget_left: list[dict] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.rewrites)

    def to_dict(self) -> dict:
        return {
            "tol": self.tol,
            "allow_growth": self.allow_growth,
            "modified": self.modified,
            "rewrites": [asdict(r) for r in self.rewrites],
            "skipped": [asdict(c) for c in self.skipped],
            "before": asdict(self.before) if self.before else None,
            "after": asdict(self.after) if self.after else None,
            "validation": self.validation.to_dict() if self.validation else None,
            "budget": self.budget,
            "budget_left": self.budget_left,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n"

    def table(self) -> str:
        lines = []
        if self.rewrites:
            rows = [("rule", "nodes", "slope", "d_in>h>d_out", "params", "MACs/row", "err <= c*|min(0,h)|")]
            for r in self.rewrites:
                rows.append((
                    r.rule,
                    _nodes(r.names, r.graph),
                    _slope(r.slope_range),
                    "{}>{}>{}".format(*r.shape) if r.shape else "-",
                    f"{_n(r.params_before)} -> {_n(r.params_after)}" if r.shape else "-",
                    f"{_n(r.macs_before)} -> {_n(r.macs_after)}" if r.shape else "-",
                    "exact" if r.error_coefficient == 0 else f"c={r.error_coefficient:.3g}",
                ))
            lines += _grid(rows)
            if any(r.error_coefficient > 0 for r in self.rewrites):
                lines.append("c: a slope other than 1 taken as 1 moves each row by at most c·|min(0, h)|, h the "
                             "activation's input (c = max|1 - α| · |W_B|, docs/rules.md)")
            notes = [(r, r.note) for r in self.rewrites if r.note]
            for r, note in notes:
                lines.append(f"  {r.rule} {_nodes(r.names, r.graph)}: {note}")
        else:
            lines.append("no chain rewritten")
        if self.skipped:
            lines.append("")
            lines.append(f"left as is ({len(self.skipped)}):")
            for c in self.skipped:
                lines.append(f"  {_nodes(c.names, c.graph)}: {c.reason}")
        if self.before and self.after:
            b, a = self.before, self.after
            lines.append("")
            lines.append(f"nodes {b.nodes} -> {a.nodes}, params {_n(b.params)} -> {_n(a.params)}, "
                         f"size {_bytes(b.bytes)} -> {_bytes(a.bytes)}")
        if self.validation:
            v = self.validation
            verdict = "passed" if v.passed else "FAILED"
            worst = max((o for o in v.outputs if o.mismatch is None), key=lambda o: o.rel_l2, default=None)
            detail = f"max |abs| {worst.max_abs:.3g}, rel L2 {worst.rel_l2:.3g} (output {worst.name})" if worst else ""
            counted = max((o for o in v.outputs if o.mismatch is not None), key=lambda o: o.mismatch, default=None)
            if counted:  # integer/bool outputs: the share of elements that differ, against --max-mismatch
                detail += (", " if detail else "") + (f"mismatch {counted.mismatch:.3g} (output {counted.name}), "
                                                      f"max-mismatch {v.max_mismatch:g}")
            lines.append(f"validation {verdict}: {detail}, rtol {v.rtol:.3g}, atol {v.atol:.3g}, "
                         f"{len(v.outputs)} output(s)")
        if self.budget:
            lines.append(f"budget: {self.budget}")
        return "\n".join(lines)


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _nodes(names: list[str], graph: str) -> str:
    shown = " > ".join(names) if len(names) <= 4 else f"{names[0]} > ... > {names[-1]} ({len(names)} nodes)"
    return f"[{graph}] {shown}" if graph else shown


def _slope(r: tuple[float, float] | None) -> str:
    if r is None:
        return "-"
    return f"{r[0]:.4g}" if r[0] == r[1] else f"{r[0]:.4g}..{r[1]:.4g}"


def _n(x: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return str(x)


def _bytes(x: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x} B"


_NOT_LINEAR = re.compile(re.escape(NOT_LINEAR).replace(re.escape("{}"), r"(\S+)"))
GELU_HINT = ("fine-tune with lc_onnx.train to make them collapsible; if you did, export the prepared model from "
             "memory with lc_onnx.train.export (transformers' save_pretrained/from_pretrained round trip, or "
             "optimum's export of the saved folder, gives the GELU model back; lc_onnx.train.from_pretrained loads "
             "it prepared)")


def why_unfolded(candidates: list[Candidate], tol: float, layers: int, activations: int,
                 stamp: dict | None = None) -> str:
    """Why no chain is folded, in one paragraph, from `inspect`'s candidates (or a report's `skipped`): blocks
    with non-linear activations, slopes outside `tol`, chains left for other reasons; with none of those, the
    model's `layers` (linear layers with constant weights), `activations` (activation nodes) and lc-onnx's
    `stamp` (its metadata, where lc-onnx wrote the model) tell a collapsed model from one that never had a block."""
    acts, slopes, budgeted, other = Counter(), [], [], []
    for c in candidates:
        if c.kind != "chain" or c.rule is not None:
            continue
        found = _NOT_LINEAR.search(c.reason or "")
        if found:
            acts[found.group(1)] += 1
        elif (c.reason or "").startswith(BUDGET_REASON):
            budgeted.append(c)
        elif c.slope_range is not None and max(abs(s - 1) for s in c.slope_range) > tol:
            slopes.append(c)
        else:
            other.append(c)
    parts = []
    if acts:
        n = sum(acts.values())
        ops = ", ".join(f"{k} {op}" for op, k in sorted(acts.items(), key=lambda a: (-a[1], a[0])))
        parts.append(f"{n} {'block has' if n == 1 else 'blocks have'} non-linear activations ({ops}), not PRelu "
                     f"near 1: {GELU_HINT}; a block left out of prepare on purpose (BERT's pooler) stays as it is")
    if slopes:
        shown = list(dict.fromkeys(_slope(c.slope_range) for c in slopes))
        nearest = min(max(abs(s - 1) for s in c.slope_range) for c in slopes)
        which = (f"slope {shown[0]}, {nearest:.3g} from 1" if len(slopes) == 1 else
                 f"slopes {', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}; the nearest {nearest:.3g} from 1")
        parts.append(f"{len(slopes)} {'chain has' if len(slopes) == 1 else 'chains have'} slopes outside --tol "
                     f"{tol:g} ({which}): train them nearer 1 with lc_onnx.train, or raise --tol together with --rtol "
                     f"(validation judges the error, and the default rtol is at most 1e-2)")
    if budgeted:
        parts.append(f"{len(budgeted)} {'chain is' if len(budgeted) == 1 else 'chains are'} left for the accuracy "
                     f"budget (folding {'it' if len(budgeted) == 1 else 'each'} moves an output past --rtol, measured "
                     f"above): train {'its slope' if len(budgeted) == 1 else 'their slopes'} nearer 1, or raise "
                     f"--rtol if that error is acceptable")
    if other:
        parts.append(f"{len(other)} {'chain is' if len(other) == 1 else 'chains are'} left for other reasons, "
                     f"listed above (first: {other[0].reason})")
    return "; ".join(parts or [_no_block(layers, activations, stamp)]) + "."


def _no_block(layers: int, activations: int, stamp: dict | None) -> str:
    if stamp is not None:
        made = stamp.get("rewrites")
        made = sum(made.values()) if isinstance(made, dict) else "some"
        return (f"the model looks collapsed already (lc-onnx optimize wrote it: {made} rewrite(s) at tol "
                f"{stamp.get('tol', '?')}): nothing left to fold")
    if layers >= 2 and not activations:
        return (f"the model looks collapsed already: its {layers} linear layers have no activation between them "
                f"(as lc_onnx.train.collapse leaves them): nothing left to fold")
    if not layers:
        return "no linear -> activation -> linear block in the graph (no Gemm, MatMul or Conv with constant weights)"
    return (f"no linear -> activation -> linear block in the graph ({layers} Gemm/MatMul/Conv node(s) with constant "
            f"weights, {activations} activation node(s))")

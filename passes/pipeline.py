"""Run the rules over a graph and its subgraphs until none fires, and list what was left and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.chain import Chain, Reject
from passes.linear import Names
from passes.registry import active_rules
from passes.rule import Rewrite, Rule

MAX_REWRITES = 100_000  # a guard: each rewrite removes nodes, so the loop ends long before this


@dataclass
class Candidate:
    """A chain seen by `inspect`: the rule that would fire on it, or why none does."""

    names: list[str]
    slope_range: tuple[float, float] | None
    rule: str | None
    reason: str | None
    shape: tuple[int, int, int] | None = None
    graph: str = ""


@dataclass
class PassResult:
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)


def _graphs(graph: gs.Graph) -> list[tuple[str, gs.Graph]]:
    return [("", graph)] + [(g.name or "subgraph", g) for g in graph.subgraphs(recursive=True)]



def _first_fire(node: gs.Node, rules: list[Rule], outputs: set[str], tol: float):
    """(rule, chain) of the first rule that fires at `node`, else (None, first Reject or None)."""
    reject = None
    for rule in rules:
        found = rule.match(node, outputs, tol)
        if isinstance(found, Chain):
            return rule, found
        if isinstance(found, Reject) and reject is None:
            reject = found
    return None, reject


def inspect(graph: gs.Graph, tol: float, skip: frozenset[str] = frozenset()) -> list[Candidate]:
    """Every candidate chain in the graph and its subgraphs, without changing anything."""
    rules = active_rules(skip, graph.opset)
    found = []
    for gname, g in _graphs(graph):
        outputs = {t.name for t in g.outputs}
        for node in g.nodes:
            rule, hit = _first_fire(node, rules, outputs, tol)
            if isinstance(hit, Chain):
                shape = (hit.first.d_in, hit.first.d_out, hit.second.d_out)
                found.append(Candidate(hit.names, hit.slope_range, rule.name, None, shape, gname))
            elif isinstance(hit, Reject):
                found.append(Candidate(hit.names, hit.slope_range, None, hit.reason, None, gname))
    return found


def run(graph: gs.Graph, tol: float, skip: frozenset[str] = frozenset()) -> PassResult:
    """Apply the rules to a fixed point; chains of three or more layers collapse one pair at a time."""
    rules = active_rules(skip, graph.opset)
    result = PassResult(modified=False)
    names = Names(graph)
    for gname, g in _graphs(graph):
        while len(result.rewrites) < MAX_REWRITES:
            outputs = {t.name for t in g.outputs}
            fired = None
            for node in g.nodes:
                rule, hit = _first_fire(node, rules, outputs, tol)
                if isinstance(hit, Chain):
                    fired = rule.rewrite(g, names, hit)
                    break
            if fired is None:
                break
            fired.graph = gname
            result.rewrites.append(fired)
            result.modified = True
            g.cleanup(remove_unused_graph_inputs=False).toposort()
    result.skipped = [c for c in inspect(graph, tol, skip) if c.rule is None]
    return result

"""Run the rules over a graph and its subgraphs until none fires, and list what was left and why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from passes.chain import Chain, Reject, find_chain, next_layer_node
from passes.cost import later_pair_first_is_cheaper
from passes.linear import Names
from passes.registry import active_node_rules, active_rules
from passes.rule import NodeRule, Rewrite, Rule

MAX_SWEEPS = 1_000  # a guard: each sweep that fires removes nodes, so the loop ends long before this


@dataclass
class Candidate:
    """A chain seen by `inspect`: the rule that would fire on it, or why none does."""

    names: list[str]
    slope_range: tuple[float, float] | None
    rule: str | None
    reason: str | None
    shape: tuple[int, int, int] | None = None
    graph: str = ""
    kind: str = "chain"  # or "node": a node rule's single node


@dataclass
class PassResult:
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)


def _graphs(graph: gs.Graph) -> list[tuple[str, gs.Graph]]:
    return [("", graph)] + [(g.name or "subgraph", g) for g in graph.subgraphs(recursive=True)]



def _decide(
    node: gs.Node, rules: list[Rule], outputs: set[str], tol: float
) -> tuple[Rule | None, Candidate | None, Chain | None]:
    """The chain ending at `node` (read once) and the first rule that fires on it, or why none does."""
    found = find_chain(node, outputs, tol)
    if found is None:
        return None, None, None
    if isinstance(found, Reject):
        return None, Candidate(found.names, found.slope_range, None, found.reason, found.shape), None
    shape = (found.first.d_in, found.first.d_out, found.second.d_out)
    reasons = []
    for rule in rules:
        reason = rule.check(found)
        if reason is None:
            return rule, Candidate(found.names, found.slope_range, rule.name, None, shape), found
        reasons.append(reason)
    reason = reasons[0] if reasons else "every rule that could fire is skipped"
    return None, Candidate(found.names, found.slope_range, None, reason, shape), None


def _fold_later(chain: Chain, rules: list[Rule], outputs: set[str], tol: float) -> bool:
    """Whether a weight-folding rule should wait: the chain after this one (sharing its second layer) also
    folds, and folding that one first is the cheaper product. The last chain of a run never waits, so
    every sweep over a run still rewrites."""
    nxt = next_layer_node(chain.second, outputs)
    if nxt is None:
        return False
    rule, _, later = _decide(nxt, rules, outputs, tol)
    if later is None or not rule.folds_weights or later.first.nodes[0] is not chain.second.nodes[0]:
        return False
    return later_pair_first_is_cheaper(chain.first.d_in, chain.first.d_out, later.first.d_out, later.second.d_out)


def _sweep(g: gs.Graph, gname: str, rules: list[Rule], tol: float, names: Names | None,
           on_rewrite: Callable[[], None] = lambda: None) -> tuple[list, list]:
    """One pass over the nodes in topological order, rewriting as it goes when `names` is given.

    A rewrite only kills nodes upstream of the node being visited, so the rest of the sweep stays valid;
    a run of layers folds front to back in one sweep (the fused layer is what the next chain sees), or
    back to front over several sweeps where that is the cheaper product."""
    outputs = {t.name for t in g.outputs}
    rewrites, candidates = [], []
    for node in list(g.nodes):
        rule, candidate, chain = _decide(node, rules, outputs, tol)
        if candidate is None:
            continue
        candidate.graph = gname
        candidates.append(candidate)
        if chain is not None and names is not None:
            if rule.folds_weights and _fold_later(chain, rules, outputs, tol):
                continue
            done = rule.rewrite(g, names, chain)
            done.graph = gname
            rewrites.append(done)
            on_rewrite()
    return rewrites, candidates


def _node_sweep(g: gs.Graph, gname: str, rules: list[NodeRule], names: Names | None,
                exclude: set[str] = frozenset(),
                on_rewrite: Callable[[], None] = lambda: None) -> tuple[list[Rewrite], list[Candidate]]:
    """The node rules on every node not named in `exclude`, rewriting when `names` is given."""
    rewrites, candidates = [], []
    for node in list(g.nodes):
        rule = next((r for r in rules if node.name not in exclude and r.applies(node)), None)
        if rule is None:
            continue
        candidates.append(Candidate([node.name], None, rule.name, None, None, gname, kind="node"))
        if names is not None:
            done = rule.rewrite(g, names, node)
            done.graph = gname
            rewrites.append(done)
            on_rewrite()
    return rewrites, candidates


def inspect(graph: gs.Graph, tol: float, skip: frozenset[str] = frozenset()) -> list[Candidate]:
    """Every candidate chain in the graph and its subgraphs, and every node a node rule would change
    once the chains are collapsed, without changing anything."""
    rules, node_rules = active_rules(skip, graph.opset), active_node_rules(skip, graph.opset)
    found = []
    for gname, g in _graphs(graph):
        chains = _sweep(g, gname, rules, tol, None)[1]
        collapsed = {n for c in chains if c.rule is not None for n in c.names}
        found += chains + _node_sweep(g, gname, node_rules, None, collapsed)[1]
    return found


def run(graph: gs.Graph, tol: float, skip: frozenset[str] = frozenset(),
        on_rewrite: Callable[[int], None] | None = None) -> PassResult:
    """Apply the rules, sweep after sweep, until one fires nothing; what that last sweep saw but left is
    reported as skipped. `on_rewrite(n)` is called with the number of rewrites so far, after each."""
    rules, node_rules = active_rules(skip, graph.opset), active_node_rules(skip, graph.opset)
    result = PassResult(modified=False)
    names = Names(graph)
    made = 0

    def count() -> None:
        nonlocal made
        made += 1
        if on_rewrite:
            on_rewrite(made)

    for gname, g in _graphs(graph):
        for _ in range(MAX_SWEEPS):
            rewrites, candidates = _sweep(g, gname, rules, tol, names, count)
            if not rewrites:
                result.skipped += [c for c in candidates if c.rule is None]
                break
            result.rewrites += rewrites
            result.modified = True
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        rewrites = _node_sweep(g, gname, node_rules, names, on_rewrite=count)[0]
        if rewrites:
            result.rewrites += rewrites
            result.modified = True
            g.cleanup(remove_unused_graph_inputs=False).toposort()
    return result

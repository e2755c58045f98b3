"""Run the rules over a graph and its subgraphs until none fires, and list what was left and why."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

import onnx_graphsurgeon as gs

from passes import budget, quantized, sharing
from passes.chain import Chain, Reject, find_chain, next_layer_node
from passes.cost import later_pair_first_is_cheaper
from passes.linear import LinearLayer, Names, read_linear_ending_at
from passes.match import is_op, one_run, producer
from passes.registry import active_block_rules, active_node_rules, active_rules
from passes.rule import BlockRule, Context, NodeRule, Rewrite, Rule


@dataclass
class Candidate:
    """A chain seen by `inspect`: the rule that would fire on it, or why none does. Made from its nodes, it keeps
    their names (shown and written to JSON) and their identities as `keys`: names may be '' or repeat (legal
    ONNX), so blocks are told apart by the nodes (while the graph lives)."""

    names: list[str] = field(init=False)
    nodes: InitVar[list[gs.Node]]
    slope_range: tuple[float, float] | None
    rule: str | None
    reason: str | None
    shape: tuple[int, int, int] | None = None
    graph: str = ""
    kind: str = "chain"  # or "node": a node rule's single node

    def __post_init__(self, nodes: list[gs.Node]) -> None:
        self.names = [n.name for n in nodes]
        self.keys = frozenset(id(n) for n in nodes)  # not a field: the report holds no node


@dataclass
class PassResult:
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)
    carried: dict[int, int] = field(default_factory=dict)  # a left activation's exact replacement -> it (ids)


class _Refused:
    """Chains a rule found unusable once their weights were read (NaN or inf, a fold that overflows), by their
    layers' first nodes, so that later looks in the run need not read those weights again."""

    def __init__(self):
        self.seen: dict[tuple[int, int], tuple[gs.Node, gs.Node, str]] = {}
        self.notes: dict[tuple[int, int], str] = {}  # why a chain that reads shared weights is collapsed

    @staticmethod
    def _key(chain: Chain) -> tuple[int, int]:
        return id(chain.first.nodes[0]), id(chain.second.nodes[0])

    def get(self, chain: Chain) -> str | None:
        found = self.seen.get(self._key(chain))
        return None if found is None else found[2]

    def add(self, chain: Chain, reason: str) -> None:
        self.seen[self._key(chain)] = (chain.first.nodes[0], chain.second.nodes[0], reason)


def _graphs(graph: gs.Graph) -> list[tuple[str, gs.Graph]]:
    return [("", graph)] + [(g.name or "subgraph", g) for g in graph.subgraphs(recursive=True)]


def _context(g: gs.Graph, tol: float, allow_growth: bool) -> Context:
    """What the matches in `g` look at: its outputs, and its nodes (a match stays inside the graph it is in)."""
    return Context({t.name for t in g.outputs}, tol, allow_growth, {id(n) for n in g.nodes})



def _decide(
    node: gs.Node, rules: list[Rule], ctx: Context, refused: _Refused
) -> tuple[Rule | None, Candidate | None, Chain | None]:
    """The chain ending at `node` and the first rule that would fire on it, or why none does. The weights are
    not read here (see `_admit`)."""
    found = find_chain(node, ctx.outputs, ctx.tol)
    if found is None:
        return None, None, None
    if isinstance(found, Reject):
        return None, Candidate(found.nodes, found.slope_range, None, found.reason, found.shape), None
    shape = (found.first.d_in, found.first.d_out, found.second.d_out)
    why = refused.get(found)
    if not ctx.inside(found.nodes + [reader for reader, _ in found.shape_readers]):
        why = "the chain spans a subgraph and the graph around it (no rule rewrites across that boundary)"
    if why:
        return None, Candidate(found.nodes, found.slope_range, None, why, shape), None
    reasons = []
    for rule in rules:
        reason = rule.check(found)
        if reason is None:
            return rule, Candidate(found.nodes, found.slope_range, rule.name, None, shape), found
        reasons.append(reason)
    reason = reasons[0] if reasons else ("no rule is active: each that could fire is skipped (--skip) or not "
                                         "written for the model's opset (the rules cover opsets 11-24)")
    return None, Candidate(found.nodes, found.slope_range, None, reason, shape), None


def _admit(rule: Rule, chain: Chain, refused: _Refused) -> str | None:
    """Read the chain's weights, which `rule` is about to use: why it may not, or None."""
    reason = chain.load() or (rule.verify(chain) if rule.verify else None)
    if reason:
        refused.add(chain, reason)
    return reason


def _fold_later(chain: Chain, rules: list[Rule], ctx: Context, refused: _Refused) -> bool:
    """Whether a weight-folding rule should wait: the chain after this one (sharing its second layer) also
    folds, and folding that one first is the cheaper product. The last chain of a run never waits, so
    every sweep over a run still rewrites."""
    nxt = next_layer_node(chain.second, ctx.outputs)
    if nxt is None:
        return False
    rule, _, later = _decide(nxt, rules, ctx, refused)
    if later is None or not rule.folds_weights or later.first.nodes[0] is not chain.second.nodes[0]:
        return False
    return later_pair_first_is_cheaper(chain.first.d_in, chain.first.d_out, later.first.d_out, later.second.d_out)


def _apply(rule: Rule | BlockRule, g: gs.Graph, names, match, gname: str, ctx: Context) -> Rewrite:
    """One rewrite in graph `g` (named `gname`): the nodes it appends join those the sweep may touch."""
    before = len(g.nodes)
    keys = frozenset(id(n) for n in match.nodes)
    done = rule.rewrite(g, names, match)
    done.keys = keys  # not a field: the report holds no node
    ctx.nodes.update(id(n) for n in g.nodes[before:])  # a rewrite appends its nodes
    done.graph = gname
    return done


def _sweep(g: gs.Graph, gname: str, rules: list[Rule], ctx: Context, names: Names | None, refused: _Refused,
           on_rewrite: Callable[[], None] = lambda: None) -> tuple[list, list]:
    """One pass over the nodes in topological order, rewriting as it goes when `names` is given.

    A run of layers folds front to back as the pass goes (the fused layer is what the next chain sees), or
    back to front where that is the cheaper product: each chain waits for the one after it, and the layers
    next to each new one are looked at again at once, so a whole run folds in one pass whatever its length."""
    ctx.nodes = {id(n) for n in g.nodes}
    rewrites, candidates = [], []
    todo = deque(g.nodes)
    while todo:
        node = todo.popleft()
        if not node.outputs:
            continue  # died in a rewrite of this pass
        rule, candidate, chain = _decide(node, rules, ctx, refused)
        if candidate is None:
            continue
        candidate.graph = gname
        candidates.append(candidate)
        if chain is None or (names is not None and rule.folds_weights and _fold_later(chain, rules, ctx, refused)):
            continue
        reason = _admit(rule, chain, refused)
        if reason:
            candidate.rule, candidate.reason = None, reason
            continue
        if names is None:
            continue
        done = _apply(rule, g, names, chain, gname, ctx)
        done.note = done.note or refused.notes.get(refused._key(chain), "")
        rewrites.append(done)
        on_rewrite()
        _detach_dead(chain.nodes + [reader for reader, _ in chain.shape_readers], ctx)
        todo.extendleft(reversed(_around(chain.second.y, ctx.outputs)))
    return rewrites, candidates


def _detach_dead(nodes: list[gs.Node], ctx: Context) -> None:
    """Unhook the nodes a rewrite left unread, and the nodes that fed only them, as cleanup would: the rest of
    the pass then sees no dead reader of a tensor it looks at. Only the swept graph's: an outer graph's node
    (a Transpose of a weight a subgraph reads) is not cleaned up with this graph, and its outputs are not known here."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if (not (node.inputs or node.outputs) or not ctx.inside([node])
                or any(t.outputs or t.name in ctx.outputs for t in node.outputs)):
            continue
        feeders = [producer(t) for t in node.inputs]
        _unhook(node)
        node.outputs.clear()
        todo += [p for p in feeders if p is not None]


def _unhook(node: gs.Node) -> None:
    """`node.inputs.clear()` without gs's `list.remove`, which compares `node` with each reader before it by a deep
    `__eq__`: a tensor read by thousands of nodes (the input every folded exit of a cascade reads) made each
    unhook cost that many. The reader is found by identity from both ends (a rewrite appends its nodes)."""
    for t in node.inputs:
        readers, n = t.outputs, len(t.outputs)
        i = next(j for k in range(n) for j in (k, n - 1 - k) if readers[j] is node)
        list.__delitem__(readers, i)
    list.clear(node.inputs)


def _around(y: gs.Tensor, outputs: set[str]) -> list[gs.Node]:
    """The nodes whose chains a rewrite ending at `y` may have changed: the chain ending at the layer that
    now computes `y`, and the chain that layer starts."""
    layer = read_linear_ending_at(y, outputs)
    if not isinstance(layer, LinearLayer):
        return []
    nxt = next_layer_node(layer, outputs)
    return [layer.nodes[0]] + ([nxt] if nxt is not None else [])


def _shared_chains(g: gs.Graph, rules: list[Rule], ctx: Context, refused: _Refused) -> list[tuple[Chain, list]]:
    """The chains of `g` a folding rule would take whose weights are also read elsewhere, each with its weights'
    roots."""
    chains = []
    for node in list(g.nodes):
        rule, _, chain = _decide(node, rules, ctx, refused)
        if chain is None or not rule.folds_weights:
            continue
        inside = {id(n) for n in chain.nodes}
        roots = [sharing.weight_root(chain.first), sharing.weight_root(chain.second)]
        users = [sharing.readers(r, ctx.outputs) for r in roots]
        if any(u is None or any(id(n) not in inside and not is_op(n, *sharing.VIEWS) for n in u) for u in users):
            chains.append((chain, roots))
    return chains


def _plan_shared(g: gs.Graph, rules: list[Rule], ctx: Context, refused: _Refused,
                 others: list[gs.Graph] = ()) -> None:
    """Chains a folding rule would take whose weights are also read elsewhere (ALBERT runs one MLP in every
    layer): fusing each writes a weight of its own, and a shared weight dies only when all its readers are
    folded. Grouped by the weights they share, a group whose folds would grow the parameters is refused (unless
    `ctx.allow_growth`), all of it; either way each chain gets a note saying what was chosen and why. A weight
    read in `others` too (both If branches of optimum's merged decoders read the main graph's weights) groups
    the chains there that read it: they are readers like any other, and each graph folds its own."""
    chains = _shared_chains(g, rules, ctx, refused)
    seen, new = {id(g)}, chains
    while new:
        outside = {id(n) for _, roots in new for r in roots for n in sharing.readers(r, ctx.outputs) or []
                   if not ctx.inside([n])}
        near = [o for o in others if id(o) not in seen and any(id(n) in outside for n in o.nodes)]
        seen.update(id(o) for o in near)
        new = [c for o in near for c in _shared_chains(o, rules, _context(o, ctx.tol, ctx.allow_growth), refused)]
        chains += new
    group_of: dict[int, int] = {}  # weight root -> group
    groups: dict[int, list[Chain]] = {}
    for i, (chain, roots) in enumerate(chains):
        merged = sorted({group_of[id(r)] for r in roots if id(r) in group_of} | {i})
        members = [c for j in merged for c in groups.pop(j, [])] + [chain]
        groups[merged[0]] = members
        for c in members:
            for r in (sharing.weight_root(c.first), sharing.weight_root(c.second)):
                group_of[id(r)] = merged[0]
    for members in groups.values():
        layers = [layer for c in members for layer in (c.first, c.second)]
        freed, kept = sharing.freed(layers, [n for c in members for n in c.nodes], ctx.outputs)
        after = sum(c.cost.params_after for c in members)
        d = {f"{c.first.d_in}x{c.second.d_out}" for c in members}
        what = (f"{len(members)} chain(s) read shared weights: folding each writes its own {'/'.join(sorted(d))} "
                f"weight, params {freed} -> {after}"
                + (f" ({kept} weight(s) also read elsewhere stay)" if kept else ""))
        if after <= freed:
            note = what + ": no growth, collapsed"
        elif ctx.allow_growth:
            note = what + f" (+{after - freed}), allowed by --allow-growth"
        else:
            for c in members:
                refused.add(c, what + f" (+{after - freed}); left to keep the model from growing "
                                      "(--allow-growth collapses anyway)")
            continue
        for c in members:
            refused.notes[refused._key(c)] = note


def _block_sweep(g: gs.Graph, gname: str, rules: list[BlockRule], ctx: Context, names: Names | None,
                 on_rewrite: Callable[[], None] = lambda: None) -> tuple[list[Rewrite], list[Candidate]]:
    """The block rules (their own matches: fan-out, partial slopes) at every node, rewriting when `names` is
    given. Each match is read from the graph as it now is, so a rewrite earlier in the pass is seen."""
    rewrites, candidates = [], []
    ctx.nodes = {id(n) for n in g.nodes}
    todo = deque(g.nodes)
    while todo:
        node = todo.popleft()
        if not node.outputs:
            continue  # died in a rewrite of this pass
        found, left = None, []
        for rule in rules:
            m = rule.match(node, ctx)
            if isinstance(m, Reject):
                left.append(Candidate(m.nodes, m.slope_range, None, f"{rule.name}: {m.reason}", m.shape, gname))
            elif m is not None:
                found = rule, m
                break
        if found is None:
            candidates += left
            continue
        rule, m = found
        candidate = Candidate(m.nodes, m.slope_range, rule.name, None, m.shape, gname)
        candidates.append(candidate)
        reason = m.load()
        if reason:
            candidate.rule, candidate.reason = None, f"{rule.name}: {reason}"
            continue
        if names is None:
            continue
        before = len(g.nodes)
        rewrites.append(_apply(rule, g, names, m, gname, ctx))
        on_rewrite()
        _detach_dead(m.nodes, ctx)
        # a fused layer may start a block at once (an early-exit cascade: each level's fold makes the next level's
        # first layer): looked at now, so a cascade folds in one pass, not one level (or half of them) per pass
        todo.extendleft(reversed(g.nodes[before:]))
    return rewrites, candidates


def _merge(candidates: list[Candidate]) -> list[Candidate]:
    """One entry per block: a chain left by the chain rules but taken whole by a block rule is not listed as
    left, and two reasons for the same nodes are joined. Blocks are the nodes themselves, not their names."""
    taken = [c.keys for c in candidates if c.rule is not None]
    out, by = [], {}
    for c in candidates:
        if c.rule is None and any(c.keys <= keys for keys in taken):
            continue
        prev = by.get(c.keys)
        if prev is None:
            by[c.keys] = c
            out.append(c)
        elif prev.rule is None and c.rule is None and c.reason not in prev.reason:
            prev.reason += "; " + c.reason
    return out


def _node_sweep(g: gs.Graph, gname: str, rules: list[NodeRule], names: Names | None, tol: float,
                exclude: frozenset[int] = frozenset(),
                on_rewrite: Callable[[], None] = lambda: None) -> tuple[list[Rewrite], list[Candidate]]:
    """The node rules on every node not in `exclude` (ids of nodes), rewriting when `names` is given."""
    rewrites, candidates = [], []
    for node in list(g.nodes):
        rule = next((r for r in rules if id(node) not in exclude and r.applies(node, tol)), None)
        if rule is None:
            continue
        candidates.append(Candidate([node], None, rule.name, None, None, gname, kind="node"))
        if names is not None:
            done = rule.rewrite(g, names, node)
            done.graph, done.keys = gname, frozenset({id(node)})
            rewrites.append(done)
            on_rewrite()
    return rewrites, candidates


def _defaults(graph: gs.Graph) -> list[gs.Constant]:
    """Initializers also listed as graph inputs. From IR 4 on they are defaults a caller may override, so no
    rule may take them as constants; before IR 4 every initializer had to be listed, and they are constants."""
    if graph.ir_version is not None and graph.ir_version < 4:
        return []
    return [t for _, g in _graphs(graph) for t in g.inputs if isinstance(t, gs.Constant)]


def _bound(graph: gs.Graph, variables: frozenset[str]) -> list[gs.Constant]:
    """The main graph's initializers named in `variables` (a training_info trains them in place), also where only
    subgraphs read them (both If branches of optimum's merged decoders)."""
    found = {id(t): t for _, g in _graphs(graph) for t in g.tensors().values()
             if isinstance(t, gs.Constant) and t.name in variables}
    return list(found.values())


def _list_initializers_as_inputs(graph: gs.Graph) -> None:
    """IR < 4 requires every initializer of the main graph among its inputs: the fused weights too."""
    if graph.ir_version is None or graph.ir_version >= 4:
        return
    graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    graph.inputs += [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]


def inspect(graph: gs.Graph, tol: float, skip: frozenset[str] = frozenset(),
            allow_growth: bool = False, variables: frozenset[str] = frozenset()) -> list[Candidate]:
    """Every candidate chain in the graph and its subgraphs, and every node a node rule would change
    once the chains are collapsed, without changing `graph`. As `run` does, the chains are looked for again
    after the node rules, on a copy of the graph: a removed activation may join layers into a chain (two unit
    PRelus in a row), and inspect lists what optimize will fold."""
    rules, node_rules = active_rules(skip, graph.opset), active_node_rules(skip, graph.opset)
    block_rules = active_block_rules(skip, graph.opset)
    trial = graph.copy()  # nodes and tensors copied, the weights shared: the node rules change only the copy
    names = Names(trial)
    found = []
    every = [g for _, g in _graphs(trial)]
    with one_run(_defaults(trial), _bound(trial, variables)):
        for gname, g in _graphs(trial):
            chains, nodes = _look(g, gname, rules, block_rules, tol, allow_growth, every), []
            for _ in range(len(g.nodes) + 1):
                folding = frozenset().union(*(c.keys for c in chains if c.rule is not None))
                rewrites, changed = _node_sweep(g, gname, node_rules, names, tol, folding)
                nodes += changed
                if not rewrites:
                    break
                g.cleanup(remove_unused_graph_inputs=False).toposort()
                again = _look(g, gname, rules, block_rules, tol, allow_growth, every)
                if not any(c.rule is not None and not c.keys <= folding for c in again):
                    break  # as in `run`: the node rules opened no chain, what the earlier look left stands
                chains = again
            found += chains + nodes
    return found


def _look(g: gs.Graph, gname: str, rules: list[Rule], block_rules: list[BlockRule], tol: float,
          allow_growth: bool, others: list[gs.Graph] = ()) -> list[Candidate]:
    """The chains and blocks of `g` and the rule that would fire on each, or why none does; nothing changed.
    `others`: the model's other graphs, whose chains may share weights with `g`'s (see `_plan_shared`)."""
    ctx, refused = _context(g, tol, allow_growth), _Refused()
    _plan_shared(g, rules, ctx, refused, others)
    chains = _sweep(g, gname, rules, ctx, None, refused)[1]
    return _merge(chains + _block_sweep(g, gname, block_rules, ctx, None)[1] + _quantized(g, gname))


def _quantized(g: gs.Graph, gname: str) -> list[Candidate]:
    """The quantized blocks of `g` (no rule folds quantized weights), each with the reason and what to do."""
    return [Candidate(nodes, slopes, None, quantized.REASON, shape, gname)
            for nodes, slopes, shape in quantized.blocks(g)]


def run(graph: gs.Graph, tol: float, skip: frozenset[str] = frozenset(),
        on_rewrite: Callable[[int], None] | None = None, allow_growth: bool = False,
        leave: frozenset[int] = frozenset(), variables: frozenset[str] = frozenset()) -> PassResult:
    """Apply the rules, pass after pass, until one fires nothing; what that last pass saw but left is
    reported as skipped. `on_rewrite(n)` is called with the number of rewrites so far, after each.
    `allow_growth`: fold chains that read shared weights even where the model's parameters grow. `leave`: ids of
    activations no rule may take as the identity whatever their slopes (the caller's accuracy budget). Each
    rewrite's `keys` are the ids of the nodes it replaced (while the graph lives). `variables`: names of
    initializers something outside the graph writes or reads (a training_info's bindings): never constants."""
    rules, node_rules = active_rules(skip, graph.opset), active_node_rules(skip, graph.opset)
    block_rules = active_block_rules(skip, graph.opset)
    result = PassResult(modified=False)
    names = Names(graph)
    made = 0

    def count() -> None:
        nonlocal made
        made += 1
        if on_rewrite:
            on_rewrite(made)

    def fixed_point(g: gs.Graph, gname: str, refused: _Refused) -> tuple[bool, list[Candidate]]:
        """The chain and block rules until none fires: whether any did, and what the last pass left."""
        ctx = _context(g, tol, allow_growth)
        _plan_shared(g, rules, ctx, refused, every)  # again after the node rules: chains they opened may share
        fired = False
        for _ in range(len(g.nodes) + 1):  # a pass that fires removes nodes, so the fixed point comes first
            rewrites, candidates = _sweep(g, gname, rules, ctx, names, refused, count)
            if not rewrites and block_rules:  # chains first; then blocks (fan-out, partial slopes)
                rewrites, more = _block_sweep(g, gname, block_rules, ctx, names, count)
                candidates += more
            if not rewrites:
                return fired, [c for c in _merge(candidates + _quantized(g, gname)) if c.rule is None]
            fired = True
            result.rewrites += rewrites
            result.modified = True
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        return fired, []

    every = [g for _, g in _graphs(graph)]  # a weight read in several graphs groups their chains
    with one_run(_defaults(graph), _bound(graph, variables)), budget.leaving(leave):
        for gname, g in _graphs(graph):
            skipped: list[Candidate] = []
            refused = _Refused()  # kept across the looks: a weight found unusable is not read again
            for again in range(len(g.nodes) + 1):
                fired, left = fixed_point(g, gname, refused)
                if again and not fired:
                    break  # the node rules opened no chain: what the earlier look left stands
                skipped = left
                rewrites = _node_sweep(g, gname, node_rules, names, tol, on_rewrite=count)[0]
                if not rewrites:
                    break
                result.rewrites += rewrites
                result.modified = True
                g.cleanup(remove_unused_graph_inputs=False).toposort()
                # a removed activation may join layers into a chain (two unit PRelus in a row: the walk takes
                # one), so the chain rules look again; else a second run of optimize would fold it
            result.skipped += skipped
        result.carried = budget.carried()
    if any(r.graph for r in result.rewrites):  # a subgraph's rewrite may leave a node of a graph around it unread
        graph.cleanup(remove_unused_graph_inputs=False)
    if result.modified:
        _list_initializers_as_inputs(graph)
    return result

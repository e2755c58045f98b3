"""What every rule shares: the record of a rewrite and the shape of a rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx_graphsurgeon as gs

from passes.chain import Chain
from passes.linear import Names


@dataclass
class Rewrite:
    """One change a rule made, with what the report needs to show it."""

    rule: str
    names: list[str]  # the nodes the rule replaced
    slope_range: tuple[float, float] | None
    shape: tuple[int, int, int] | None  # d_in, hidden, d_out; None for a rule on one node
    params_before: int
    params_after: int
    macs_before: int  # per input row
    macs_after: int
    error_coefficient: float  # ‖error per row‖ ≤ this · ‖min(0, h)‖
    graph: str = ""  # name of the subgraph, "" for the main graph
    note: str = ""  # why the rule chose this where that is not plain (shared weights, --allow-growth)
    # `keys` (set by the run, not a field: the report holds no node): ids of the nodes replaced, while the graph lives


@dataclass(frozen=True)
class Rule:
    """Every rule shares one match (`find_chain`); `check` says why this rule may not fire on a chain
    (None: it fires), from the chain's shapes; `verify`, where given, says the same once the weights are read;
    `rewrite` changes the graph and says what it did."""

    name: str
    summary: str
    check: Callable[[Chain], str | None]
    rewrite: Callable[[gs.Graph, Names, Chain], Rewrite]
    min_opset: int = 11  # Gemm's bias is optional from opset 11 on
    max_opset: int = 24
    folds_weights: bool = False  # rewrite multiplies the weights, so the order of a longer run matters
    verify: Callable[[Chain], str | None] | None = None


@dataclass
class Context:
    """What every match may look at besides the graph: the graph's output names, the slope tolerance, and
    whether a rewrite may grow the model's parameters (`--allow-growth`)."""

    outputs: set[str] = field(default_factory=set)
    tol: float = 1e-3
    allow_growth: bool = False
    nodes: set[int] | None = None  # ids of the nodes of the graph being swept: a match stays inside it

    def inside(self, nodes: list[gs.Node]) -> bool:
        """Whether every node is the swept graph's (not a subgraph's reading an outer tensor, nor the outer's)."""
        return self.nodes is None or all(id(n) in self.nodes for n in nodes)


class Block(Protocol):
    """What a block rule's match gives: the nodes it spans (for the report and to unhook the dead ones), its
    slope range and shape, and `load` (read the weights, compute what the rewrite needs; why not, or None)."""

    names: list[str]
    nodes: list[gs.Node]
    slope_range: tuple[float, float] | None
    shape: tuple[int, int, int] | None

    def load(self) -> str | None: ...


@dataclass(frozen=True)
class BlockRule:
    """A rule with its own match, found at one node: `match(node, ctx)` gives the block it would rewrite, a
    `Reject` (a candidate it leaves, and why) or None (no candidate there). Tried when no chain rule fires
    (so plain chains collapse first), in the same loop to a fixed point."""

    name: str
    summary: str
    match: Callable[[gs.Node, Context], Any]  # Block | Reject | None
    rewrite: Callable[[gs.Graph, Names, Any], Rewrite]
    min_opset: int = 11
    max_opset: int = 24


@dataclass(frozen=True)
class NodeRule:
    """A rule on one node, tried after the chain rules are done (so a chain is collapsed, not changed
    piecemeal): `applies(node, tol)` says whether it fires, `rewrite` changes the graph and says what it did."""

    name: str
    summary: str
    applies: Callable[[gs.Node, float], bool]
    rewrite: Callable[[gs.Graph, Names, gs.Node], Rewrite]
    min_opset: int = 7  # PRelu broadcasts its slope from opset 7 on
    max_opset: int = 24

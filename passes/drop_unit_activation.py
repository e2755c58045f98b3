"""Rule: in a bottleneck chain (where one fused layer would cost more), drop the unit-slope activation only."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.chain import Chain
from passes.linear import Names
from passes.match import redirect_readers
from passes.rule import Rewrite, Rule

NAME = "drop_unit_activation"


def check(chain: Chain) -> str | None:
    if chain.activation is None:
        return "no activation to drop"
    if chain.cost.collapse_is_cheaper:
        return "collapsing is cheaper"  # collapse_linear_chain's job
    return None


def rewrite(graph: gs.Graph, names: Names, chain: Chain) -> Rewrite:
    act = chain.activation
    redirect_readers(act.outputs[0], act.inputs[0])  # the next chain node, and a Shape of it if any
    cost = chain.cost
    a, b = chain.first, chain.second
    return Rewrite(
        NAME,
        [act.name],
        chain.slope_range,
        (a.d_in, a.d_out, b.d_out),
        cost.params_before,
        cost.params_before,
        cost.macs_before,
        cost.macs_before,
        chain.error_coefficient,
    )


RULE = Rule(NAME, "remove a unit-slope activation between two layers that are cheaper kept apart", check, rewrite)

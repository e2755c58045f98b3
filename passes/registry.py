"""The rules by name, in the order they are tried; the names are what `--skip` takes."""

from __future__ import annotations

from passes import (
    collapse_fan_out,
    collapse_linear_chain,
    drop_unit_activation,
    eliminate_unit_activation,
    prelu_to_leaky_relu,
    split_linear_units,
)
from passes.rule import BlockRule, NodeRule, Rule

RULES: list[Rule] = [collapse_linear_chain.RULE, drop_unit_activation.RULE]
BLOCK_RULES: list[BlockRule] = [collapse_fan_out.RULE, split_linear_units.RULE]  # when no chain rule fires
# after the chain and block rules are done; a unit slope goes before any PRelu becomes LeakyRelu(alpha≈1)
NODE_RULES: list[NodeRule] = [eliminate_unit_activation.RULE, prelu_to_leaky_relu.RULE]
ALL_RULES: list = RULES + BLOCK_RULES + NODE_RULES


def rule_names() -> list[str]:
    return [r.name for r in ALL_RULES]


def _active(rules: list, skip: frozenset[str] | set[str], opset: int | None) -> list:
    unknown = set(skip) - set(rule_names())
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(sorted(unknown))}; known: {', '.join(rule_names())}")
    return [r for r in rules if r.name not in skip and (opset is None or r.min_opset <= opset <= r.max_opset)]


def active_rules(skip: frozenset[str] | set[str] = frozenset(), opset: int | None = None) -> list[Rule]:
    """The chain rules not skipped and valid at the default-domain `opset`; an unknown name is an error."""
    return _active(RULES, skip, opset)


def active_block_rules(skip: frozenset[str] | set[str] = frozenset(), opset: int | None = None) -> list[BlockRule]:
    return _active(BLOCK_RULES, skip, opset)


def active_node_rules(skip: frozenset[str] | set[str] = frozenset(), opset: int | None = None) -> list[NodeRule]:
    return _active(NODE_RULES, skip, opset)

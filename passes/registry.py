"""The rules by name, in the order they are tried; the names are what `--skip` takes."""

from __future__ import annotations

from passes import collapse_linear_chain, drop_unit_activation, prelu_to_leaky_relu
from passes.rule import NodeRule, Rule

RULES: list[Rule] = [collapse_linear_chain.RULE, drop_unit_activation.RULE]
NODE_RULES: list[NodeRule] = [prelu_to_leaky_relu.RULE]  # after the chain rules are done


def rule_names() -> list[str]:
    return [r.name for r in RULES + NODE_RULES]


def _active(rules: list, skip: frozenset[str] | set[str], opset: int | None) -> list:
    unknown = set(skip) - set(rule_names())
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(sorted(unknown))}; known: {', '.join(rule_names())}")
    return [r for r in rules if r.name not in skip and (opset is None or r.min_opset <= opset <= r.max_opset)]


def active_rules(skip: frozenset[str] | set[str] = frozenset(), opset: int | None = None) -> list[Rule]:
    """The chain rules not skipped and valid at the default-domain `opset`; an unknown name is an error."""
    return _active(RULES, skip, opset)


def active_node_rules(skip: frozenset[str] | set[str] = frozenset(), opset: int | None = None) -> list[NodeRule]:
    return _active(NODE_RULES, skip, opset)

"""The rules by name, in the order they are tried; the names are what `--skip` takes."""

from __future__ import annotations

from passes import collapse_linear_chain, drop_unit_activation
from passes.rule import Rule

RULES: list[Rule] = [collapse_linear_chain.RULE, drop_unit_activation.RULE]


def rule_names() -> list[str]:
    return [r.name for r in RULES]


def active_rules(skip: frozenset[str] | set[str] = frozenset(), opset: int | None = None) -> list[Rule]:
    """The rules not skipped and valid at the default-domain `opset`; an unknown name is an error."""
    unknown = set(skip) - set(rule_names())
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(sorted(unknown))}; known: {', '.join(rule_names())}")
    return [
        r
        for r in RULES
        if r.name not in skip and (opset is None or r.min_opset <= opset <= r.max_opset)
    ]

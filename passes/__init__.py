"""The engine: graph rewrites on onnx-graphsurgeon graphs. Knows nothing of files, CLIs or torch."""

from passes.pipeline import Candidate, PassResult, inspect, run
from passes.registry import ALL_RULES, BLOCK_RULES, NODE_RULES, RULES, rule_names
from passes.rule import Rewrite

__all__ = ["ALL_RULES", "BLOCK_RULES", "Candidate", "NODE_RULES", "PassResult", "Rewrite", "RULES", "inspect",
           "rule_names", "run"]

"""What a collapse would give, before any fine-tune: every `linear → activation → linear` block whose only
obstacle is its activation (Gelu, Relu, Swish, … in any exported form, or a PRelu/LeakyRelu slope outside the
tolerance) gets the activation taken out, so the second layer reads what the activation read — the block as a
fine-tune to slope 1 would leave it — and the chain rule then folds it. The graph computes something else:
`lc-onnx estimate` times it and never writes it as an optimized model."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from passes.chain import Reject, find_chain
from passes.match import is_op


def linearize(graph: gs.Graph, only: set[int] | None = None, tol: float = 0.0) -> list[Reject]:
    """Take the activation out of each such block in `graph` (the blocks numbered in graph order; with `only`,
    of those numbers alone; a slope within `tol` of 1 is no obstacle: such a chain folds as it is); returns every
    block found, in that order. Readers of the activation outside the block keep it."""
    outputs = {t.name for t in graph.outputs}
    found: list[Reject] = []
    for node in list(graph.toposort().nodes):
        block = find_chain(node, outputs, tol)
        if not isinstance(block, Reject) or block.linearize is None:
            continue
        if only is None or len(found) in only:
            reader, activation_out, first_out = block.linearize
            # a Shape node reads only the shape, which an elementwise activation keeps (GPT-2's Conv1D export
            # reshapes by the activation's shape): it reads the activation's input too, so the activation dies
            shape_readers = [n for n in activation_out.outputs if is_op(n, "Shape")]
            for n in [reader, *shape_readers]:
                n.inputs = [first_out if t is activation_out else t for t in n.inputs]
        found.append(block)
    graph.cleanup()
    return found

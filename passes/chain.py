"""Match `linear → (Identity|Dropout|Reshape)* → [PRelu|LeakyRelu] → (…)* → linear` ending at a node."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from passes.cost import ChainCost, chain_cost
from passes.linear import LinearLayer, read_linear_ending_at, read_linear_starting_at
from passes.match import const_value, is_inference_dropout, is_op, only_feeds, producer, rank_of

MAX_WALK = 16  # nodes between two layers; real exports have at most a handful


@dataclass
class Chain:
    """Two linear layers joined by nodes that are (nearly) the identity."""

    first: LinearLayer
    second: LinearLayer
    between: list[gs.Node]  # in graph order, activation included
    activation: gs.Node | None
    slopes: np.ndarray | None  # float64 slope values of the activation

    @property
    def names(self) -> list[str]:
        return self.first.names + [n.name for n in self.between] + self.second.names

    @property
    def slope_range(self) -> tuple[float, float] | None:
        return None if self.slopes is None else (float(self.slopes.min()), float(self.slopes.max()))

    @property
    def cost(self) -> ChainCost:
        has_bias = self.first.bias is not None or self.second.bias is not None
        params = self.first.params + self.second.params
        return chain_cost(self.first.d_in, self.first.d_out, self.second.d_out, params, has_bias)

    @property
    def error_coefficient(self) -> float:
        """c with ‖error per row‖ ≤ c·‖min(0, h)‖, from `W_B·(α−1)·min(0, h)` (Frobenius ≥ spectral norm)."""
        if self.slopes is None:
            return 0.0
        return float(np.abs(1.0 - self.slopes).max() * np.linalg.norm(self.second.weight))


@dataclass
class Reject:
    """A candidate chain that may not be collapsed, and why."""

    names: list[str]
    reason: str
    slope_range: tuple[float, float] | None = None


def _slopes(act: gs.Node) -> tuple[np.ndarray, int] | str:
    """The slope values (flat, float64) and the rank of the slope tensor."""
    if is_op(act, "LeakyRelu"):
        return np.array([float(act.attrs.get("alpha", 0.01))]), 0
    value = const_value(act.inputs[1])
    if value is None:
        return f"slope of {act.name} is not a constant"
    flat = value.astype(np.float64).reshape(-1) if value.size else np.array([np.nan])
    return flat, value.ndim


def find_chain(node: gs.Node, graph_outputs: set[str], tol: float) -> Chain | Reject | None:
    """The chain whose second layer starts at `node`; None when `node` starts no candidate chain."""
    if not is_op(node, "Gemm", "MatMul"):
        return None
    between: list[gs.Node] = []
    activation = None
    tensor = node.inputs[0]
    for _ in range(MAX_WALK):
        p = producer(tensor)
        if p is None:
            return None
        if is_op(p, "Identity", "Reshape") or is_inference_dropout(p, graph_outputs):
            pass
        elif is_op(p, "PRelu", "LeakyRelu") and activation is None:
            activation = p
        else:
            break
        between.insert(0, p)
        tensor = p.inputs[0]
    else:
        return None

    first = read_linear_ending_at(tensor, graph_outputs)
    if first is None or (isinstance(first, str) and activation is None):
        return None
    if isinstance(first, str):
        return Reject([n.name for n in between] + [node.name], first)
    second = read_linear_starting_at(node, graph_outputs)
    if isinstance(second, str):
        return Reject(first.names + [n.name for n in between] + [node.name], second)
    names = first.names + [n.name for n in between] + second.names

    slopes, slope_rank = None, 0
    if activation is not None:
        found = _slopes(activation)
        if isinstance(found, str):
            return Reject(names, found)
        slopes, slope_rank = found
        srange = (float(np.nanmin(slopes)), float(np.nanmax(slopes))) if np.isfinite(slopes).any() else None
        if not np.isfinite(slopes).all():
            return Reject(names, f"slope of {activation.name} holds NaN or inf", srange)
        off = float(np.abs(slopes - 1.0).max())
        if off > tol:
            lo, hi = srange
            shown = f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"
            return Reject(names, f"slope {shown} is {off:.3g} from 1, outside tolerance {tol:g}", srange)

    reason = _structure_problem(first, between, activation, slope_rank, second, graph_outputs)
    if reason:
        return Reject(names, reason, None if slopes is None else (float(slopes.min()), float(slopes.max())))
    return Chain(first, second, between, activation, slopes)


def _structure_problem(
    first: LinearLayer,
    between: list[gs.Node],
    activation: gs.Node | None,
    slope_rank: int,
    second: LinearLayer,
    graph_outputs: set[str],
) -> str | None:
    """Why the chain's nodes may not be removed, or None when nothing outside the chain needs them."""
    if first.d_out != second.d_in:
        return f"shapes do not chain: {first.d_in}x{first.d_out} then {second.d_in}x{second.d_out}"
    if first.dtype != second.dtype:
        return f"dtypes differ: {first.dtype} then {second.dtype}"
    if any(is_op(n, "Reshape") for n in between) and not (first.x_rank == 2 and second.x_rank == 2):
        return "a Reshape between the layers, and the layers' inputs are not both known to be 2-D"
    if activation is not None and is_op(activation, "PRelu"):
        x_rank = rank_of(activation.inputs[0]) or (
            first.x_rank if not any(is_op(n, "Reshape") for n in between) else None
        )
        if slope_rank > 1 and (x_rank is None or slope_rank > x_rank):
            return f"cannot prove that the slope of {activation.name} keeps the tensor's rank"

    chain_nodes = first.nodes + between + second.nodes
    inner = first.internal + [first.y] + [n.outputs[0] for n in between] + second.internal
    for tensor in inner:
        if tensor.name in graph_outputs:
            return f"{tensor.name} is a graph output"
        users = [c for c in tensor.outputs if not any(c is n for n in chain_nodes)]
        for user in users:
            # GPT-2: a Shape of the activation computes the Reshape target; it dies with the chain
            if not (is_op(user, "Shape") and all(only_feeds(o, chain_nodes, graph_outputs) for o in user.outputs)):
                return f"{tensor.name} also feeds {user.name} ({user.op})"
        if len(tensor.outputs) - len(users) != 1:
            return f"{tensor.name} feeds the chain more than once"
    return None

"""Parameters and multiply-accumulates per row of a two-layer chain, before and after collapse."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChainCost:
    macs_before: int  # per input row: h·(d_in + d_out)
    macs_after: int  # per input row: d_in·d_out
    params_before: int
    params_after: int

    @property
    def collapse_is_cheaper(self) -> bool:
        """Collapse never makes a layer costlier: a bottleneck (d_in·d_out > h·(d_in+d_out)) is kept."""
        return self.macs_after <= self.macs_before


def chain_cost(d_in: int, hidden: int, d_out: int, params_before: int, has_bias: bool) -> ChainCost:
    return ChainCost(
        macs_before=hidden * (d_in + d_out),
        macs_after=d_in * d_out,
        params_before=params_before,
        params_after=d_in * d_out + (d_out if has_bias else 0),
    )


def later_pair_first_is_cheaper(p0: int, p1: int, p2: int, p3: int) -> bool:
    """Three layers p0 > p1 > p2 > p3 fold into one: is (W1·W2)·W3 or W1·(W2·W3) the cheaper product?
    A shrinking head (VGG's 25088 > 4096 > 4096 > 1000) costs 4x less folded from the back."""
    return p1 * p2 * p3 + p0 * p1 * p3 < p0 * p1 * p2 + p0 * p2 * p3


@dataclass(frozen=True)
class Cost:
    """MACs per input row and parameters of a block before and after a rewrite. `params_freed` counts only the
    weights that die (a weight shared with nodes outside the block stays), so `grows` is about the file."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    params_freed: int

    @property
    def grows(self) -> bool:
        return self.params_after > self.params_freed

    def growth(self) -> str:
        """The parameter change, as the report says it: '+X params (+p%)'."""
        delta = self.params_after - self.params_freed
        pct = 100.0 * delta / self.params_before if self.params_before else 0.0
        return f"{delta:+d} params ({pct:+.0f}% of the block's)"


def fan_out_cost(d_in: int, hidden: int, d_outs: list[int], params_before: int, params_after: int,
                 params_freed: int) -> Cost:
    """One layer d_in→h feeding k layers h→d_i, against k fused layers d_in→d_i."""
    return Cost(hidden * (d_in + sum(d_outs)), d_in * sum(d_outs), params_before, params_after, params_freed)


def split_cost(d_in: int, hidden: int, d_out: int, nonlinear: int, params_before: int, params_freed: int, *,
               bias_in: bool, bias_out: bool) -> Cost:
    """A block d_in→h→d_out whose h−n linear units fold into one d_in×d_out map beside a d_in→n→d_out MLP
    of the other n: d_in·d_out + n·(d_in+d_out) MACs, and the new slopes and biases: the direct map's where
    either layer (`bias_in`, `bias_out`) has one, the narrow layer's where the first has one."""
    after = d_in * d_out + nonlinear * (d_in + d_out)
    params_after = after + nonlinear + (d_out if bias_in or bias_out else 0) + (nonlinear if bias_in else 0)
    return Cost(hidden * (d_in + d_out), after, params_before, params_after, params_freed)

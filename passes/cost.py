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

"""Pictures of `bench` (latency distributions) and `inspect` (slopes against --tol, MACs before and after).
matplotlib is optional (`pip install "lc-onnx[plot]"`) and imported here only, when a plot is drawn; no pyplot: a
`Figure` of its own draws and saves, so no backend or global state of the caller's is touched."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lc_onnx import io
from lc_onnx.errors import InputError

FORMATS = (".png", ".svg", ".pdf")
OK, LEFT = "tab:green", "tab:gray"  # a block a rule rewrites; one left as it is


def check(path: Path, reads: set[Path] = frozenset(), writes: tuple[Path, ...] = ()) -> None:
    """InputError, before any work, for a plot that cannot be had: matplotlib missing (one line saying how to
    install it), a format it is not asked for here, a path that cannot be written, or one a command reads
    (`reads`) or writes besides (`writes`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(f'--plot {path}: needs matplotlib, which is not installed (pip install "lc-onnx[plot]")') \
            from None
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"--plot {path}: name a {', '.join(FORMATS)} file")
    io.check_target(path, "--plot")
    io.refuse_overlap(reads, [path])
    for w in writes:
        if w is not None and io.same_file(path, w):
            raise InputError(f"--plot {path}: is also the --json file")


def _figure(width: float, height: float, rows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _short(path: str, paths: list[str]) -> str:
    """A model's file name, or its whole path where two models share the name."""
    name = Path(path).name
    return name if sum(Path(p).name == name for p in paths) == 1 else path


def bench_plot(result, path: Path) -> None:
    """Each model's latency samples as a box (whiskers at p10 and p90, as bench's table gives them; every run
    beyond them a dot) beside a violin of the same samples, the speedups against the first in the title."""
    paths = [m["path"] for m in result.models]
    labels = [_short(p, paths) for p in paths]
    samples = [m.get("samples_ms") or [m["median_ms"]] for m in result.models]
    fig, (ax,) = _figure(max(5.0, 1.6 * len(paths) + 2), 4.5)
    places = list(range(1, len(paths) + 1))
    ax.violinplot(samples, places, showextrema=False, widths=0.8)
    ax.boxplot(samples, positions=places, whis=(10, 90), widths=0.3, flierprops={"markersize": 2})
    ax.set_xticks(places, labels, rotation=15 if len(paths) > 3 else 0)
    ax.set_ylabel("latency per run (ms)")
    first = result.models[0]["median_ms"]
    speed = ", ".join(f"{label} {first / m['median_ms']:.2f}x" for label, m in zip(labels[1:], result.models[1:],
                                                                                      strict=True))
    shapes = ", ".join(f"{k} {v}" for k, v in result.inputs.items())
    ax.set_title((f"speedup vs {labels[0]}: {speed}" if speed else f"{labels[0]}: median {first:.3f} ms")
                 + f"\n{result.provider}, {result.threads or 'default'} thread(s), {result.runs} runs; {shapes}",
                 fontsize=9)
    fig.savefig(path, dpi=120)


def inspect_plot(candidates: list, macs: list[tuple[int, int] | None], tol: float, path: Path) -> None:
    """Two panels over the chains `inspect` lists (labelled `chain i` as it prints them): each one's slope (its
    range, for per-unit slopes) against the band 1 ± tol, and its MACs per input row before and after its rule
    (`macs`, one pair per chain; None where the chain's shape is not known). Green: a rule rewrites it."""
    chains = [c for c in candidates if c.kind == "chain"]
    fig, (top, bottom) = _figure(max(6.0, 0.45 * len(chains) + 2), 6.5, rows=2)
    top.axhspan(1 - tol, 1 + tol, color=OK, alpha=0.2, label=f"1 ± tol ({tol:g})")
    top.axhline(1.0, color=OK, linewidth=0.8)
    places = list(range(len(chains)))
    for i, c in enumerate(chains):
        colour = OK if c.rule else LEFT
        if c.slope_range is not None:
            lo, hi = c.slope_range
            top.vlines(i, lo, hi, color=colour, linewidth=3)
            top.plot([i], [(lo + hi) / 2], "o", color=colour, markersize=4)
        else:  # no unit-slope activation to read (a GELU, a Tanh): inspect prints "slope -"
            top.text(i, 1.0, "no slope", ha="center", va="bottom", fontsize=7, color="dimgray", rotation=90)
    top.set_ylabel("slope")
    top.set_title(f"{sum(c.rule is not None for c in chains)} of {len(chains)} chain(s) rewritten at tol {tol:g} "
                  f"(green: a rule fires; grey: left)", fontsize=9)
    top.legend(loc="best", fontsize=8)
    before = [m[0] if m else 0 for m in macs]
    after = [m[1] if m else 0 for m in macs]
    bottom.bar([p - 0.2 for p in places], before, width=0.4, color=LEFT, label="before")
    bottom.bar([p + 0.2 for p in places], after, width=0.4, color=[OK if c.rule else LEFT for c in chains],
               hatch="//", label="after")
    bottom.set_ylabel("MACs per input row")
    bottom.legend(loc="best", fontsize=8)
    labels = [f"chain {i}" for i in places]
    for ax in (top, bottom):
        ax.set_xticks(places, labels, rotation=90 if len(chains) > 8 else 0, fontsize=8)
        ax.set_xlim(-0.7, max(len(chains), 1) - 0.3)
    if not chains:
        top.text(0.5, 0.5, "no candidate chain", transform=top.transAxes, ha="center")
    fig.savefig(path, dpi=120)


def sensitivity_plot(baseline: float, cumulative: list[float], path) -> None:
    """`train.sensitivity`'s curve: the metric against the number of blocks linearized, least harmful first."""
    fig, (ax,) = _figure(6.0, 3.5)
    ax.plot(range(len(cumulative) + 1), [baseline, *cumulative], marker="o")
    ax.set_xlabel("blocks linearized (least harmful first)")
    ax.set_ylabel("metric")
    ax.set_title("LayerCollapse sensitivity")
    fig.savefig(path)


def available() -> bool:
    """Whether matplotlib can be imported: the training callbacks draw their slope plot only then."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require(who: str) -> None:
    """A one-line ImportError for a callback built with plot=True where matplotlib is missing."""
    if not available():
        raise ImportError(f'{who}(plot=True): needs matplotlib, which is not installed (pip install "lc-onnx[plot]", '
                          f"or plot=False)")


def slope_history_plot(history: list, threshold: float, path: Path, collapsed: list[str] = ()) -> None:
    """The training callbacks' slope trajectories: one line a block over the logged optimizer steps (`history`:
    (step, {block: slope}) pairs, as `SlopeStepper.record` keeps them), against the band 1 ± threshold. A
    legend names the blocks when there are at most 12; blocks `collapsed` at the end are solid, others dashed."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(name for _, slopes in history for name in slopes))
    colours = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 2]  # not the band's green
    fig, (ax,) = _figure(7.0, 4.5)
    band = ax.axhline(1.0, color=OK, linewidth=0.8, label="slope 1")
    if threshold < float("inf"):  # an infinite threshold (collapse every block) has no band to draw
        band = ax.axhspan(1 - threshold, 1 + threshold, color=OK, alpha=0.2, label=f"1 ± {threshold:g}")
    for i, name in enumerate(names):
        points = [(step, slopes[name]) for step, slopes in history if name in slopes]
        ax.plot([s for s, _ in points], [v for _, v in points], linestyle="-" if name in collapsed else "--",
                color=colours[i % len(colours)], marker="o" if len(points) < 30 else None, markersize=3,
                linewidth=1.2, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("slope (farthest from 1 when per-channel)")
    last = history[-1][1] if history else {}
    within = sum(abs(v - 1) <= threshold for v in last.values())
    ax.set_title(f"{within} of {len(last)} block(s) within {threshold:g} of slope 1 at step "
                 f"{history[-1][0] if history else 0}" + (f"; {len(collapsed)} collapsed" if collapsed else ""),
                 fontsize=9)
    ax.legend(handles=None if len(names) <= 12 else [band], loc="best", fontsize=7)
    fig.savefig(path, dpi=120)


def save_slope_plot(history: list, threshold: float, path: str, collapsed: list[str], who: str) -> None:
    """`slope_history_plot` at the end of training, where matplotlib is installed and something was logged; a
    plot that cannot be written is a warning from `who`, never a lost training run."""
    if not history or not available():
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        slope_history_plot(history, threshold, Path(path), collapsed)
    except Exception as e:  # the model is trained (and collapsed): a picture that fails must not lose that
        warnings.warn(f"{who}: could not draw {path}: {e}", stacklevel=3)

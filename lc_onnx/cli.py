"""The `lc-onnx` command: parse, call the API, print, exit with 0 (ok), 1 (validation failed) or 2 (bad input)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import click

from lc_onnx import api, io, plots
from lc_onnx import bench as bench_mod
from lc_onnx.errors import InputError, LcOnnxError, one_line
from lc_onnx.validate import load_inputs, parse_shapes, taken_offset
from passes import ALL_RULES, NODE_RULES, rule_names

NODE_RULE_NAMES = frozenset(r.name for r in NODE_RULES)  # rules on one node: they fold no chain
TOL_HELP = f"Largest |slope - 1| that still counts as the identity (default {api.DEFAULT_TOL:g})."


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup (temp files) runs; a KeyboardInterrupt, so that
    no `except Exception` on the way swallows it."""


def _terminate(signum, frame):
    raise _Terminated


def _handle_errors(fn):
    """A user-facing error is one line on stderr and an exit code; --debug shows the traceback. Ctrl-C exits
    130 and SIGTERM 143, both after the temp files are gone; numpy's RuntimeWarnings are not printed."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            before = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: signals cannot be caught here
            before = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            if debug:
                traceback.print_exc()
            terminated = isinstance(e, _Terminated)
            click.echo(f"error: {'terminated' if terminated else 'interrupted'}", err=True)
            sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        except LcOnnxError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:  # a bug of ours: still one line unless asked for more
            if debug:
                traceback.print_exc()
            click.echo(f"internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
                       err=True)
            sys.exit(3)
        finally:
            if before is not None:
                signal.signal(signal.SIGTERM, before)

    wrapper = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)
    return wrapper


class _Progress:
    """Stage lines with elapsed time on stderr, and a bar for a stage that counts its steps (only on a
    terminal): `progress(stage)` starts a stage, `progress(stage, done, total)` moves its bar."""

    WIDTH = 30

    def __init__(self, enabled: bool):
        self.enabled, self.start, self.open = enabled, time.perf_counter(), False

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        when = self._when()
        if done is None:
            self._close()
            click.echo(f"{when} {stage}...", err=True)
            return
        if total:
            filled = self.WIDTH * min(done, total) // total
            text = f"{when} {stage} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total}"
        else:
            text = f"{when} {stage}: {done}"
        click.echo("\r" + text, err=True, nl=False)
        self.open = True

    def _when(self) -> str:
        return f"[{time.perf_counter() - self.start:6.1f}s]"

    def _close(self) -> None:
        if self.open:
            click.echo(err=True)
            self.open = False

    def done(self) -> None:
        if self.enabled:
            self._close()
            click.echo(f"{self._when()} done", err=True)


def _printable(text: str) -> str:
    """`text` with the bytes of a path that are not UTF-8 (held as surrogates) shown as `\\xff`: stdout would
    refuse them, after the work is done."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _skip_option(fn):
    return click.option(
        "--skip", "skip", multiple=True, metavar="RULE", type=click.Choice(rule_names()),
        help="Do not run this rule (repeatable).",
    )(fn)


class _Group(click.Group):
    """click, but a usage error (bad option value, unknown --skip rule, missing argument) is one line on
    stderr with exit 2 like every other error, not the usage text and a hint first."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            if isinstance(e, click.exceptions.NoArgsIsHelpError):  # bare `lc-onnx`: the help, as click shows it
                e.show()
            else:
                click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C where click itself was waiting
            click.echo("error: interrupted", err=True)
            sys.exit(128 + signal.SIGINT)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lc-onnx")
def main() -> None:
    """LayerCollapse for ONNX: fuse Linear -> (nearly) linear activation -> Linear into one layer."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write (default MODEL.lc.onnx).")
@click.option("--tol", type=float, default=api.DEFAULT_TOL, show_default=True, help=TOL_HELP)
@click.option("--rtol", type=float, default=None,
              help="Largest relative L2 error allowed per output (default: the largest |slope - 1| taken "
                   "as 1, at least 1e-4 (1e-2 for float16) and at most 1e-2).")
@click.option("--atol", type=float, default=None,
              help="An output also passes when no element moves more than this (default 1e-5; 1e-3 for float16).")
@click.option("--max-mismatch", type=float, default=0.0, show_default=True, metavar="FRACTION",
              help="Largest share of an integer or bool output's elements (an argmax) that may differ; such "
                   "outputs ignore --rtol/--atol.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime comparison.")
@click.option("--input-shape", multiple=True, metavar="NAME:D1,D2,..",
              help="Shape of a validation input whose dims are open (repeatable).")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
              help="A .npz file of validation inputs, by input name.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random validation inputs.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Also write the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Allow the output to replace the input file.")
@click.option("--external-data", is_flag=True,
              help="Write weights to OUTPUT.data beside the model (automatic for external-data inputs and past 2 GB).")
@click.option("--allow-growth", is_flag=True,
              help="Fold chains that read shared weights (one MLP run in every layer) even where the model's "
                   "parameters grow; by default such chains are left, with the reason.")
@click.option("--no-budget", is_flag=True,
              help="All or nothing: fold every chain within --tol or fail (exit 1). By default, where folding them "
                   "all fails validation, the chains whose fold would break it are left and reported.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_skip_option
@_handle_errors
def optimize(model, output, tol, rtol, atol, max_mismatch, no_validate, input_shape, inputs_path, seed, report_path,
             overwrite, external_data, allow_growth, no_budget, quiet, skip) -> None:
    """Collapse linear chains in MODEL, validate against the original, and write the result.

    Every chain within --tol is folded where validation stays within --rtol; where folding them all would not,
    the chains are folded in order of least error per MAC saved and each one that would break it is left, with
    its measured error in the report."""
    output = output or io.default_output(model)
    in_place = io.same_file(output, Path(model))
    if in_place and not overwrite:
        raise InputError(f"{output}: the output would replace the input; pass --overwrite to allow it")
    # every path to be written is checked before any work; none may be a file the input reads
    io.check_target(output, "-o")
    io.check_target(io.data_path(output), "-o's data file")
    if not io.is_utf8(output.name) and (external_data or io.has_external(io.read(model, load_weights=False)[0])):
        raise InputError(f"-o {output}: the model names its .data file inside itself, and only in UTF-8; choose an "
                         f"output name that is valid UTF-8")
    writes = [] if in_place else [output, io.data_path(output)]
    if report_path:
        io.check_target(report_path, "--report")
        if any(io.same_file(report_path, w) for w in [output, io.data_path(output)]):
            raise InputError(f"--report {report_path}: is the output model or its data file")
        writes.append(report_path)
    if inputs_path:
        io.refuse_overlap({inputs_path}, writes)
    given = load_inputs(inputs_path) if inputs_path else None
    shapes = parse_shapes(input_shape)
    progress = _Progress(enabled=not quiet and sys.stderr.isatty())
    logger = logging.getLogger("lc_onnx")
    level = logger.level
    if quiet:  # the line saying which open dims validation guessed is no error
        logger.setLevel(logging.ERROR)
    try:
        result = api.optimize(
            model, tol=tol, rtol=rtol, atol=atol, max_mismatch=max_mismatch, validate=not no_validate,
            skip=tuple(skip), input_shapes=shapes, inputs=given, seed=seed, progress=progress, writes=tuple(writes),
            allow_growth=allow_growth, budget=not no_budget,
        )
    finally:
        logger.setLevel(level)
    progress("writing")
    # the input's layout is kept: external data in, external data out (and always past 2 GB)
    result.save(output, external_data=True if external_data else None,
                progress=lambda done, total: progress("writing tensors", done, total))
    progress.done()
    if report_path:
        report_path.write_text(result.report.to_json())
    if not quiet:
        click.echo(result.report.table())
        taken = [r for r in result.report.rewrites if r.error_coefficient > 0 and r.slope_range]
        if no_validate and taken:
            click.echo(f"warning: {len(taken)} block(s) took slopes up to {taken_offset(taken):.3g} from 1 as 1 and "
                       f"nothing checked the error (--no-validate)", err=True)
        v = result.report.validation
        if v is not None and v.precision != "as stored":
            click.echo(f"validated in {v.precision}: {v.precision_note}")
        if not any(r.rule not in NODE_RULE_NAMES for r in result.report.rewrites):
            click.echo("why no chain was folded: " + api.why_unfolded(result.model, result.report.skipped, tol))
        unchanged = "" if result.report.modified else " (a copy of the input: nothing rewritten)"
        click.echo(_printable(f"wrote {output}{unchanged}"))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--tol", type=float, default=api.DEFAULT_TOL, show_default=True, help=TOL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the candidates as JSON.")
@click.option("--allow-growth", is_flag=True,
              help="Judge chains that read shared weights as `optimize --allow-growth` would (fold them even "
                   "where the model's parameters grow).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Also draw each chain's slope against the --tol band and its MACs per row before/after "
                   "(needs matplotlib: lc-onnx[plot]).")
@_skip_option
@_handle_errors
def inspect(model, tol, as_json, allow_growth, plot_path, skip) -> None:
    """List every candidate chain in MODEL: its slope, shape, and whether it would collapse and why not;
    then the single nodes a node rule would change."""
    if plot_path:
        plots.check(plot_path)
        if plot_path.exists():  # only a file that exists can be one the model reads
            io.refuse_overlap(io.files_read(model, io.read(model, load_weights=False)[0]), [plot_path])
    found = api.inspect(model, tol=tol, skip=tuple(skip), allow_growth=allow_growth)
    if plot_path:
        head = io.read(model, load_weights=False)[0]
        source = Path(model).parent.resolve() if io.has_external(head) else None
        plots.inspect_plot(found, bench_mod.row_macs(found, head, source), tol, plot_path)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in found], indent=2))
        return
    chains = [c for c in found if c.kind == "chain"]
    fire = sum(c.rule is not None for c in chains)
    # read again (weights left on disk) only where nothing would be folded: the model says why
    why = None if fire else api.why_unfolded(io.read(model, load_weights=False)[0], found, tol)
    if not found:
        click.echo("no candidate chain (no linear -> activation -> linear with constant weights)")
        click.echo(f"why no chain would be folded: {why}")
        return
    for i, c in enumerate(chains):
        slope = "-" if c.slope_range is None else (
            f"{c.slope_range[0]:.4g}" if c.slope_range[0] == c.slope_range[1]
            else f"{c.slope_range[0]:.4g}..{c.slope_range[1]:.4g}")
        where = f"[{c.graph}] " if c.graph else ""
        shape = "{}>{}>{}".format(*c.shape) if c.shape else "?"
        verdict = f"-> {c.rule}" if c.rule else f"left: {c.reason}"
        click.echo(f"chain {i}: {where}{c.names[0]} .. {c.names[-1]}  {shape}  slope {slope}  {verdict}")
    near = sum(c.rule is not None and c.slope_range is not None and c.slope_range != (1.0, 1.0) for c in chains)
    click.echo(f"{fire} of {len(chains)} chain(s) would be rewritten at tol {tol:g}"
               + (f" ({near} with slopes other than 1: optimize leaves any whose fold would move an output past "
                  f"--rtol)" if near else ""))
    if why:
        click.echo(f"why no chain would be folded: {why}")
    for c in found:
        if c.kind == "node":
            click.echo(f"node {'[' + c.graph + '] ' if c.graph else ''}{c.names[0]}  -> {c.rule}")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(sorted(bench_mod.PROVIDERS)), default="cpu", show_default=True,
              help="Execution provider; cuda fails (exit 2) where it is not available, with no CPU fallback.")
@click.option("--runtime", type=click.Choice(list(bench_mod.RUNTIMES)), default="onnxruntime", show_default=True,
              help="Time in ONNX Runtime, or in OpenVINO's CPU plugin (needs lc-onnx[openvino]; not with --provider "
                   "cuda, --io-binding, --cuda-graph).")
@click.option("--ov-precision", type=click.Choice(bench_mod.OV_PRECISIONS), default=None,
              help="OpenVINO's inference precision (default f32; the plugin's own default is bf16 where the CPU "
                   "has it). Exit 2 where the CPU cannot run it.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Intra-op threads (0: the runtime's choice; OpenVINO: INFERENCE_NUM_THREADS).")
@click.option("--batch", type=int, default=None, help="Set the open first dim of every input to this.")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model first.")
@click.option("--input-shape", multiple=True, metavar="NAME:D1,D2,..", help="Shape of an input (repeatable).")
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), help="A .npz file of inputs by name.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--io-binding", is_flag=True,
              help="Bind inputs and outputs on the provider's device (ORT IOBinding): time device work, not copies.")
@click.option("--cuda-graph", is_flag=True,
              help="Capture each model's run as a CUDA graph and replay it (--provider cuda only; implies "
                   "--io-binding; the inputs' dims are pinned to the shapes fed, so ONNX Runtime folds the "
                   "shape computations it would run on the CPU).")
@click.option("--tol", type=float, default=api.DEFAULT_TOL, show_default=True,
              help="Slope tolerance for the chains counted in the MAC share of the first model.")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Also write the results as JSON (with every run's time, the versions and a timestamp).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Also draw the latency distributions side by side (needs matplotlib: lc-onnx[plot]).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_handle_errors
def bench(models, provider, runtime, ov_precision, threads, batch, runs, warmup, input_shape, inputs_path, seed,
          io_binding, cuda_graph, tol, json_path, plot_path, quiet) -> None:
    """Latency of one or more models in ONNX Runtime (or OpenVINO: --runtime openvino), run in turn (A B, B A, ...)
    on the same inputs, with median, p10, p90 and the speedup against the first model; the shapes they ran at; then
    the share of each model's MACs held by the chains lc-onnx would collapse and how far their fold cuts the MACs."""
    bench_mod.check_options(provider, threads, batch, runs, warmup, seed, cuda_graph, runtime, io_binding,
                            ov_precision)  # before reading the models
    api.check_limit("--tol", tol)
    if json_path:
        io.check_target(json_path, "--json")
    if plot_path:  # matplotlib there, a format it writes, a path to write, not the --json file
        plots.check(plot_path, writes=(json_path,))
    for out in [p for p in (json_path, plot_path) if p]:
        if inputs_path:
            io.refuse_overlap({inputs_path}, [out])
        if out.exists():  # only a file that exists can be one the models read
            for m in models:
                io.refuse_overlap(io.files_read(m, io.read(m, load_weights=False)[0]), [out])
    given = load_inputs(inputs_path) if inputs_path else None
    found = []
    for m in models:
        try:
            found.append(api.inspect(m, tol=tol))
        except InputError as e:  # a model ONNX Runtime runs but lc-onnx cannot read: time it all the same
            found.append(str(e))
    show = not quiet and sys.stderr.isatty()
    with click.progressbar(length=runs, label="timing", file=sys.stderr if show else None,
                           hidden=not show) as bar:
        result = bench_mod.bench_files(
            list(models), provider, threads, batch, runs, warmup, parse_shapes(input_shape), given, seed,
            progress=lambda i: bar.update(1), io_binding=io_binding, cuda_graph=cuda_graph, model_candidates=found,
            runtime=runtime, ov_precision=ov_precision,
        )
    click.echo(_printable(result.table()))
    if json_path:
        json_path.write_text(result.to_json())
    if plot_path:
        plots.bench_plot(result, plot_path)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(sorted(bench_mod.PROVIDERS)), default="cpu", show_default=True,
              help="Execution provider (cuda: exit 2 where it is not available).")
@click.option("--threads", type=int, default=1, show_default=True, help="Intra-op threads (0: ONNX Runtime's choice).")
@click.option("--batch", type=int, default=None, help="Set the open first dim of every input to this.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs per model first.")
@click.option("--input-shape", multiple=True, metavar="NAME:D1,D2,..", help="Shape of an input (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--no-per-block", is_flag=True, help="Time only the last quarter, half and all blocks, not each one.")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False),
              help="Leave the what-if models in this folder (named *.what-if-N.onnx, marked in their metadata).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the rows as JSON.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave out the blocks with a node name matching this (repeatable; BERT's pooler: '*pooler*').")
@_handle_errors
def estimate(model, provider, threads, batch, runs, warmup, input_shape, seed, no_per_block, keep, json_path,
             exclude) -> None:
    """What a LayerCollapse fine-tune would buy here, before doing it: each MLP block of MODEL whose activation
    (GELU, ReLU, Swish, ...) is its only obstacle is folded as if the activation were the identity, and these
    what-if models (each block; the last quarter, half, all) are timed against MODEL, interleaved. The what-if
    models compute something else: never deploy them."""
    from lc_onnx import estimate as estimate_mod

    bench_mod.check_options(provider, threads, batch, runs, warmup, seed)
    if keep is not None and not keep.is_dir():
        raise InputError(f"--keep {keep}: not a folder")
    if json_path:
        io.check_target(json_path, "--json")
        io.refuse_overlap(io.files_read(Path(model), io.read(model, load_weights=False)[0]), [json_path])
    result = estimate_mod.estimate(Path(model), provider, threads, batch, runs, warmup, parse_shapes(input_shape),
                                   seed, per_block=not no_per_block, keep=keep, exclude=tuple(exclude))
    click.echo(result.table())
    if json_path:
        json_path.write_text(json.dumps({"blocks": result.blocks, "rows": result.rows, "settings": result.settings,
                                         "excluded": result.excluded, "warnings": result.warnings},
                                        indent=2) + "\n")


@main.command()
def rules() -> None:
    """List the rules and what each does (names for --skip)."""
    for r in ALL_RULES:
        opsets = f"opset {r.min_opset}-{r.max_opset}"
        click.echo(f"{r.name:26} {opsets:12} {r.summary}")


@main.command()
@click.option("-o", "--output-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the demo models here (default: a temporary folder).")
@click.option("--overwrite", is_flag=True, help="Allow replacing demo.onnx and demo.lc.onnx in the output folder.")
@_handle_errors
def demo(output_dir, overwrite) -> None:
    """Build a small transformer-MLP model, optimize it, validate it and print the report."""
    from lc_onnx.demo import run_demo

    run_demo(output_dir, overwrite=overwrite)

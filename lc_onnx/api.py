"""`optimize(model)`: load → rewrite with `passes` → check → validate in ONNX Runtime → report."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.logger import G_LOGGER

import passes
from lc_onnx import check, io, shapes
from lc_onnx import validate as validation
from lc_onnx.errors import InputError, ValidationError, one_line
from lc_onnx.report import Report, Totals
from lc_onnx.report import why_unfolded as _why_unfolded

# graphsurgeon prints its own [W] lines on stderr (bfloat16 weights it cannot convert, a missing `colored`
# module): only its errors, so a run says one line of its own
G_LOGGER.severity = G_LOGGER.ERROR

DEFAULT_TOL = 0.05  # the paper's: a fine-tune leaves slopes 0.993-0.999; validation judges the error
RELEASE_ABOVE = 64 * 2**20  # bytes of model: past this, memory is handed back between stages (gc costs ~0.1 s)
STAMP_KEY = "lc_onnx"


@dataclass
class OptimizeResult:
    """The new model and the report. Where the input kept its weights as external data, `model` still
    points at them (in `source`); `save` streams them to the output's own data file."""

    model: onnx.ModelProto
    report: Report
    source: Path | None = None  # the input's folder, when the input kept its weights as external data
    input_path: Path | None = None  # the file the input came from
    reads: frozenset[Path] = frozenset()  # the input's file and its external data files

    def save(self, path: str | os.PathLike, external_data: bool | None = None,
             progress: Callable[[int, int], None] | None = None) -> Path:
        """Write the model; by default in the input's layout (external data in, external data out).
        `progress(done, total)` follows the tensors streamed to the data file. Refuses (InputError) to write
        over a file the input reads, but for replacing the input model itself (and its own data file)."""
        in_place = self.input_path is not None and io.same_file(Path(path), self.input_path)
        if not in_place:
            io.refuse_overlap(set(self.reads), [Path(path), io.data_path(Path(path))])
        if external_data is None and self.source is not None:
            external_data = True
        return io.save(self.model, path, external_data=external_data, source=self.source, progress=progress)


@dataclass
class _Input:
    model: onnx.ModelProto
    path: Path | None  # the file it came from, so ONNX Runtime can open it where it is
    source: Path | None  # its folder, when weights were left on disk as external data
    owned: bool  # loaded here, so its weights may be released once they have been copied
    reads: frozenset[Path] = frozenset()  # every file the input reads: no output may land on one


def _open(model_or_path: onnx.ModelProto | str | os.PathLike) -> _Input:
    if isinstance(model_or_path, onnx.ModelProto):
        if io.has_external(model_or_path):  # its data would be looked for in the cwd
            raise InputError("the model points at external data; pass its path, so that the data is read "
                             "from the model's folder")
        return _Input(model_or_path, None, None, owned=False)
    path = Path(model_or_path)
    model, external = io.read(path, load_weights=False)
    reads = frozenset(io.files_read(path, model))
    return _Input(model, path, path.parent.resolve() if external else None, owned=True, reads=reads)


def _import(src: _Input) -> tuple[gs.Graph, list, dict[int, tuple[gs.Constant, gs.Graph]]]:
    """The checked graph, with the shapes that inference adds where the model leaves them open (and the
    list of those, to take off before export), and the weights its subgraphs read from around them."""
    light = check.check_model(src.model, src.source)
    try:
        graph = gs.import_onnx(src.model)
    except Exception as e:  # graphsurgeon raises bare exceptions for malformed graphs
        raise InputError(f"the graph cannot be read ({one_line(e)})") from None
    if src.source is not None:
        io.attach_external(graph, src.source)
    # graphsurgeon leaves initializers that are also graph inputs out of the inputs: put them back, so the
    # output keeps them and the passes see them as defaults a caller may override (IR >= 4), not constants
    tensors = graph.tensors()
    homes = _outer_weights(graph, src.model)
    for t, home in homes.values():  # a default only subgraphs read (an If branch's) is an input all the same
        if home is graph:
            tensors.setdefault(t.name, t)
    graph.inputs = [tensors[i.name] for i in src.model.graph.input if i.name in tensors]
    return graph, shapes.annotate(graph, shapes.infer(light)), homes


def _outer_weights(graph: gs.Graph, model: onnx.ModelProto) -> dict[int, tuple[gs.Constant, gs.Graph]]:
    """The initializers a subgraph reads from a graph around it (both If branches of optimum's merged decoders
    read the main graph's weights), by id, each with the graph that holds it: graphsurgeon's export writes such a
    weight into every subgraph that reads it, and `_rehome` puts it back. Read from `graph` as imported."""
    homes: dict[int, tuple[gs.Constant, gs.Graph]] = {}

    def walk(g: gs.Graph, proto: onnx.GraphProto, around: list[tuple[gs.Graph, set[str]]]) -> None:
        here = around + [(g, {t.name for t in proto.initializer} | {t.values.name for t in proto.sparse_initializer})]
        if around:
            for t in g.tensors().values():
                if isinstance(t, gs.Constant) and t.name not in here[-1][1]:
                    home = next((h for h, names in reversed(around) if t.name in names), None)
                    if home is not None:
                        homes[id(t)] = (t, home)
        for node, node_proto in zip(g.nodes, proto.node, strict=True):  # as imported: the same nodes, in order
            for a in node_proto.attribute:
                if a.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs.get(a.name), gs.Graph):
                    walk(node.attrs[a.name], a.g, here)

    walk(graph, model.graph, [])
    return homes


def _rehome(graph: gs.Graph, out: onnx.GraphProto, homes: dict[int, tuple[gs.Constant, gs.Graph]]) -> None:
    """Each weight a subgraph reads from a graph around it, once, in that graph (`_outer_weights`): graphsurgeon's
    export copied it into every subgraph that reads it (twice the weights for two If branches), and left it out of
    its own graph when no node there reads it. A weight whose graph is gone stays where the export put it."""
    exported: dict[int, tuple[onnx.GraphProto, set[str]]] = {}

    def walk(g: gs.Graph, proto: onnx.GraphProto) -> None:
        held = {t.name for t in proto.initializer} | {t.values.name for t in proto.sparse_initializer}
        exported[id(g)] = proto, held
        tensors = g.tensors() if g is not graph else {}
        for field, name_of in (("initializer", lambda t: t.name), ("sparse_initializer", lambda t: t.values.name)):
            entries = getattr(proto, field)
            for i in reversed(range(len(entries))):
                t = tensors.get(name_of(entries[i]))
                home = homes.get(id(t))
                if home is None or home[0] is not t or home[1] is g or id(home[1]) not in exported:
                    continue
                owner, owner_held = exported[id(home[1])]
                if t.name not in owner_held:
                    getattr(owner, field).append(entries[i])
                    owner_held.add(t.name)
                del entries[i]
        for node, node_proto in zip(g.nodes, proto.node, strict=True):  # the export writes the nodes in order
            for a in node_proto.attribute:
                if a.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs.get(a.name), gs.Graph):
                    walk(node.attrs[a.name], a.g)

    if homes:
        walk(graph, out)


def totals(model: onnx.ModelProto) -> Totals:
    """Nodes, and every constant value: initializers and the values of Constant nodes (Paddle and some
    hand-written exports keep their weights there)."""
    nodes = params = 0
    for g in shapes.graphs(model.graph):
        nodes += len(g.node)
        params += sum(math.prod(t.dims) for t in g.initializer)
        params += sum(math.prod(t.values.dims) for t in g.sparse_initializer)
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:  # exactly one, by the spec
                    params += (math.prod(a.t.dims) if a.name == "value" else
                               math.prod(a.sparse_tensor.values.dims) if a.name == "sparse_value" else
                               len(a.floats) + len(a.ints) + len(a.strings) if a.name.endswith("s") else 1)
    return Totals(nodes, params, io.serialized_size(model) + io.external_size(model))


def _export(graph: gs.Graph, original: onnx.ModelProto, report: Report,
            homes: dict[int, tuple[gs.Constant, gs.Graph]] | None = None, left: int = 0) -> onnx.ModelProto:
    """The rewritten graph inside the original's model envelope: opsets, producer, functions, metadata, the notes
    graphsurgeon drops, training_info; each weight a subgraph reads from around it stays, once, where it was
    (`homes`: see `_outer_weights`), and past 1 GB the subgraphs' fused weights join them (`_hoist_heavy`)."""
    _shield_source_tensors(graph)
    homes = dict(homes or {})
    hoisted = _hoist_heavy(graph, homes)
    out = gs.export_onnx(graph, do_type_check=False)
    _rehome(graph, out.graph, homes)
    for t in out.graph.initializer:
        if t.name in hoisted:
            t.CopyFrom(onnx.numpy_helper.from_array(hoisted[t.name]._values.values, t.name))
    for constant in hoisted.values():
        constant._values = constant._values.values  # the graph as it was
    out.ir_version = original.ir_version
    del out.opset_import[:]
    out.opset_import.extend(original.opset_import)
    del out.functions[:]
    out.functions.extend(original.functions)
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, name, getattr(original, name))
    out.metadata_props.extend(p for p in original.metadata_props if p.key != STAMP_KEY)
    _restore_node_notes(original.graph, out.graph)
    _restore_graph_notes(original.graph, out.graph)
    out.training_info.extend(original.training_info)
    counts = {}
    for r in report.rewrites:
        counts[r.rule] = counts.get(r.rule, 0) + 1
    stamp = {"tol": report.tol, "rewrites": counts}
    if left:  # blocks the accuracy budget left (`bench` says so beside the MACs it counts as collapsible)
        stamp["left_for_budget"] = left
    out.metadata_props.add(key=STAMP_KEY, value=json.dumps(stamp, sort_keys=True))
    return out


class _StandIn(gs.ir.tensor.LazyValues):
    """A weight's values, exported as a data-less TensorProto (dtype and dims) that `_export` fills in place."""

    def __init__(self, values: np.ndarray, name: str):
        super().__init__(onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype),
                                          dims=values.shape))
        self.values = values

    def load(self) -> np.ndarray:
        return self.values


def _hoist_heavy(graph: gs.Graph, homes: dict[int, tuple[gs.Constant, gs.Graph]]) -> dict[str, gs.Constant]:
    """Past 1 GB, the weights the rewrites wrote in subgraphs (fused If-branch weights) move to the main graph, read
    from there as optimum's merged decoders read theirs: a subgraph is copied whole, on export and by each check,
    and protobuf cannot copy one past 2 GB ("Failed to serialize proto"), while the main graph's weights are
    streamed. Each is exported as a `_StandIn` that `homes` sends to the main graph; returns them by name."""
    fresh = {}
    for g in graph.subgraphs(recursive=True):
        for t in g.tensors().values():
            if (isinstance(t, gs.Constant) and id(t) not in homes and isinstance(t._values, np.ndarray)
                    and t._values.nbytes >= io.EXTERNAL_THRESHOLD and t._values.dtype.kind in "fiub"):
                fresh[t.name] = t
    if sum(t._values.nbytes for t in fresh.values()) <= io.PROTOBUF_LIMIT // 2:
        return {}
    taken = graph.tensors()
    hoisted = {name: t for name, t in fresh.items() if name not in taken}
    for name, t in hoisted.items():
        t._values = _StandIn(t._values, name)
        homes[id(t)] = (t, graph)
    return hoisted


def _shield_source_tensors(graph: gs.Graph) -> None:
    """graphsurgeon's export writes the tensor's name into the source TensorProto it reuses; where that
    name is unset (a Constant node's value) it would change the caller's model, so give it a copy."""
    for g in [graph, *graph.subgraphs(recursive=True)]:
        constants = [t for t in g.tensors().values() if isinstance(t, gs.Constant)]
        constants += [v for n in g.nodes for v in n.attrs.values() if isinstance(v, gs.Constant)]
        for t in constants:
            lazy = t._values
            if isinstance(lazy, gs.ir.tensor.LazyValues) and (
                    not lazy.tensor.HasField("name") or lazy.tensor.name != t.name):
                copy = onnx.TensorProto()
                copy.CopyFrom(lazy.tensor)
                lazy.tensor = copy


def _restore_node_notes(original: onnx.GraphProto, out: onnx.GraphProto) -> None:
    """graphsurgeon drops the doc strings and metadata_props of graphs and nodes (the dynamo exporter
    keeps stack traces and module names there); give each surviving node, by name, its own back."""
    notes = {}
    for g in shapes.graphs(original):
        for n in g.node:
            if n.name and (n.doc_string or n.metadata_props):
                notes[n.name] = n
    if original.metadata_props and not out.metadata_props:
        out.metadata_props.extend(original.metadata_props)
    for g in shapes.graphs(out):
        for n in g.node:
            source = notes.get(n.name)
            if source is not None:
                n.doc_string = source.doc_string
                del n.metadata_props[:]
                n.metadata_props.extend(source.metadata_props)


def _restore_graph_notes(original: onnx.GraphProto, out: onnx.GraphProto) -> None:
    """graphsurgeon drops the doc strings of graph inputs, outputs and value_info, and each graph's
    quantization_annotation (and the scale and zero-point initializers only an annotation reads): give back, by
    name, those of the tensors that survive the rewrite."""
    docs, notes, params = {}, [], {}
    for g in shapes.graphs(original):
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.doc_string:
                docs.setdefault(vi.name, vi.doc_string)
        if g.quantization_annotation:
            notes += g.quantization_annotation
            params.update((t.name, t) for t in g.initializer)
    if not (docs or notes):
        return
    for g in shapes.graphs(out):
        for vi in [*g.input, *g.output, *g.value_info]:
            vi.doc_string = docs.get(vi.name, vi.doc_string)
        if not notes:
            continue
        defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
        for note in notes:
            if note.tensor_name not in defined:
                continue  # the tensor died in a rewrite (or lives in another graph)
            g.quantization_annotation.add().CopyFrom(note)
            for p in note.quant_parameter_tensor_names:
                if p.value not in defined and p.value in params:
                    g.initializer.add().CopyFrom(params[p.value])
                    defined.add(p.value)


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    tol: float = DEFAULT_TOL,
    validate: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    max_mismatch: float = 0.0,
    skip: tuple[str, ...] | frozenset[str] = (),
    input_shapes: dict[str, list[int]] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    progress: Callable[..., None] | None = None,
    writes: tuple[str | os.PathLike, ...] = (),
    allow_growth: bool = False,
    budget: bool = True,
) -> OptimizeResult:
    """Collapse every linear → (near-)identity → linear chain within `tol` of slope 1 that validation allows.

    The input model is never changed. With `validate`, both models run in ONNX Runtime on seeded random inputs
    (or `inputs`); an output passes when its relative L2 error is within `rtol` or its largest absolute error
    within `atol` (defaults: `validate.default_rtol`, from the slopes within `tol`, and `validate.default_atol`);
    an integer or bool output when at most the share `max_mismatch` of its elements differ. Where folding every
    chain fails that, the chains whose slopes are not exactly 1 are folded in order of least error per MAC saved
    while validation passes (`budget`); each one that would break it is left, with its measured error in the
    report. ValidationError only where even the exact rewrites fail, or with `budget=False` (all or nothing).
    `writes` are paths the caller will write: InputError before any work if one is a file the input reads.
    `progress(stage)` is called as each stage starts, and `progress(stage, done, None)` as rewrites are made.
    `allow_growth`: fold chains that read shared weights (ALBERT's one MLP in every layer) even where that grows
    the model's parameters; by default such a group is left, with the reason in the report."""
    step = progress or (lambda stage, done=None, total=None: None)
    for name, value in (("--tol", tol), ("--rtol", rtol), ("--atol", atol)):
        check_limit(name, value)
    validation.check_share("--max-mismatch", max_mismatch)
    validation.check_seed(seed)
    try:
        skip_set = frozenset(skip)
        passes.registry.active_rules(skip_set)
    except ValueError as e:
        raise InputError(str(e)) from None
    step("loading")
    src = _open(model_or_path)
    io.refuse_overlap(set(src.reads), [Path(w) for w in writes])
    original = src.model
    check_input_names(original, input_shapes, inputs)  # here, not only in validation: a run may fold nothing
    rewrite = _Rewriter(tol, skip_set, allow_growth, step)
    attempt = rewrite(src)
    report = attempt.report
    if attempt.model is None:
        return OptimizeResult(original, report, src.source, src.path, src.reads)
    model = attempt.model
    if validate:
        step("validating in ONNX Runtime")
        feeds, drawn = validation.draw_inputs(original, input_shapes, inputs, seed)
        guessed = validation.guessed_inputs(original, input_shapes, inputs)
        limit = validation.default_rtol(original, report.rewrites) if rtol is None else rtol
        abs_limit = validation.default_atol(original) if atol is None else atol
    big = report.before.bytes > RELEASE_ABOVE
    if src.owned:  # loaded here and now done with: ONNX Runtime reads the original from its file
        src.model, original = None, src.path
        if big:
            validation.return_freed_memory()
    if not validate:
        return OptimizeResult(model, report, src.source, src.path, src.reads)

    reference = []  # the original's outputs, once had in its own dtype: the budget's tries run it no more

    def judge(candidate: onnx.ModelProto | None) -> validation.Validation:
        """`candidate` (None: the input as it is) against the original."""
        candidate = _open(model_or_path).model if candidate is None else candidate
        found = validation.compare(original, candidate, feeds, limit, abs_limit, src.source, release=big,
                                   max_mismatch=max_mismatch, reference=reference[0] if reference else None)
        if not reference and found.precision == "as stored":
            reference.append(found.reference)
        found.drawn, found.guessed = drawn, guessed
        return found

    report.validation = judge(model)
    if not report.validation.passed and budget and attempt.budgeted:
        attempt = _fit_budget(attempt, lambda leave: rewrite(_open(model_or_path), leave), judge, step)
        model, report = attempt.model, attempt.report
    if not report.validation.passed:
        why = report.validation.failure()
        if report.budget:
            why += f" ({report.budget})"
        elif not budget and attempt.budgeted:
            why += " (without --no-budget, the blocks that break it would be left and the rest folded)"
        raise ValidationError(why, report)
    if model is None:  # every rewrite took slopes as 1 and each breaks the budget: the input, as it is
        src = _open(model_or_path)
        return OptimizeResult(src.model, report, src.source, src.path, src.reads)
    return OptimizeResult(model, report, src.source, src.path, src.reads)


@dataclass
class _Attempt:
    """One rewrite of the model: the new model (None when nothing was rewritten), its report, and, by rewrite,
    the positions (as imported) of the activations each took as the identity."""

    model: onnx.ModelProto | None
    report: Report
    replaced: list[frozenset[int]]

    @property
    def budgeted(self) -> list[int]:
        """The rewrites a budget may leave: those that took slopes other than 1 as 1 (of activations as imported)."""
        return [i for i, r in enumerate(self.report.rewrites) if r.error_coefficient > 0 and self.replaced[i]]


@dataclass
class _Rewriter:
    """Import → passes → export → check, as often as the budget needs (each time from the input as given)."""

    tol: float
    skip: frozenset[str]
    allow_growth: bool
    step: Callable[..., None]

    def __call__(self, src: _Input, leave: frozenset[int] = frozenset()) -> _Attempt:
        """`leave`: positions (as imported) of the activations no rule may take as the identity."""
        self.step("checking")
        graph, annotated, homes = _import(src)
        # sizes read string fields: only once they are checked
        report = Report(tol=self.tol, before=totals(src.model), allow_growth=self.allow_growth)
        self.step("rewriting")
        position = {}  # the activations, by their place as imported: the same in every attempt
        held = []  # those nodes, alive while their ids are looked up (a freed node's id may be reused)
        for i, (node, label) in enumerate(_node_labels(graph)):
            if node.op in passes.budget.SLOPED:
                position[id(node)] = i
                held.append(node)
            if not node.name:
                node.name = _Unnamed(label)
        at = {i: key for key, i in position.items()}
        trained = trained_names(src.model)
        read = _expose(graph, trained)
        result = passes.run(graph, self.tol, self.skip, on_rewrite=lambda n: self.step("rewrites made", n, None),
                            allow_growth=self.allow_growth, leave=frozenset(at[i] for i in leave if i in at),
                            variables=trained)
        graph.outputs = [t for t in graph.outputs if not any(t is r for r in read)]
        position.update((new, position[old]) for new, old in result.carried.items() if old in position)
        shapes.unannotate(annotated)
        del annotated  # it holds graph tensors, and through them the graph and the input's weights
        for done in [*result.rewrites, *result.skipped]:
            done.names = [name.label if isinstance(name, _Unnamed) else name for name in done.names]
        report.rewrites, report.skipped = result.rewrites, result.skipped
        replaced = [frozenset(position[k] for k in r.keys if k in position) for r in result.rewrites]
        for c in result.skipped:
            c.positions = frozenset(position[k] for k in c.keys if k in position)  # where the budget says why
        del held
        if not result.modified:
            report.after = report.before
            return _Attempt(None, report, replaced)
        self.step("exporting")
        model = _export(graph, src.model, report, homes, len(leave))
        del homes
        del graph
        try:
            check.check_model(model, src.source)
        except InputError as e:
            raise ValidationError(f"the rewritten model fails onnx.checker: {e}", report) from None
        report.after = totals(model)
        return _Attempt(model, report, replaced)


def _fit_budget(full: _Attempt, rewrite: Callable[[frozenset[int]], _Attempt],
                judge: Callable[[onnx.ModelProto | None], validation.Validation],
                step: Callable[..., None]) -> _Attempt:
    """Folding every chain in `full` failed validation: take the activations it took as slope 1 (slopes other than
    1) in order of least error per MAC saved while validation passes; each that would break it is left, and says
    by how much. The longest passing prefix of that order is found by bisection, then each later one is tried on
    its own. Where validation fails with all of them left, no budget helps: that attempt comes back, failed."""
    rewrites = full.report.rewrites
    order = sorted(full.budgeted, key=lambda i: rewrites[i].error_coefficient
                   / max(1, rewrites[i].macs_before - rewrites[i].macs_after))
    tried = 0

    def attempt(kept: list[int]) -> _Attempt:
        nonlocal tried
        tried += 1
        step(f"fitting the accuracy budget ({len(order)} blocks with slopes other than 1): try {tried}")
        done = rewrite(frozenset().union(*(full.replaced[i] for i in order if i not in kept)))
        done.report.validation = judge(done.model)
        return done

    best = attempt([])
    if not best.report.validation.passed:
        best.report.budget = ("validation fails with every block of slopes other than 1 left: "
                              + ("the exact rewrites alone fail it" if best.model is not None else
                                 "nothing rewritten, the model's own outputs differ between two runs")
                              + ", so no budget helps")
        return best
    failed = {len(order): full.report.validation}  # prefix length -> its validation, where it failed
    lo, hi = 0, len(order) - 1  # order[:lo] passes, order[:hi + 1] fails
    while lo < hi:
        mid = (lo + hi + 1) // 2
        done = attempt(order[:mid])
        if done.report.validation.passed:
            best, lo = done, mid
        else:
            failed[mid], hi = done.report.validation, mid - 1
    kept, left = order[:lo], {order[lo]: failed[lo + 1]}
    for i in order[lo + 1:]:
        done = attempt([*kept, i])
        if done.report.validation.passed:
            best, kept = done, [*kept, i]
        else:
            left[i] = done.report.validation
    _say_why_left(best.report, {i: (rewrites[i], full.replaced[i], found) for i, found in left.items()})
    taken = sum(r.error_coefficient > 0 for r in best.report.rewrites)
    best.report.budget = (f"{taken} of {len(order)} blocks with slopes other than 1 taken as 1, {len(left)} left to "
                          f"pass validation (rtol {full.report.validation.rtol:.3g}; {tried} tries)")
    return best


def _say_why_left(report: Report, left: dict[int, tuple[passes.Rewrite, frozenset[int], validation.Validation]]
                  ) -> None:
    """Each block the budget left, with what folding it measured: on every candidate holding its activation, or,
    where none does (an activation a node rule removed alone), on an entry of its own."""
    for rewrite, positions, found in left.values():
        alone = rewrite.shape is None  # a node rule would have removed the activation alone (no chain holds it)
        why = _moved(found, "removing it" if alone else "folding it")
        held = [c for c in report.skipped if positions & c.positions]
        for c in held:
            if c.reason.endswith(passes.budget.REASON):
                c.reason = f"{c.reason}: {why}"
            elif alone:  # the block is left for its own reason (quantized weights, ...): that comes first
                c.reason = f"{c.reason}; its activation alone was {passes.budget.REASON}: {why}"
            else:
                c.reason = f"{passes.budget.REASON}: {why} ({c.reason})"
        if not held:
            c = passes.Candidate([], rewrite.slope_range, None, f"{passes.budget.REASON}: {why}", rewrite.shape,
                                 rewrite.graph, kind="node" if alone else "chain")
            c.names, c.positions = list(rewrite.names), positions
            report.skipped.append(c)
        worst = _worst(found)
        report.budget_left.append({"names": list(rewrite.names), "graph": rewrite.graph, "rule": rewrite.rule,
                                   "slope_range": rewrite.slope_range, "output": worst and worst.name,
                                   "rel_l2": worst and worst.rel_l2, "max_abs": worst and worst.max_abs,
                                   "mismatch": worst and worst.mismatch, "rtol": found.rtol, "atol": found.atol})


def _worst(found: validation.Validation) -> validation.OutputError | None:
    return max((o for o in found.outputs if not o.passed), key=lambda o: o.rel_l2, default=None)


def _moved(found: validation.Validation, doing: str = "folding it") -> str:
    """What taking a left block (beside the blocks taken before it) did to the outputs, in a few words: the worst
    output's error against the limit."""
    bad = _worst(found)
    if bad is None:
        return "the rewritten model did not pass validation"
    if bad.mismatch is not None:
        share, limit = _apart(bad.mismatch, found.max_mismatch)
        return f"{doing} changes a share {share} of output {bad.name!r}, over --max-mismatch {limit}"
    moved, limit = _apart(bad.rel_l2, found.rtol)
    return f"{doing} moves output {bad.name!r} by {moved} (rel L2), over rtol {limit}"


def _apart(value: float, limit: float) -> tuple[str, str]:
    """`value` and the `limit` it is over, to 3 significant digits, or more where those would print them equal
    ("by 0.001, over rtol 0.001" for 0.001004)."""
    digits = 3
    while f"{value:.{digits}g}" == f"{limit:.{digits}g}" and digits < 17:
        digits += 1
    return f"{value:.{digits}g}", f"{limit:.{digits}g}"


def trained_names(model: onnx.ModelProto) -> frozenset[str]:
    """The names a training_info binds or its graphs read: an initializer among them is trained in place, so no
    rule may fold it (its binding would name a weight the fold removed, which onnx.checker does not catch)."""
    names = set()
    for info in model.training_info:
        names.update(b.key for b in [*info.update_binding, *info.initialization_binding])
        for g in (info.algorithm, info.initialization):
            for n in (n for sub in shapes.graphs(g) for n in sub.node):
                names.update(n.input)
                for a in n.attribute:  # Gradient names what it differentiates in xs, y and zs
                    names.update(s.decode(errors="replace") for s in [*a.strings, *([a.s] if a.s else [])])
    return frozenset(names)


def _expose(graph: gs.Graph, names: frozenset[str]) -> list[gs.Tensor]:
    """The computed tensors of the main graph named in `names` (what a training_info reads of the inference graph),
    added to its outputs, so that no rule removes them; returns them, to take off again before export."""
    outer = [*graph.outputs, *graph.inputs]
    read = [t for name, t in graph.tensors().items() if name in names and not isinstance(t, gs.Constant)
            and not any(t is o for o in outer)]
    graph.outputs += read
    return read


def check_input_names(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None,
                      inputs: dict[str, np.ndarray] | None) -> None:
    """InputError, in one line naming the model's inputs, where `input_shapes` or `inputs` name no input of the
    model: checked whether or not anything is folded or validated, so that a typo is never silently ignored."""
    held = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in held]
    for name in [*(input_shapes or {}), *(inputs or {})]:
        if name not in names:
            raise InputError(f"the model has no input {name!r}; its inputs are {', '.join(names) or 'none'}")


ACTIVATION_OPS = ("Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Sigmoid", "HardSigmoid", "HardSwish", "Swish",
                  "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Elu", "Selu", "Celu", "ThresholdedRelu", "PRelu",
                  "LeakyRelu")


def why_unfolded(model: onnx.ModelProto, candidates: list[passes.Candidate], tol: float) -> str:
    """One paragraph on why no chain of `model` is folded at `tol`, from `inspect`'s candidates (or a report's
    `skipped`), and where there is none, from the model: its linear layers with constant weights, its activation
    nodes and lc-onnx's stamp tell a model that looks collapsed already from one that never had a block."""
    layers = activations = 0

    def walk(g: onnx.GraphProto, outer: frozenset[str]) -> None:
        nonlocal layers, activations
        consts = outer | {t.name for t in g.initializer} | {
            o for n in g.node if n.op_type == "Constant" for o in n.output}
        for n in g.node:
            if n.op_type in ("Gemm", "MatMul", "Conv") and any(i in consts for i in n.input[:2]):
                layers += 1
            activations += n.op_type in ACTIVATION_OPS
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub, consts)

    walk(model.graph, frozenset())
    return _why_unfolded(candidates, tol, layers, activations, read_stamp(model))


def read_stamp(model: onnx.ModelProto) -> dict | None:
    """What lc-onnx optimize wrote into a model's metadata (tol, rewrites, blocks left for the budget): None where
    it wrote nothing, {} where the entry cannot be read."""
    stamp = next((p.value for p in model.metadata_props if p.key == STAMP_KEY), None)
    try:
        return None if stamp is None else dict(json.loads(stamp))
    except (ValueError, TypeError):
        return {}


def check_limit(option: str, value: float | None) -> None:
    """InputError unless `value` (a tolerance; None: not given) is a finite number >= 0."""
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise InputError(f"{option} {value}: must be a finite number >= 0")


def inspect(model_or_path: onnx.ModelProto | str | os.PathLike, *, tol: float = DEFAULT_TOL,
            skip: tuple[str, ...] = (), allow_growth: bool = False) -> list[passes.Candidate]:
    """Every candidate chain with the rule that would fire on it, or why none would. A node without a name is
    named by `node_label` (`#` and its place in its graph), so that candidates tell unnamed nodes apart."""
    check_limit("--tol", tol)
    src = _open(model_or_path)
    graph = _import(src)[0]
    for node, label in _node_labels(graph):
        node.name = label
    trained = trained_names(src.model)
    _expose(graph, trained)
    try:
        return passes.inspect(graph, tol, frozenset(skip), allow_growth, trained)
    except ValueError as e:
        raise InputError(str(e)) from None


def node_label(name: str, index: int) -> str:
    """A node's name, or `#index` (its place in its graph) where it has none: unnamed nodes are legal and all
    named '', so `inspect`'s candidates and `bench`'s per-node MACs both use this."""
    return name or f"#{index}"


def _node_labels(graph: gs.Graph) -> Iterator[tuple[gs.Node, str]]:
    """Every node of the graph and its subgraphs with its `node_label`, numbered as imported (before any
    rewrite), so that `inspect` and `optimize`'s report give a node the same label."""
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for i, n in enumerate(g.nodes):
            yield n, node_label(n.name, i)


class _Unnamed(str):
    """The name of an unnamed node during `optimize`: it equals '' wherever the passes or the export read it, so
    the written model keeps the node unnamed and the names derived from it stay as they were; it carries the
    node's `label` for the report."""

    label: str

    def __new__(cls, label: str) -> _Unnamed:
        name = super().__new__(cls, "")
        name.label = label
        return name

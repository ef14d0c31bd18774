"""The flow a notebook defines: steps, parameters, prelude and edges (pure).

``build_flow(cells)`` turns the source text of a notebook's cells into a
frozen :class:`FlowGraph` (DESIGN section 2; semantics fixed in
docs/ARCHITECTURE.md). No I/O, and IPython is only imported lazily by
:mod:`flowmagic.flow.analysis` to transform IPython syntax.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowmagic.flow.analysis import CellAnalysis, analyze_cell, prepare_code
from flowmagic.flow.prelude import PreludePart, split_prelude
from flowmagic.flow.cells import Parameter, ParsedCell, StepOptions, classify_cell, flow_name_in, parse_params
from flowmagic.errors import FlowDefinitionError, cell_number

# Names every cell can use without anyone defining them: Python's builtins
# and what IPython adds to a kernel's namespace.
BUILTIN_NAMES = frozenset(dir(builtins)) | {"display", "get_ipython", "exit", "quit", "In", "Out"}
FOREACH_ITEM = "input"     # bound in a foreach task: this task's item
JOIN_INPUTS = "inputs"     # bound in a join: one namespace per foreach task


# --- records -------------------------------------------------------------------

@dataclass(frozen=True)
class StepSpec:
    name: str
    cell: int                   # 0-based index of the cell in the notebook / cell list
    source: str                 # the cell body as written, without the %%step line
    code: str                   # body after IPython's input transformer (plain Python)
    body_line: int              # 1-based line of the body's first line in the cell (2)
    reads: tuple[str, ...]      # sorted
    writes: tuple[str, ...]     # sorted, `_private` names excluded
    options: StepOptions
    doc: str                    # first comment line of the body, "" if none


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    variables: tuple[str, ...]  # sorted
    # Of those, the names the target reads only when its own cell did not bind them
    # first (a branch of an `if`): `show` says so, since the edge may look unneeded.
    maybe: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreludeDef:
    """One name an ordinary cell gives the prelude: where, as what text, reading what."""

    cell: int                   # 0-based index of the ordinary cell that defines it (the last one)
    text: str                   # `ast.unparse` of the defining statement: an edit changes it
    reads: frozenset[str] = frozenset()   # for a def/class: the globals its body reads
    cells: tuple[int, ...] = ()           # every ordinary cell that defines it, in order


@dataclass(frozen=True)
class FlowGraph:
    name: str
    prelude: str                # Python source executed once per fork server
    params: tuple[Parameter, ...]
    steps: tuple[StepSpec, ...]  # notebook order
    edges: tuple[Edge, ...]
    warnings: tuple[str, ...] = ()  # what `show` points out: the flow runs, but may not mean what it says
    prelude_defs: Mapping[str, PreludeDef] = field(default_factory=dict, compare=False)
    _index: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.name: i for i, s in enumerate(self.steps)})

    def step(self, name: str) -> StepSpec:
        try:
            return self.steps[self._index[name]]
        except KeyError:
            known = ", ".join(s.name for s in self.steps) or "none"
            raise KeyError(f"no step named {name!r} in flow {self.name} (steps: {known})") from None

    def producers(self, step: str) -> dict[str, str]:
        """variable -> the step that produces it for ``step``."""
        self.step(step)
        return {var: e.source for e in self.edges if e.target == step for var in e.variables}

    def parents(self, step: str) -> list[str]:
        self.step(step)
        return _in_step_order(self, {e.source for e in self.edges if e.target == step})

    def children(self, step: str) -> list[str]:
        self.step(step)
        return _in_step_order(self, {e.target for e in self.edges if e.source == step})

    def roots(self) -> list[str]:
        targets = {e.target for e in self.edges}
        return [s.name for s in self.steps if s.name not in targets]

    def topological_order(self) -> list[str]:
        # Producers always precede their readers, so notebook order is topological.
        return [s.name for s in self.steps]

    def downstream(self, step: str) -> set[str]:
        """Every step reachable from ``step`` (excluding it)."""
        found: set[str] = set()
        frontier = [step]
        while frontier:
            for child in self.children(frontier.pop()):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
        return found

    def foreach_producer(self, step: str) -> str | None:
        """The foreach step this one joins: the one ``inputs`` comes from if the
        step reads ``inputs``, else its nearest foreach parent it is not nested in."""
        producers = self.producers(step)
        if JOIN_INPUTS in producers and self.step(producers[JOIN_INPUTS]).options.foreach:
            return producers[JOIN_INPUTS]
        nested = self.nested_in(step)
        candidates = [p for p in self.parents(step) if self.step(p).options.foreach and p != nested]
        return candidates[-1] if candidates else None

    def nested_in(self, step: str) -> str | None:
        """For a foreach step whose ``--foreach`` variable a foreach step F writes: F."""
        spec = self.step(step)
        if spec.options.foreach is None:
            return None
        producer = self.producers(step).get(spec.options.foreach)
        if producer is not None and self.step(producer).options.foreach:
            return producer
        return None

    def to_json(self) -> dict:
        """The ``show`` document of DESIGN section 8."""
        return {
            "flow": self.name,
            "parameters": [{"name": p.name, "default": p.default, "type": p.type, "help": p.help}
                           for p in self.params],
            "steps": [{"name": s.name, "cell": s.cell, "reads": list(s.reads), "writes": list(s.writes),
                       "options": s.options.as_dict(), "next": self.children(s.name), "doc": s.doc}
                      for s in self.steps],
            "edges": [{"from": e.source, "to": e.target, "variables": list(e.variables),
                       "maybe": list(e.maybe)} for e in self.edges],
        }


def prelude_definitions(graph: FlowGraph, step: str) -> dict[str, PreludeDef]:
    """The prelude names ``step`` uses: those it reads, and those the defs it
    uses read, transitively (a def's edit reaches the steps calling it)."""
    defs = graph.prelude_defs
    used: dict[str, PreludeDef] = {}
    frontier = [n for n in graph.step(step).reads if n in defs]
    while frontier:
        name = frontier.pop()
        if name in used:
            continue
        used[name] = defs[name]
        frontier += [n for n in defs[name].reads if n in defs and n not in used]
    return used


def _in_step_order(graph: FlowGraph, names: set[str]) -> list[str]:
    return sorted(names, key=graph._index.__getitem__)


# --- building ------------------------------------------------------------------

def flow_name_from_cells(cells: Sequence[str]) -> str | None:
    """The NAME of the last ``%flow name NAME`` line in an ordinary cell, if any."""
    found = None
    for index, source in enumerate(cells):
        if "%flow" not in source:
            continue
        cell = classify_cell(source, index)
        if cell.kind == "ordinary":
            found = flow_name_in(source, cell=index) or found
    return found


DEFAULT_FLOW_NAME = "Flow"


def build_flow(cells: Sequence[str], name: str | None = None) -> FlowGraph:
    """The flow defined by ``cells`` (source of every cell, in order; "" for
    markdown/raw cells so indices match). Without ``name``, the flow is named
    by a ``%flow name NAME`` line, else "Flow". Raises FlowDefinitionError."""
    parsed = [classify_cell(source, index) for index, source in enumerate(cells)]
    prelude = _Prelude.collect(parsed)
    params = _collect_params(parsed)
    drafts = [_analyse_step(cell, prelude) for cell in parsed if cell.kind == "step"]
    _check_unique_steps(drafts)
    resolver = _Resolver(prelude, {p.name: p for p in params}, drafts)
    for draft in drafts:
        resolver.add(draft)
    return FlowGraph(
        name=name or flow_name_from_cells(cells) or DEFAULT_FLOW_NAME,
        prelude=prelude.source,
        params=tuple(params),
        steps=tuple(resolver.steps),
        edges=tuple(sorted(resolver.edges, key=lambda e: (resolver.specs[e.target].cell,
                                                          resolver.specs[e.source].cell))),
        warnings=tuple(resolver.warnings()),
        prelude_defs=prelude.definitions(),
    )


@dataclass
class _Prelude:
    source: str
    defines: dict[str, int]                 # name -> cell
    computes: dict[str, tuple[int, int]]    # name -> (cell, line): bound by a non-prelude statement
    computed_in: dict[str, list[int]]       # name -> every ordinary cell that computes it
    global_reads: dict[str, frozenset[str]]  # def/class -> non-prelude globals it reads, transitively
    star_imports: tuple[str, ...] = ()      # `from M import *` modules: any other name may come from them
    texts: dict[str, str] = field(default_factory=dict)          # prelude name -> its statement's text
    direct: dict[str, frozenset[str]] = field(default_factory=dict)  # def/class -> every global it reads

    defined_in: dict[str, list[int]] = field(default_factory=dict)  # name -> every cell defining it

    def definitions(self) -> dict[str, PreludeDef]:
        return {name: PreludeDef(cell, self.texts.get(name, ""), self.direct.get(name, frozenset()),
                                 tuple(self.defined_in.get(name, [cell])))
                for name, cell in self.defines.items()}

    @classmethod
    def collect(cls, cells: Sequence[ParsedCell]) -> _Prelude:
        chunks: list[str] = []
        defines: dict[str, int] = {}
        computes: dict[str, tuple[int, int]] = {}
        computed_in: dict[str, list[int]] = {}
        direct: dict[str, frozenset[str]] = {}
        texts: dict[str, str] = {}
        defined_in: dict[str, list[int]] = {}
        stars: list[str] = []
        for cell in cells:
            if cell.kind != "ordinary":
                continue
            part = _prelude_part(cell)
            if part is None:
                continue
            if part.source:
                chunks.append(f"# cell {cell_number(cell.index)}\n{part.source}")
            for var in part.defines:
                defines[var] = cell.index
                defined_in.setdefault(var, []).append(cell.index)
                computes.pop(var, None)
            for var, line in part.computes.items():
                computes[var] = (cell.index, line)
                computed_in.setdefault(var, []).append(cell.index)
                defines.pop(var, None)  # computed by a later cell: no longer a prelude name
            direct.update(part.global_reads)
            texts.update(part.texts)
            stars += part.star_imports
        closure = _transitive_reads(direct, set(defines))
        return cls("".join(chunks), defines, computes, computed_in, closure, tuple(stars), texts, direct,
                   defined_in)


def _prelude_part(cell: ParsedCell) -> PreludePart | None:
    try:
        code, tree = prepare_code(cell.body, f"<cell {cell_number(cell.index)}>", check=False)
    except SyntaxError:
        # A broken exploratory cell defines nothing, as when the kernel runs it.
        return None
    return split_prelude(tree, code)


def _transitive_reads(direct: Mapping[str, frozenset[str]], prelude_names: set[str]) -> dict[str, frozenset[str]]:
    """For each prelude def/class: the globals it reads, through other prelude
    functions too, that the prelude itself does not define."""
    closure: dict[str, frozenset[str]] = {}
    for start in direct:
        seen = {start}
        frontier = [start]
        external: set[str] = set()
        while frontier:
            for var in direct.get(frontier.pop(), ()):
                if var in direct and var not in seen:
                    seen.add(var)
                    frontier.append(var)
                elif var not in prelude_names and var not in BUILTIN_NAMES:
                    external.add(var)
        if external:
            closure[start] = frozenset(external)
    return closure


def _collect_params(cells: Sequence[ParsedCell]) -> list[Parameter]:
    params: dict[str, Parameter] = {}
    for cell in cells:
        if cell.kind != "params":
            continue
        for decl in parse_params(cell):
            if decl.name in params:
                raise FlowDefinitionError(
                    f"parameter {decl.name!r} is declared twice "
                    f"(cells {cell_number(params[decl.name].cell)} and {cell_number(cell.index)})",
                    cell=cell.index, line=decl.line, variable=decl.name)
            params[decl.name] = decl
    return list(params.values())


@dataclass(frozen=True)
class _Draft:
    cell: ParsedCell
    code: str
    analysis: CellAnalysis
    docstring: str | None
    analysis_tree: ast.Module

    @property
    def name(self) -> str:
        return self.cell.step_name or ""

    def cell_line(self, code_line: int) -> int:
        return self.cell.body_line + code_line - 1


def _analyse_step(cell: ParsedCell, prelude: _Prelude) -> _Draft:
    step = cell.step_name
    try:
        code, tree = prepare_code(cell.body, f"<step {step}>")
    except SyntaxError as exc:
        line = cell.body_line + (exc.lineno or 1) - 1
        raise FlowDefinitionError(f"syntax error: {exc.msg}", step=step, cell=cell.index, line=line) from None
    try:
        analysis = analyze_cell(tree, prelude.global_reads)
    except RecursionError:  # Python 3.13 compiles a 5,000-term chain that an AST walk cannot follow
        raise FlowDefinitionError("syntax error: this code is nested too deeply to analyse (a very long "
                                  "expression, or deeply nested brackets): split it into several statements",
                                  step=step, cell=cell.index, line=cell.body_line) from None
    draft = _Draft(cell, code, analysis, ast.get_docstring(tree), tree)
    if analysis.star_import_line is not None:
        raise FlowDefinitionError(
            "`from ... import *` is not allowed in a step: its names cannot be known before it runs; "
            "import the names you use, or move the import to an ordinary cell",
            step=step, cell=cell.index, line=draft.cell_line(analysis.star_import_line))
    return draft


def _check_unique_steps(drafts: Sequence[_Draft]) -> None:
    seen: dict[str, int] = {}
    for draft in drafts:
        if draft.name in seen:
            raise FlowDefinitionError(
                f"two steps are named {draft.name!r} "
                f"(cells {cell_number(seen[draft.name])} and {cell_number(draft.cell.index)}); rename one",
                step=draft.name, cell=draft.cell.index)
        seen[draft.name] = draft.cell.index


class _Resolver:
    """Wires each step's reads to the nearest preceding writer, in notebook order."""

    def __init__(self, prelude: _Prelude, params: Mapping[str, Parameter], drafts: Sequence[_Draft]) -> None:
        self.prelude = prelude
        self.params = params
        self.drafts = drafts                      # every step, for error messages
        self.latest_writer: dict[str, str] = {}   # variable -> nearest writer so far
        self.writers: dict[str, list[str]] = {}   # variable -> every writer so far, notebook order
        self.ancestors: dict[str, set[str]] = {}  # step -> every step it depends on
        self.by_name = {d.name: d for d in drafts}
        # (step, variable) -> upstream writer, for a pass-through maybe-read: wired only
        # once a later step reads the variable from that step (see CellAnalysis.pass_through).
        self.pending: dict[tuple[str, str], str] = {}
        self.specs: dict[str, StepSpec] = {}
        self.steps: list[StepSpec] = []
        self.edges: list[Edge] = []

    def add(self, draft: _Draft) -> None:
        options = draft.cell.options
        writes = self._writes(draft, options)
        producers: dict[str, str] = {}   # variable -> producing step
        reads: set[str] = set()
        if options.foreach:
            producers[options.foreach] = self._foreach_producer(draft, options.foreach)
            reads.add(options.foreach)
        analysis = draft.analysis
        for var, line in sorted(analysis.reads.items(), key=lambda item: (item[1], item[0])):
            self._resolve(draft, var, line, options, producers, reads, required=True)
        for var, line in sorted(analysis.maybe_reads.items(), key=lambda item: (item[1], item[0])):
            if var in analysis.pass_through and self.latest_writer.get(var) and not var.startswith("_"):
                self.pending[(draft.name, var)] = self.latest_writer[var]
                continue
            self._resolve(draft, var, line, options, producers, reads, required=False)
        maybe = {var for var in producers if var in analysis.maybe_reads and var not in analysis.reads}
        if JOIN_INPUTS in analysis.reads:
            # After the other reads: `inputs` follows the foreach step they come from.
            producers[JOIN_INPUTS] = self._inputs_producer(draft, producers, options)
            reads.add(JOIN_INPUTS)
        spec = StepSpec(
            name=draft.name, cell=draft.cell.index, source=draft.cell.body, code=draft.code,
            body_line=draft.cell.body_line, reads=tuple(sorted(reads)), writes=tuple(sorted(writes)),
            options=options, doc=_doc_line(draft.cell.body, draft.docstring))
        for producer in sorted(set(producers.values())):
            for var in sorted(v for v, p in producers.items() if p == producer):
                self._activate_pass_through(producer, var)
        ordering = [self._after_step(draft, name) for name in options.after]
        # Ordering first: `--after` is the fix the sibling-writer error suggests.
        self.ancestors[spec.name] = self._ancestors_of(set(producers.values()) | set(ordering))
        for var, producer in sorted(producers.items()):
            self._check_single_writer(draft, var, producer)
        self._add_edges(spec, producers, ordering, maybe)
        self.specs[spec.name] = spec
        self.steps.append(spec)
        for var in writes:
            self.latest_writer[var] = spec.name
            self.writers.setdefault(var, []).append(spec.name)

    def _activate_pass_through(self, step: str, var: str) -> None:
        """A later step reads ``var`` from ``step``, which may not bind it: wire
        ``step`` to the upstream writer whose value then passes through."""
        upstream = self.pending.pop((step, var), None)
        if upstream is None:
            return
        self._activate_pass_through(upstream, var)
        self._check_single_writer(self.by_name[step], var, upstream)
        spec = self.specs[step]
        updated = dataclasses.replace(spec, reads=tuple(sorted(set(spec.reads) | {var})))
        self.specs[step] = updated
        self.steps[self.steps.index(spec)] = updated
        edge = next((e for e in self.edges if e.source == upstream and e.target == step), None)
        if edge is None:
            self.edges.append(Edge(upstream, step, (var,), (var,)))
        else:
            self.edges[self.edges.index(edge)] = Edge(upstream, step, tuple(sorted(set(edge.variables) | {var})),
                                                      tuple(sorted(set(edge.maybe) | {var})))
        self._recompute_ancestors()

    def _recompute_ancestors(self) -> None:
        for spec in self.steps:
            self.ancestors[spec.name] = self._ancestors_of({e.source for e in self.edges if e.target == spec.name})

    def _after_step(self, draft: _Draft, name: str) -> str:
        if name in self.specs:
            return name
        later = next((d for d in self.drafts if d.name == name), None)
        if later is not None:
            advice = f"step {name!r} (cell {cell_number(later.cell.index)}) is further down: move this step below it"
        else:
            close = difflib.get_close_matches(name, [d.name for d in self.drafts], n=1)
            advice = f"no step is named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        raise FlowDefinitionError(f"--after {name}: {advice}", step=draft.name, cell=draft.cell.index,
                                  line=draft.cell.body_line - 1)

    def _ancestors_of(self, parents: set[str]) -> set[str]:
        found = set(parents)
        for parent in parents:
            found |= self.ancestors[parent]
        return found

    def _unordered_writer(self, var: str, writer: str) -> str | None:
        """The nearest earlier writer of ``var`` that ``writer`` does not depend on."""
        for other in reversed(self.writers.get(var, [])):
            if other != writer and self.specs[other].cell < self.specs[writer].cell \
                    and other not in self.ancestors.get(writer, ()):
                return other
        return None

    def _check_single_writer(self, draft: _Draft, var: str, producer: str) -> None:
        """Two steps that write ``var`` with no dependency between them are
        siblings: which value a reader gets would depend on cell order alone
        (Metaflow refuses such a join), so say so instead of picking one."""
        sibling = self._unordered_writer(var, producer)
        if sibling is None:
            return
        first, second = self._where_written(sibling, var), self._where_written(producer, var)
        raise FlowDefinitionError(
            f"reads {var!r}, which both step {sibling!r} ({first}) and step {producer!r} ({second}) "
            f"write, and neither depends on the other: the value would depend on cell order. "
            f"Rename it in one of them, or make one depend on the other "
            f"(`%%step {producer} --after {sibling}`)",
            step=draft.name, cell=draft.cell.index, variable=var,
            line=draft.cell_line(self._read_line(draft, var)))

    def _read_line(self, draft: _Draft, var: str) -> int:
        analysis = draft.analysis
        return analysis.reads.get(var) or analysis.maybe_reads.get(var) or 1

    def _where_written(self, step: str, var: str) -> str:
        draft = self.by_name[step]
        line = binding_line(draft.analysis_tree, var)
        where = f"cell {cell_number(draft.cell.index)}"
        return f"{where}, line {draft.cell_line(line)}" if line else where

    def warnings(self) -> list[str]:
        """Outputs no step reads that a sibling step writes again further down."""
        read_from = {(e.source, var) for e in self.edges for var in e.variables}
        found = []
        for var, writers in sorted(self.writers.items()):
            for index, writer in enumerate(writers):
                if (writer, var) in read_from:
                    continue
                draft = self.by_name[writer]
                if not assignment_lines(draft.analysis_tree, var):
                    continue  # loop targets, imports, `with ... as`: scratch names by nature
                later = [w for w in writers[index + 1:] if writer not in self.ancestors[w]]
                if later:
                    found.append(
                        f"step {writer!r} ({self._where_written(writer, var)}) writes {var!r}, which no "
                        f"step reads: step {later[0]!r} (cell {cell_number(self.specs[later[0]].cell)}) writes it too "
                        f"and does not depend on {writer!r}, so later steps see that value; rename one "
                        f"if both are meant to be used")
        return found + self._unordered_steps_warning()

    def _unordered_steps_warning(self) -> list[str]:
        """Steps that share no data with any other (they only print, say) run
        at once, in no order: Metaflow users expect start, ..., end."""
        linked = {e.source for e in self.edges} | {e.target for e in self.edges}
        # Only steps without outputs: parallel steps that compute something are what a DAG is for.
        alone = [s for s in self.steps if s.name not in linked and not s.writes]
        if len(self.steps) < 2 or not alone:
            return []
        names = ", ".join(f"{s.name!r} (cell {cell_number(s.cell)})" for s in alone)
        example = alone[-1].name
        before = next((s.name for s in reversed(self.steps) if s.cell < alone[-1].cell), self.steps[-1].name)
        if before == example:
            example, before = self.steps[-1].name, alone[-1].name
        return [f"{'steps' if len(alone) > 1 else 'step'} {names} {'share' if len(alone) > 1 else 'shares'} "
                f"no data with any other step, so "
                f"{'they run' if len(alone) > 1 else 'it runs'} in no particular order; to order steps "
                f"without data, add --after to the %%step line (`%%step {example} --after {before}`)"]

    def _writes(self, draft: _Draft, options: StepOptions) -> set[str]:
        # `input`/`inputs` are bound by the runtime and never artifacts (`for input in inputs:`).
        writes = {var for var in draft.analysis.writes
                  if not var.startswith("_") and var not in (FOREACH_ITEM, JOIN_INPUTS)}
        if options.catch:
            writes.add(options.catch)
        for var in sorted(writes):
            if var in self.params:
                raise FlowDefinitionError(
                    f"writes {var!r}, which is a parameter (cell {cell_number(self.params[var].cell)}); parameters are "
                    "read-only in steps: assign the value to a new name",
                    step=draft.name, cell=draft.cell.index, variable=var)
        return writes

    def _foreach_producer(self, draft: _Draft, var: str) -> str:
        producer = self.latest_writer.get(var)
        if producer is not None:
            return producer
        if var in self.params:
            advice = ("a parameter cannot be iterated over directly: "
                      f"in an earlier step write `{var}_items = list({var})`")
        elif (later := self._later_writer(draft, var)) is not None:
            advice = f"step {later[0]!r} (cell {cell_number(later[1])}) writes it further down: move this step below it"
        else:
            advice = f"assign the list of items in an earlier step (for example `{var} = [...]`)"
        raise FlowDefinitionError(
            f"--foreach {var}: no step above this one writes {var!r}; {advice}",
            step=draft.name, cell=draft.cell.index, variable=var, line=draft.cell.body_line - 1)

    def _resolve(self, draft: _Draft, var: str, line: int, options: StepOptions,
                 producers: dict[str, str], reads: set[str], *, required: bool) -> None:
        if var == FOREACH_ITEM and options.foreach:
            return  # the runtime binds this task's item
        if var == JOIN_INPUTS:
            return  # wired after the other reads
        if var.startswith("__") and var.endswith("__"):
            return  # module dunders (__name__, ...) exist in every namespace
        producer = self.latest_writer.get(var)
        if producer is not None and not var.startswith("_"):
            self._check_not_recomputed(draft, var, line, self.specs[producer].cell, f"step {producer!r}")
            producers[var] = producer
            reads.add(var)
        elif var in self.params:
            self._check_not_recomputed(draft, var, line, self.params[var].cell, "the parameter")
            reads.add(var)
        elif var in self.prelude.defines:
            reads.add(var)
        elif var in BUILTIN_NAMES or not required:
            return
        elif self.prelude.star_imports and var not in self.prelude.computes and not var.startswith("_"):
            reads.add(var)  # may come from `from M import *`: only running the prelude can tell
        else:
            raise self._unresolved(draft, var, line)

    def _check_not_recomputed(self, draft: _Draft, var: str, line: int, source_cell: int, source: str) -> None:
        """An ordinary cell between the producer and the step that rebinds the
        name would change it under Run All but not in a flow run."""
        between = [c for c in self.prelude.computed_in.get(var, ()) if source_cell < c < draft.cell.index]
        if between:
            raise FlowDefinitionError(
                f"reads {var!r} from {source} (cell {cell_number(source_cell)}), "
                f"but ordinary cell {cell_number(between[-1])} "
                "assigns it in between, which a flow run would not see: make that cell a step, "
                "or use another name there", step=draft.name, cell=draft.cell.index, variable=var,
                line=draft.cell_line(line))

    def _inputs_producer(self, draft: _Draft, producers: Mapping[str, str], options: StepOptions) -> str:
        nested_in = producers.get(options.foreach) if options.foreach else None
        feeding = {p for p in producers.values() if self.specs[p].options.foreach and p != nested_in}
        if len(feeding) > 1:
            names = ", ".join(sorted(feeding, key=lambda s: self.specs[s].cell))
            raise FlowDefinitionError(
                f"`inputs` is ambiguous: this step reads from several foreach steps ({names}); "
                "read their variables by name instead", step=draft.name, cell=draft.cell.index,
                variable=JOIN_INPUTS)
        if feeding:
            return feeding.pop()
        for spec in reversed(self.steps):
            if spec.options.foreach and spec.name != nested_in:
                return spec.name
        raise FlowDefinitionError(
            "reads `inputs`, which only a join has (the step after a `--foreach` step); "
            "no foreach step comes before this one", step=draft.name, cell=draft.cell.index,
            variable=JOIN_INPUTS)

    def _unresolved(self, draft: _Draft, var: str, line: int) -> FlowDefinitionError:
        via = draft.analysis.via.get(var)
        what = f"reads {var!r}" + (f" (through {via}(), which uses it as a global)" if via else "")
        where = dict(step=draft.name, cell=draft.cell.index, variable=var, line=draft.cell_line(line))
        if var.startswith("_"):
            return FlowDefinitionError(
                f"{what}, but names starting with '_' are private to their cell and never passed "
                "between steps; rename it without the leading '_'", **where)
        later = self._later_writer(draft, var)
        if later is not None:
            return FlowDefinitionError(
                f"{what}, which no step above it writes; step {later[0]!r} (cell {cell_number(later[1])}) writes it "
                "further down: move this step below it", **where)
        if var in self.prelude.computes:
            cell, _ = self.prelude.computes[var]
            return FlowDefinitionError(
                f"{what}, which ordinary cell {cell_number(cell)} computes; steps only see imports, defs, classes "
                "and constants of ordinary cells: make that cell a step, or a parameter", **where)
        known = set(self.latest_writer) | set(self.params) | set(self.prelude.defines)
        close = difflib.get_close_matches(var, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return FlowDefinitionError(
            f"{what}, which no step above it writes and no parameter, import, def, class or "
            f"constant defines{hint}", **where)

    def _later_writer(self, draft: _Draft, var: str) -> tuple[str, int] | None:
        for later in self.drafts:
            if later.cell.index > draft.cell.index and var in later.analysis.writes:
                return later.name, later.cell.index
        return None

    def _add_edges(self, spec: StepSpec, producers: Mapping[str, str], ordering: Sequence[str] = (),
                   maybe: set[str] | frozenset[str] = frozenset()) -> None:
        by_source: dict[str, list[str]] = {source: [] for source in ordering}
        for var, source in producers.items():
            by_source.setdefault(source, []).append(var)
        for source in sorted(by_source, key=lambda s: self.specs[s].cell):
            variables = tuple(sorted(by_source[source]))
            self.edges.append(Edge(source, spec.name, variables, tuple(v for v in variables if v in maybe)))


def assignment_lines(tree: ast.AST, var: str) -> list[int]:
    """Lines where ``var`` is the target of an assignment (``=``, ``+=``, ``:=``, ``x: T =``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and name.id == var:
                    lines.append(node.lineno)
    return sorted(lines)


def binding_line(tree: ast.AST, var: str) -> int | None:
    """The first line that binds or mutates ``var`` anywhere in the cell."""
    lines = assignment_lines(tree, var)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == var and isinstance(node.ctx, (ast.Store, ast.Del)):
            lines.append(node.lineno)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == var:
            lines.append(node.lineno)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            lines += [node.lineno for a in node.names if (a.asname or a.name.split(".")[0]) == var]
        elif isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(node.ctx, ast.Store):
            base = node.value
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name) and base.id == var:
                lines.append(node.lineno)
    return min(lines) if lines else None


def _doc_line(body: str, docstring: str | None) -> str:
    """The first comment line of the body, else its docstring's first line."""
    for line in body.splitlines():
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            return text.lstrip("#").strip()
        break
    return docstring.strip().splitlines()[0] if docstring and docstring.strip() else ""

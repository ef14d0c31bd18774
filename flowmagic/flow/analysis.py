"""What one cell reads and writes: a pure AST analysis (DESIGN section 2).

The code is first turned into plain Python by IPython's own input transformer
(``%time x = f()``, ``!ls``, ``x?``), imported lazily so that this module and
:mod:`flowmagic.flow.graph` import without IPython.

The analysis is flow-sensitive at the cell's top level, which is what makes
"a flow run gives the values Run All gives" hold:

- a name loaded where no path of the cell has bound it yet is a *read*
  (it must come from upstream);
- a name loaded where only some paths bound it (``if``, ``try``, ``match``),
  or written but not bound on every path to the end of the cell, is a
  *maybe-read*: wired to upstream when a producer exists, harmless otherwise;
- loops are taken to run at least once, or every ``for i in ...`` would read
  an upstream ``i``;
- free names of functions and lambdas (run later, when called) are reads
  unless the cell binds them before the ``def``; maybe-reads when the cell
  binds them somewhere;
- ``%time stmt`` is analysed as ``stmt``; names a shell escape expands
  (``!ls {folder}``) are reads.
"""
from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flowmagic.flow.scopes import COMPREHENSIONS, free_names, header_expressions, nested_scope, top_level_bindings
from flowmagic.flow.prelude import PreludePart, split_prelude  # re-exported


_FLAGS = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


@dataclass(frozen=True)
class CellAnalysis:
    """Reads and writes of one cell's code; line numbers are 1-based in ``code``."""

    reads: Mapping[str, int]         # name -> first line: needed from upstream
    maybe_reads: Mapping[str, int]   # name -> line: from upstream if something provides it
    writes: frozenset[str]           # bound at top level or mutated (private names included)
    mutated: frozenset[str]          # written through `x[...] = `, `x.a = `, `del x[...]`
    via: Mapping[str, str] = field(default_factory=dict)  # read -> prelude function it came through
    star_import_line: int | None = None
    # Maybe-reads only because the cell may end without binding them (`if c: df = f()`):
    # upstream's value passes through, which matters only to a later step that reads it here.
    pass_through: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=1)
def _transformer():
    from IPython.core.inputtransformer2 import TransformerManager  # lazy: keep dag IPython-free
    return TransformerManager()


_LINE_MAGIC = re.compile(r"%[A-Za-z_]")


def _line_magics_only(source: str) -> str | None:
    """IPython's own rewrite of ``%name args`` lines at column 0, when they are the
    cell's only IPython syntax (``%load_ext flowmagic``): saves importing IPython
    (~0.5 s of every console command). None when anything else needs IPython."""
    lines, changed = [], False
    for line in source.splitlines():
        if _LINE_MAGIC.match(line):
            content = line[1:].rstrip()
            if content.endswith(("?", "\\")):
                return None  # help and continuation lines: let IPython do them
            name, _, args = content.partition(" ")
            lines.append(f"get_ipython().run_line_magic({name!r}, {args!r})")  # as inputtransformer2._tr_magic
            changed = True
        else:
            lines.append(line)
    first = next((ln for ln in lines if ln.strip()), "")
    if not changed or first[:1] in (" ", "\t"):
        return None
    code = "\n".join(lines) + "\n"
    try:
        compile(code, "<cell>", "exec", _FLAGS)
    except SyntaxError:
        return None
    return code


def transform_ipython(source: str) -> str:
    """Plain Python for a cell body, keeping line numbers (IPython drops leading blank lines)."""
    if not source.strip():
        return ""
    fast = _line_magics_only(source)
    if fast is not None:
        return fast
    leading = len(source) - len(source.lstrip("\n\r \t"))
    blank_lines = source[:leading].count("\n")
    # IPython strips a uniform leading indent too; only whole blank lines shift numbering.
    return "\n" * blank_lines + _transformer().transform_cell(source)


def parse_code(code: str, filename: str = "<cell>", *, check: bool = True) -> ast.Module:
    """Parse plain Python (top-level ``await`` allowed); raises SyntaxError.
    ``check`` also runs the compiler's checks (``return`` or ``break`` at top level)."""
    tree = compile(code, filename, "exec", _FLAGS)
    if check:
        compile(tree, filename, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return tree


def prepare_code(source: str, filename: str = "<cell>", *, check: bool = True) -> tuple[str, ast.Module]:
    """Plain Python for a cell body and its AST; raises SyntaxError.

    Source that already parses as Python is what IPython's transformer would
    return unchanged (its transforms only touch lines that are not valid
    Python: magics, ``!``, ``?``, prompts, a leading indent), so it skips
    the transformer, and the IPython import, entirely.
    """
    try:
        try:
            tree = compile(source, filename, "exec", _FLAGS)
        except SyntaxError:
            code = transform_ipython(source)
            return code, parse_code(code, filename, check=check)
        if check:
            compile(tree, filename, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except RecursionError:  # CPython's parser recurses per operand of a long chain (1+1+... 5,000 times)
        raise SyntaxError("this code is nested too deeply for Python to compile (a very long expression, "
                          "or deeply nested brackets): split it into several statements",
                          (filename, 1, 1, "")) from None
    return (source if source.endswith("\n") or not source else source + "\n"), tree


def analyze_cell(tree: ast.Module, prelude_reads: Mapping[str, frozenset[str]] | None = None) -> CellAnalysis:
    """Reads/writes of a parsed cell. ``prelude_reads`` maps prelude functions and
    classes to the globals they read (transitively); loading one counts as
    loading those globals."""
    visitor = _CellVisitor(top_level_bindings(tree.body), prelude_reads or {})
    visitor.block(tree.body)
    return visitor.result()


def _join(*states):
    live = [s for s in states if s is not None]
    if not live:
        return None
    result = set(live[0])
    for state in live[1:]:
        result &= state
    return result


class _CellVisitor:
    """Walks the top level in order, tracking which names are surely bound."""

    def __init__(self, all_bound: set[str], prelude_reads: Mapping[str, frozenset[str]]) -> None:
        self.all_bound = all_bound
        self.prelude_reads = prelude_reads
        self.bound: set[str] | None = set()
        self.ever: set[str] = set()
        self.deleted: set[str] = set()
        self.reads: dict[str, int] = {}
        self.maybe: dict[str, int] = {}
        self.via: dict[str, str] = {}
        self.mutated: set[str] = set()
        self.first_bind: dict[str, int] = {}
        self.star_line: int | None = None
        self.loops: list[tuple[list, list]] = []  # (break states, continue states)

    def result(self) -> CellAnalysis:
        writes = (self.ever - self.deleted) | self.mutated
        maybe = dict(self.maybe)
        if self.bound is not None:
            for name in sorted(writes - self.bound - self.mutated):
                maybe.setdefault(name, self.first_bind.get(name, 1))
        for name in self.reads:
            maybe.pop(name, None)
        pass_through = frozenset(name for name in maybe if name not in self.maybe)
        return CellAnalysis(reads=dict(self.reads), maybe_reads=maybe, writes=frozenset(writes),
                            mutated=frozenset(self.mutated), via=dict(self.via),
                            star_import_line=self.star_line, pass_through=pass_through)

    # names ---------------------------------------------------------------
    def load(self, name: str, line: int, *, deferred: bool = False, via: str | None = None) -> None:
        if self.bound is None or name in self.bound:
            return  # unreachable code, or surely bound here
        required = name not in (self.all_bound if deferred else self.ever)
        if required:
            if name not in self.reads:
                self.reads[name] = line
                if via:
                    self.via[name] = via
        else:
            if name not in self.maybe and name not in self.reads:
                self.maybe[name] = line
                if via:
                    self.via[name] = via
        if via is None:
            for indirect in sorted(self.prelude_reads.get(name, ())):
                self.load(indirect, line, deferred=True, via=name)

    def bind(self, name: str, line: int) -> None:
        if self.bound is not None:
            self.bound.add(name)
        self.ever.add(name)
        self.deleted.discard(name)
        self.first_bind.setdefault(name, line)

    def unbind(self, name: str) -> None:
        if self.bound is not None:
            self.bound.discard(name)
        self.deleted.add(name)

    # statements ------------------------------------------------------------
    def block(self, body: Iterable[ast.stmt]) -> None:
        for stmt in body:
            self.stmt(stmt)

    def stmt(self, node: ast.stmt) -> None:
        method = getattr(self, "stmt_" + type(node).__name__, None)
        if method is not None:
            method(node)
        else:  # Expr, Assert, Pass, Return...: only expressions
            for child in ast.iter_child_nodes(node):
                self.expr(child)

    def stmt_Assign(self, node: ast.Assign) -> None:
        self.expr(node.value)
        for target in node.targets:
            self.target(target)

    def stmt_AugAssign(self, node: ast.AugAssign) -> None:
        self.expr(node.value)
        if isinstance(node.target, ast.Name):
            self.load(node.target.id, node.lineno)
        self.target(node.target)

    def stmt_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.expr(node.annotation)
        if node.value is not None:
            self.expr(node.value)
            self.target(node.target)
        elif not isinstance(node.target, ast.Name):
            self.expr(node.target)

    def stmt_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.load(target.id, target.lineno)
                self.unbind(target.id)
            else:
                self.target(target)

    def stmt_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.bind(alias.asname or alias.name.split(".")[0], node.lineno)

    def stmt_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                if self.star_line is None:
                    self.star_line = node.lineno
            else:
                self.bind(alias.asname or alias.name, node.lineno)

    def stmt_FunctionDef(self, node: ast.AST) -> None:
        self.nested(node)
        self.bind(node.name, node.lineno)

    stmt_AsyncFunctionDef = stmt_ClassDef = stmt_FunctionDef

    def stmt_Global(self, node: ast.Global) -> None:
        pass  # a no-op at module level

    def stmt_If(self, node: ast.If) -> None:
        self.expr(node.test)
        before = self._copy()
        self.block(node.body)
        after_body = self.bound
        self.bound = before
        self.block(node.orelse)
        self.bound = _join(after_body, self.bound)

    def stmt_For(self, node: ast.For) -> None:
        self.expr(node.iter)
        self._loop(node, lambda: self.target(node.target), always_enters=False)

    stmt_AsyncFor = stmt_For

    def stmt_While(self, node: ast.While) -> None:
        self.expr(node.test)
        forever = isinstance(node.test, ast.Constant) and bool(node.test.value)
        self._loop(node, lambda: None, always_enters=forever)

    def _loop(self, node: ast.AST, bind_target, always_enters: bool) -> None:
        before = self._copy()
        self.loops.append(([], []))
        bind_target()
        self.block(node.body)
        breaks, continues = self.loops.pop()
        # A loop is taken to run at least once: otherwise every loop variable
        # (`for i in ...`) would look like a read of an upstream `i`. It ends
        # normally after its last iteration (never, for `while True`).
        normal = None if always_enters else _join(self.bound, *continues)
        if normal is None and not breaks and not always_enters:
            normal = before  # every iteration raises: only an empty loop gets past it
        self.bound = normal
        if self.bound is not None:
            self.block(node.orelse)
        self.bound = _join(self.bound, *breaks)

    def stmt_Break(self, node: ast.Break) -> None:
        if self.loops:
            self.loops[-1][0].append(self._copy())
        self.bound = None

    def stmt_Continue(self, node: ast.Continue) -> None:
        if self.loops:
            self.loops[-1][1].append(self._copy())
        self.bound = None

    def stmt_Raise(self, node: ast.Raise) -> None:
        for child in ast.iter_child_nodes(node):
            self.expr(child)
        self.bound = None

    def stmt_With(self, node: ast.With) -> None:
        for item in node.items:
            self.expr(item.context_expr)
            if item.optional_vars is not None:
                self.target(item.optional_vars)
        self.block(node.body)

    stmt_AsyncWith = stmt_With

    def stmt_Try(self, node: ast.Try) -> None:
        before = self._copy()
        self.block(node.body)
        self.block(node.orelse)
        exits = [self.bound]
        for handler in node.handlers:
            self.bound = set(before) if before is not None else None
            if handler.type is not None:
                self.expr(handler.type)
            if handler.name:
                self.bind(handler.name, handler.lineno)
            self.block(handler.body)
            if handler.name:  # Python deletes the `as` name when the handler ends
                self.unbind(handler.name)
            exits.append(self.bound)
        self.bound = _join(*exits)
        if node.finalbody:
            if self.bound is None:  # every path raised: finally still runs
                self.bound = set(before) if before is not None else None
            self.block(node.finalbody)

    stmt_TryStar = stmt_Try

    def stmt_Match(self, node: ast.Match) -> None:
        self.expr(node.subject)
        before = self._copy()
        exits = []
        irrefutable = False
        for case in node.cases:
            self.bound = set(before) if before is not None else None
            self.pattern(case.pattern)
            if case.guard is not None:
                self.expr(case.guard)
            self.block(case.body)
            exits.append(self.bound)
            if case.guard is None and isinstance(case.pattern, ast.MatchAs) and case.pattern.pattern is None:
                irrefutable = True
        if not irrefutable:
            exits.append(before)
        self.bound = _join(*exits)

    def pattern(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, (ast.MatchAs, ast.MatchStar)) and sub.name:
                self.bind(sub.name, node.lineno)
            elif isinstance(sub, ast.MatchMapping) and sub.rest:
                self.bind(sub.rest, node.lineno)
            elif isinstance(sub, ast.MatchValue):
                self.expr(sub.value)
            elif isinstance(sub, ast.MatchClass):
                self.expr(sub.cls)
            elif isinstance(sub, ast.MatchMapping):
                for key in sub.keys:
                    self.expr(key)

    def _copy(self):
        return set(self.bound) if self.bound is not None else None

    # targets and expressions --------------------------------------------------
    def target(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            self.bind(node.id, node.lineno)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                self.target(element)
        elif isinstance(node, ast.Starred):
            self.target(node.value)
        elif isinstance(node, (ast.Subscript, ast.Attribute)):
            # `df["c"] = ...` / `obj.x = ...`: the root object is read and changed.
            self.expr(node.value)
            if isinstance(node, ast.Subscript):
                self.expr(node.slice)
            root = _root_name(node)
            if root is not None:
                self.mutated.add(root)
                self.deleted.discard(root)

    def expr(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self.load(node.id, node.lineno)
            return
        if isinstance(node, ast.NamedExpr):
            self.expr(node.value)
            self.bind(node.target.id, node.lineno)
            return
        if isinstance(node, (ast.Lambda, *COMPREHENSIONS)):
            self.nested(node)
            return
        if isinstance(node, ast.Call):
            if self._ipython_magic(node):
                return
            self._shell_expansions(node)
        if isinstance(node, (ast.stmt, ast.expr_context)):
            return
        for child in ast.iter_child_nodes(node):
            self.expr(child)

    def nested(self, node: ast.AST) -> None:
        """A def, class, lambda or comprehension: header now, body by the deferred rule."""
        if isinstance(node, COMPREHENSIONS):
            self.expr(node.generators[0].iter)
        else:
            for header in header_expressions(node):
                self.expr(header)
        scope = nested_scope(node)
        for name in scope.walrus_binds:
            self.bind(name, node.lineno)
        for name, info in sorted(scope.free.items(), key=lambda item: item[1].line):
            self.load(name, info.line, deferred=info.deferred)
        for name in scope.global_binds:
            # Bound only when the function runs: a write, never surely bound.
            self.ever.add(name)
            self.deleted.discard(name)
            self.first_bind.setdefault(name, node.lineno)

    def _ipython_magic(self, node: ast.Call) -> bool:
        """`%time stmt` runs stmt in the user namespace: analyse its code in place."""
        magic = _line_magic(node)
        if magic is None:
            return False
        name, code, line = magic
        try:
            inner = ast.parse(code)
        except SyntaxError:
            return False
        ast.increment_lineno(inner, line - 1)
        if name == "time":
            self.block(inner.body)
        else:  # %timeit runs in a namespace of its own: it only reads
            saved = (self._copy(), set(self.ever), set(self.deleted), set(self.mutated))
            self.block(inner.body)
            self.bound, self.ever, self.deleted, self.mutated = saved
        return True


    def _shell_expansions(self, node: ast.Call) -> None:
        """`!ls {folder} $name` expands names from the namespace: they are reads."""
        command = _shell_command(node)
        if command is None:
            return
        from IPython.utils.text import DollarFormatter  # IPython's own expansion rules

        try:
            fields = [text for _, text, _, _ in DollarFormatter().parse(command) if text]
        except ValueError:
            return
        for text in fields:
            try:
                expression = ast.parse(text.strip(), mode="eval")
            except SyntaxError:
                continue
            ast.increment_lineno(expression, node.lineno - 1)
            self.expr(expression.body)


def _shell_command(node: ast.Call) -> str | None:
    """The command of `get_ipython().system('...')` / `.getoutput('...')` (a `!` line)."""
    func = node.func
    if (isinstance(func, ast.Attribute) and func.attr in ("system", "getoutput")
            and isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "get_ipython" and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def _line_magic(node: ast.Call) -> tuple[str, str, int] | None:
    """('time', 'x = f()', line) for `get_ipython().run_line_magic('time', 'x = f()')`."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "run_line_magic"
            and isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name)
            and func.value.func.id == "get_ipython" and len(node.args) == 2):
        return None
    name, code = node.args
    if not (isinstance(name, ast.Constant) and isinstance(code, ast.Constant)
            and isinstance(code.value, str) and name.value in ("time", "timeit")):
        return None
    return name.value, code.value, node.lineno


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


__all__ = ["CellAnalysis", "PreludePart", "analyze_cell", "free_names", "parse_code", "prepare_code",
           "split_prelude", "transform_ipython"]

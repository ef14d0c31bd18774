"""What one cell reads and writes: a pure AST analysis (DESIGN section 2).

The code is first turned into plain Python by IPython's own input transformer
(``%time x = f()``, ``!ls``, ``x?``), imported lazily so that this module and
:mod:`flowmagic.dag` import without IPython.

The analysis is flow-sensitive at the cell's top level, which is what makes
"a flow run gives the values Run All gives" hold:

- a name loaded where no path of the cell has bound it yet is a *read*
  (it must come from upstream);
- a name loaded where only some paths bound it (``if``, loop bodies,
  ``try``), or written but not bound on every path to the end of the cell, is a
  *maybe-read*: wired to upstream when a producer exists, harmless otherwise;
- free names of functions and lambdas (run later, when called) are reads
  unless the cell binds them before the ``def``; maybe-reads when the cell
  binds them somewhere.
"""
from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


_FLAGS = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@dataclass(frozen=True)
class CellAnalysis:
    """Reads and writes of one cell's code; line numbers are 1-based in ``code``."""

    reads: Mapping[str, int]         # name -> first line: needed from upstream
    maybe_reads: Mapping[str, int]   # name -> line: from upstream if something provides it
    writes: frozenset[str]           # bound at top level or mutated (private names included)
    mutated: frozenset[str]          # written through `x[...] = `, `x.a = `, `del x[...]`
    via: Mapping[str, str] = field(default_factory=dict)  # read -> prelude function it came through
    star_import_line: int | None = None


@functools.lru_cache(maxsize=1)
def _transformer():
    from IPython.core.inputtransformer2 import TransformerManager  # lazy: keep dag IPython-free
    return TransformerManager()


def transform_ipython(source: str) -> str:
    """Plain Python for a cell body, keeping line numbers (IPython drops leading blank lines)."""
    if not source.strip():
        return ""
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
        tree = compile(source, filename, "exec", _FLAGS)
    except SyntaxError:
        code = transform_ipython(source)
        return code, parse_code(code, filename, check=check)
    if check:
        compile(tree, filename, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return (source if source.endswith("\n") or not source else source + "\n"), tree


def analyze_cell(tree: ast.Module, prelude_reads: Mapping[str, frozenset[str]] | None = None) -> CellAnalysis:
    """Reads/writes of a parsed cell. ``prelude_reads`` maps prelude functions and
    classes to the globals they read (transitively); loading one counts as
    loading those globals."""
    visitor = _CellVisitor(_top_level_bindings(tree.body), prelude_reads or {})
    visitor.block(tree.body)
    return visitor.result()


def free_names(node: ast.AST) -> frozenset[str]:
    """Global names a def, class or lambda reads when it runs (its body's free names)."""
    return frozenset(_scope_free(node).free)


# --- nested scopes -------------------------------------------------------------

@dataclass
class _Free:
    line: int
    deferred: bool  # read when the function is called, not where it is defined


@dataclass
class _Scope:
    free: dict[str, _Free]
    global_binds: set[str]   # names a `global` statement lets the scope assign
    walrus_binds: set[str]   # comprehension walrus targets: bound in the enclosing scope


def _scope_free(node: ast.AST) -> _Scope:
    """Free names of one nested scope (function, lambda, class, comprehension)."""
    scope = _ScopeCollector(node)
    scope.collect()
    is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    is_comprehension = isinstance(node, _COMPREHENSIONS)
    global_binds = {name for name in scope.globals if name in scope.stores}
    walrus_binds = set(scope.walrus) if is_comprehension else set()
    local = set(scope.local)
    children = [_scope_free(child) for child in scope.children]
    for child in children:
        global_binds |= child.global_binds
        if is_comprehension:
            walrus_binds |= child.walrus_binds
        else:
            local |= child.walrus_binds
    free: dict[str, _Free] = {}
    for name, line in scope.loads.items():
        if (name not in local or name in scope.globals) and name not in walrus_binds:
            free.setdefault(name, _Free(line, is_function))
    for child in children:
        for name, info in child.free.items():
            # A class body's names are not visible inside its methods.
            visible = name in local and name not in scope.globals and not isinstance(node, ast.ClassDef)
            if not visible and name not in walrus_binds:
                free.setdefault(name, _Free(info.line, info.deferred or is_function))
    return _Scope(free, global_binds, walrus_binds)


class _ScopeCollector(ast.NodeVisitor):
    """Bindings and loads of one scope, without descending into nested scopes."""

    def __init__(self, node: ast.AST) -> None:
        self.node = node
        self.local: set[str] = set()
        self.stores: set[str] = set()
        self.globals: set[str] = set()
        self.walrus: set[str] = set()
        self.loads: dict[str, int] = {}
        self.children: list[ast.AST] = []

    def collect(self) -> None:
        node = self.node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self._arguments(node.args)
            body = node.body if isinstance(node.body, list) else [node.body]
            for stmt in body:
                self.visit(stmt)
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                self.visit(stmt)
        else:  # comprehension: the first iterable belongs to the enclosing scope
            for number, gen in enumerate(node.generators):
                self._bind_target(gen.target)
                if number:
                    self.visit(gen.iter)
                for cond in gen.ifs:
                    self.visit(cond)
            for part in ("elt", "key", "value"):
                if hasattr(node, part):
                    self.visit(getattr(node, part))
        # In comprehensions, walrus targets bind in the enclosing scope.
        if isinstance(node, _COMPREHENSIONS):
            self.local -= self.walrus

    def _arguments(self, args: ast.arguments) -> None:
        for arg in args.posonlyargs + args.args + args.kwonlyargs:
            self.local.add(arg.arg)
        for arg in (args.vararg, args.kwarg):
            if arg is not None:
                self.local.add(arg.arg)

    def _bind(self, name: str) -> None:
        self.local.add(name)
        self.stores.add(name)

    def _bind_target(self, target: ast.AST) -> None:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                self._bind(sub.id)
            elif isinstance(sub, (ast.Subscript, ast.Attribute)):
                self.visit(sub.value)
                if isinstance(sub, ast.Subscript):
                    self.visit(sub.slice)

    def _nested(self, node: ast.AST) -> None:
        self.children.append(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loads.setdefault(node.id, node.lineno)
        else:
            self._bind(node.id)
            if isinstance(node.ctx, ast.Del):
                self.loads.setdefault(node.id, node.lineno)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._bind(node.target.id)
        self.walrus.add(node.target.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.loads.setdefault(node.target.id, node.lineno)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.globals.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        pass  # resolved by the enclosing function scope, which is also nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._bind(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._bind(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self._bind(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._bind(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self._bind(node.rest)
        self.generic_visit(node)

    def _def_header(self, node: ast.AST) -> None:
        for expr in _header_expressions(node):
            self.visit(expr)
        self._nested(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._bind(node.name)
        self._def_header(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._bind(node.name)
        self._def_header(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._def_header(node)

    def _comprehension(self, node: ast.AST) -> None:
        self.visit(node.generators[0].iter)
        self._nested(node)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


def _header_expressions(node: ast.AST) -> list[ast.AST]:
    """Expressions of a def/class/lambda evaluated where it is defined."""
    exprs: list[ast.AST] = list(getattr(node, "decorator_list", []))
    if isinstance(node, ast.ClassDef):
        exprs += node.bases + [kw.value for kw in node.keywords]
        return exprs
    args = node.args
    exprs += [d for d in args.defaults + args.kw_defaults if d is not None]
    if not isinstance(node, ast.Lambda):
        for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if arg is not None and arg.annotation is not None:
                exprs.append(arg.annotation)
        if node.returns is not None:
            exprs.append(node.returns)
    return exprs


# --- the cell's top level ------------------------------------------------------

def _top_level_bindings(body: Iterable[ast.stmt]) -> set[str]:
    """Every name the cell's top level binds anywhere (for the deferred-read rule)."""
    collector = _ScopeCollector(ast.Module(body=list(body), type_ignores=[]))
    for stmt in collector.node.body:
        collector.visit(stmt)
    names = set(collector.local)
    for child in collector.children:
        scope = _scope_free(child)
        names |= scope.global_binds | scope.walrus_binds
    return names


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
        return CellAnalysis(reads=dict(self.reads), maybe_reads=maybe, writes=frozenset(writes),
                            mutated=frozenset(self.mutated), via=dict(self.via),
                            star_import_line=self.star_line)

    # names ---------------------------------------------------------------
    def load(self, name: str, line: int, *, deferred: bool = False, via: str | None = None) -> None:
        bound = self.bound if self.bound is not None else set()
        if name in bound:
            return
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
        body_end = _join(self.bound, *continues) if (self.bound is not None or continues) else None
        # The loop ends normally after zero or more iterations (never, for `while True`).
        self.bound = None if always_enters else _join(before, body_end)
        if self.bound is not None:
            self.block(node.orelse)
        self.bound = _join(self.bound, *breaks) if (self.bound is not None or breaks) else None

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
        if isinstance(node, (ast.Lambda, *_COMPREHENSIONS)):
            self.nested(node)
            return
        if isinstance(node, ast.Call) and self._ipython_magic(node):
            return
        if isinstance(node, (ast.stmt, ast.expr_context)):
            return
        for child in ast.iter_child_nodes(node):
            self.expr(child)

    def nested(self, node: ast.AST) -> None:
        """A def, class, lambda or comprehension: header now, body by the deferred rule."""
        if isinstance(node, _COMPREHENSIONS):
            self.expr(node.generators[0].iter)
        else:
            for header in _header_expressions(node):
                self.expr(header)
        scope = _scope_free(node)
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


# --- the prelude: what ordinary cells contribute -------------------------------

@dataclass(frozen=True)
class PreludePart:
    """What one ordinary cell gives the prelude, and what it computes besides."""

    source: str                            # kept statements, in order (plain Python)
    defines: Mapping[str, int]             # name -> line: imports, defs, classes, constants
    computes: Mapping[str, int]            # name -> line: bound by anything else (not prelude)
    global_reads: Mapping[str, frozenset[str]]  # def/class name -> globals its body reads


_LITERAL_NODES = (ast.Constant, ast.UnaryOp, ast.BinOp, ast.BoolOp, ast.Compare, ast.Tuple,
                  ast.List, ast.Dict, ast.Set, ast.unaryop, ast.operator, ast.boolop, ast.cmpop,
                  ast.expr_context)


def split_prelude(tree: ast.Module, code: str) -> PreludePart:
    """Keep imports, defs, classes and literal constants of an ordinary cell.

    Magics (``%load_ext``, ``%flow ...``) arrive as ``get_ipython()`` calls and
    are dropped like any other computation.
    """
    lines = code.splitlines()
    spans = [_span(stmt) for stmt in tree.body]
    kept: list[str] = []
    defines: dict[str, int] = {}
    computes: dict[str, int] = {}
    global_reads: dict[str, frozenset[str]] = {}
    for number, stmt in enumerate(tree.body):
        # The later binding of a name wins, as when the cell runs.
        if not _is_prelude_statement(stmt):
            for name in _top_level_bindings([stmt]):
                computes[name] = stmt.lineno
                defines.pop(name, None)
            continue
        for name in _prelude_bindings(stmt):
            defines[name] = stmt.lineno
            computes.pop(name, None)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            global_reads[stmt.name] = free_names(stmt)
        kept.append(_statement_text(stmt, number, spans, lines))
    source = "\n".join(kept) + "\n" if kept else ""
    return PreludePart(source, defines, computes, global_reads)


def _is_prelude_statement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef, ast.Pass)):
        return True
    if isinstance(stmt, ast.Assign):
        return all(_is_name_target(t) for t in stmt.targets) and _is_literal(stmt.value)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.value is not None and _is_literal(stmt.value)
    if isinstance(stmt, ast.Try):  # `try: import x` / `except ImportError: x = None`
        bodies = stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body]
        types_ok = all(h.type is None or _is_dotted_names(h.type) for h in stmt.handlers)
        return types_ok and all(_is_prelude_statement(s) for s in bodies)
    return False


def _prelude_bindings(stmt: ast.stmt) -> list[str]:
    """Names a prelude statement binds (cheaper than a full scope walk)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, ast.Import):
        return [a.asname or a.name.split(".")[0] for a in stmt.names]
    if isinstance(stmt, ast.ImportFrom):
        return [a.asname or a.name for a in stmt.names if a.name != "*"]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(stmt, ast.Try):
        bodies = stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body]
        return [name for s in bodies for name in _prelude_bindings(s)]
    return []


def _is_name_target(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return True
    return isinstance(node, (ast.Tuple, ast.List)) and all(_is_name_target(e) for e in node.elts)


def _is_literal(node: ast.AST) -> bool:
    """Literals and arithmetic on literals (``2 ** 10``), no names or calls."""
    return all(isinstance(sub, _LITERAL_NODES) for sub in ast.walk(node))


def _is_dotted_names(node: ast.AST) -> bool:
    if isinstance(node, ast.Tuple):
        return all(_is_dotted_names(e) for e in node.elts)
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _span(stmt: ast.stmt) -> tuple[int, int]:
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return first, stmt.end_lineno or stmt.lineno


def _statement_text(stmt: ast.stmt, number: int, spans: list[tuple[int, int]], lines: list[str]) -> str:
    first, last = spans[number]
    shares_line = (number > 0 and spans[number - 1][1] >= first) or (
        number + 1 < len(spans) and spans[number + 1][0] <= last)
    if shares_line:  # `import a; x = f()`: take only this statement
        return ast.unparse(stmt)
    return "\n".join(lines[first - 1:last])

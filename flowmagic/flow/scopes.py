"""Python's scoping rules, in the one place flowmagic keeps them (pure).

For every nested scope (function, lambda, class, comprehension): which names
it binds in its own namespace, which it declares ``global``/``nonlocal``,
which it reads from the enclosing scopes (and when: now, or when a function
is called), and which it binds there (comprehension walrus targets, names a
``global`` statement assigns). Inference (:mod:`flowmagic.flow.analysis`),
the prelude and the export all ask this module; ``tests/test_scopes.py``
checks it against the compiler's own ``symtable``.

``symtable`` itself is not the analyser: it works on source text, not the
tree being rewritten, has no line numbers per read and no "read before
bound" order in class bodies, and Python 3.12 inlines comprehensions into
their enclosing table (PEP 709), so its answers differ between the versions
flowmagic supports.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field

COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def free_names(node: ast.AST) -> frozenset[str]:
    """Global names a def, class or lambda reads when it runs (its body's free names)."""
    return frozenset(nested_scope(node).free)


@dataclass
class Free:
    line: int
    deferred: bool  # read when the function is called, not where it is defined


@dataclass
class Scope:
    kind: str                # "cell" | "function" | "class" | "comprehension"
    local: set[str]          # bound in this scope's own namespace (not global/nonlocal)
    free: dict[str, Free] = field(default_factory=dict)  # read from outside, through nested scopes too
    global_binds: set[str] = field(default_factory=set)  # names a `global` statement lets it assign
    walrus_binds: set[str] = field(default_factory=set)  # comprehension walrus targets: bound outside
    declared_global: set[str] = field(default_factory=set)
    declared_nonlocal: set[str] = field(default_factory=set)


def nested_scope(node: ast.AST) -> Scope:
    """One nested scope (function, lambda, class, comprehension) and what is free in it."""
    scope = _ScopeCollector(node)
    scope.collect()
    is_function = isinstance(node, FUNCTIONS)
    is_comprehension = isinstance(node, COMPREHENSIONS)
    global_binds = {name for name in scope.globals if name in scope.stores}
    walrus_binds = set(scope.walrus) if is_comprehension else set()
    local = set(scope.local)
    children = [nested_scope(child) for child in scope.children]
    for child in children:
        global_binds |= child.global_binds
        if is_comprehension:
            walrus_binds |= child.walrus_binds
        else:
            local |= child.walrus_binds
    free: dict[str, Free] = {}
    early = _class_body_early_loads(node) if isinstance(node, ast.ClassDef) else {}
    for name, line in early.items():
        if name not in walrus_binds:
            free.setdefault(name, Free(line, False))
    for name, line in scope.loads.items():
        outside = name not in local or name in scope.globals or name in scope.nonlocals
        if outside and name not in walrus_binds:
            free.setdefault(name, Free(line, is_function))
    for child in children:
        for name, info in child.free.items():
            # A class body's names are not visible inside its methods.
            visible = name in local and name not in scope.globals and not isinstance(node, ast.ClassDef)
            if not visible and name not in walrus_binds:
                free.setdefault(name, Free(info.line, info.deferred or is_function))
    kind = "comprehension" if is_comprehension else "function" if is_function else "class"
    own = local - scope.globals - scope.nonlocals
    return Scope(kind, own, free, global_binds, walrus_binds, set(scope.globals), set(scope.nonlocals))


def _class_body_early_loads(node: ast.ClassDef) -> dict[str, int]:
    """Names a class body loads before it binds them: a class body runs top to
    bottom and looks up a name it has not bound yet outside (``rate = rate * 2``,
    ``early = method`` above ``def method``)."""
    bound: set[str] = set()
    early: dict[str, int] = {}
    for stmt in node.body:
        collector = _ScopeCollector(ast.Module(body=[stmt], type_ignores=[]))
        collector.visit(stmt)
        # An assignment evaluates its value before binding its targets; inside a compound
        # statement the order is not tracked, so its own bindings count as bound already.
        simple = isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr))
        own = set() if simple else collector.stores
        for name, line in collector.loads.items():
            if name not in bound and name not in own:
                early.setdefault(name, line)
        bound |= collector.local
    return early


class _ScopeCollector(ast.NodeVisitor):
    """Bindings and loads of one scope, without descending into nested scopes."""

    def __init__(self, node: ast.AST) -> None:
        self.node = node
        self.local: set[str] = set()
        self.stores: set[str] = set()
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()
        self.lasting: set[str] = set()   # bound by more than an `except ... as` (which unbinds)
        self.walrus: set[str] = set()
        self.loads: dict[str, int] = {}
        self.children: list[ast.AST] = []

    def collect(self) -> None:
        node = self.node
        if isinstance(node, FUNCTIONS):
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
        if isinstance(node, COMPREHENSIONS):
            self.local -= self.walrus

    def _arguments(self, args: ast.arguments) -> None:
        for arg in args.posonlyargs + args.args + args.kwonlyargs:
            self.local.add(arg.arg)
        for arg in (args.vararg, args.kwarg):
            if arg is not None:
                self.local.add(arg.arg)

    def _bind(self, name: str, lasting: bool = True) -> None:
        self.local.add(name)
        self.stores.add(name)
        if lasting:
            self.lasting.add(name)

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
        self.nonlocals.update(node.names)  # resolved by the enclosing function scope, also nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._bind(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._bind(node.name, lasting=False)  # Python deletes it when the handler ends
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
        for expr in header_expressions(node):
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


def header_expressions(node: ast.AST) -> list[ast.AST]:
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


def top_level_bindings(body: Iterable[ast.stmt], *, through_globals: bool = True) -> set[str]:
    """Every name the cell's top level binds anywhere (for the deferred-read rule).

    ``through_globals=False`` leaves out names that only a nested ``global``
    statement assigns (bound when that function is called, not by the cell),
    and the names of ``except ... as`` handlers (unbound when the handler
    ends): what the statements leave bound once they ran.
    """
    collector = _ScopeCollector(ast.Module(body=list(body), type_ignores=[]))
    for stmt in collector.node.body:
        collector.visit(stmt)
    names = set(collector.local) if through_globals else set(collector.lasting)
    for child in collector.children:
        scope = nested_scope(child)
        names |= scope.walrus_binds
        if through_globals:
            names |= scope.global_binds
    return names

"""One step's code as the body of a Metaflow step method (pure).

The notebook's cell-level names that are artifacts or parameters become
``self.<name>`` wherever they are visible (top level, comprehensions, nested
functions and lambdas, ``global`` declarations), ``input`` becomes
``self.input`` in a foreach step, and calls to prelude helpers that read
notebook-level names get those names as keyword arguments. Private names,
locals of nested scopes and everything else stay as written.

The new tree is the truth. The text is produced by editing the cell's own
source at the positions of the rewritten nodes, so comments and layout
survive; the edited text is re-parsed and must give exactly the new tree,
else the tree is unparsed instead (correct, but without comments).
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field

from flowmagic.flow.scopes import Scope, nested_scope
from flowmagic.errors import FlowDefinitionError

FLOW = "self"   # the step method's first argument


@dataclass(frozen=True)
class StepNames:
    """What the rewriting of one step needs to know about its names."""

    attributes: frozenset[str]                      # cell-level names that become self.<name>
    foreach: bool = False                           # `input` is this task's item
    helper_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # helper -> names passed


@dataclass(frozen=True)
class Where:
    """Where a step comes from, for error messages."""

    step: str
    cell: int
    body_line: int = 1

    def error(self, message: str, node: ast.AST | None = None, variable: str | None = None) -> FlowDefinitionError:
        line = self.body_line + node.lineno - 1 if node is not None and hasattr(node, "lineno") else None
        return FlowDefinitionError(message, step=self.step, cell=self.cell, line=line, variable=variable)


def rewrite_step_code(code: str, names: StepNames, where: Where) -> str:
    """The step's code with its artifacts read and written through ``self``."""
    tree = ast.parse(code)
    rewriter = _Rewriter(names, where)
    new_tree = ast.fix_missing_locations(rewriter.visit(tree))
    text = _apply_edits(code, rewriter.edits)
    try:
        same = ast.dump(ast.parse(text)) == ast.dump(new_tree)
    except SyntaxError:
        same = False
    return text if same else ast.unparse(new_tree) + "\n"


# --- the rewriting -------------------------------------------------------------

@dataclass(frozen=True)
class _Edit:
    line: int           # 1-based
    start: int          # byte offsets in the line's UTF-8 text
    end: int
    text: str


class _Rewriter(ast.NodeTransformer):
    def __init__(self, names: StepNames, where: Where) -> None:
        self.names = names
        self.where = where
        self.scopes = [Scope("cell", set())]
        self.edits: list[_Edit] = []

    # name resolution ------------------------------------------------------------

    def _is_cell_level(self, name: str) -> bool:
        """Does ``name`` here refer to the cell's (the notebook's) global?"""
        innermost = len(self.scopes) - 1
        for depth in range(innermost, 0, -1):
            scope = self.scopes[depth]
            if scope.kind == "class" and depth != innermost:
                continue  # a class body's names are not visible inside its methods
            if name in scope.declared_global:
                return True
            if name in scope.local:
                return False
        return True

    def _flow_attribute(self, name: str, ctx: ast.expr_context, node: ast.AST) -> ast.Attribute:
        if any(FLOW in s.local for s in self.scopes[1:] if s.kind != "class"):
            raise self.where.error(
                f"uses {name!r} inside a function or lambda that has its own `{FLOW}`; in the Metaflow "
                f"step `{FLOW}` is the flow: rename that parameter", node, name)
        return ast.Attribute(value=ast.Name(id=FLOW, ctx=ast.Load()), attr=name, ctx=ctx)

    def _binding_scope_is_cell(self) -> bool:
        """For a walrus: the nearest enclosing scope that is not a comprehension."""
        for scope in reversed(self.scopes):
            if scope.kind != "comprehension":
                return scope.kind == "cell"
        return True

    def _replace(self, node: ast.AST, text: str) -> None:
        self.edits.append(_Edit(node.lineno, node.col_offset, node.end_col_offset, text))

    def _check_binding(self, name: str, node: ast.AST, what: str) -> None:
        if name in self.names.attributes and self._is_cell_level(name):
            raise self.where.error(
                f"{what} binds {name!r}, which the exported step must store as self.{name}; "
                f"Metaflow has no equivalent: bind it with a plain assignment (`{name} = ...`)",
                node, name)

    # names ----------------------------------------------------------------------

    def visit_Name(self, node: ast.Name) -> ast.AST:
        name = node.id
        if not self._is_cell_level(name):
            return node
        if name in self.names.attributes or (
                self.names.foreach and name == "input" and isinstance(node.ctx, ast.Load)):
            self._replace(node, f"{FLOW}.{name}")
            return self._flow_attribute(name, node.ctx, node)
        if name in self.names.helper_args and isinstance(node.ctx, ast.Load):
            needed = ", ".join(self.names.helper_args[name])
            raise self.where.error(
                f"passes {name}() around as a value, but it reads notebook-level names ({needed}) that "
                f"the export must pass to it as arguments; call it directly, or give it those values "
                f"as parameters", node, name)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if isinstance(func, ast.Name) and func.id in self.names.helper_args and self._is_cell_level(func.id) \
                and func.id not in self.names.attributes:
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [self.visit(k) for k in node.keywords]
            added = [ast.keyword(arg=n, value=self._flow_attribute(n, ast.Load(), node))
                     for n in self.names.helper_args[func.id]]
            separator = ", " if node.args or node.keywords else ""
            text = separator + ", ".join(f"{n}={FLOW}.{n}" for n in self.names.helper_args[func.id])
            self.edits.append(_Edit(node.end_lineno, node.end_col_offset - 1, node.end_col_offset - 1, text))
            node.keywords = node.keywords + added
            return node
        return self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.target, ast.Name):
            node.simple = 0
        return node

    def visit_NamedExpr(self, node: ast.NamedExpr) -> ast.AST:
        name = node.target.id
        if name in self.names.attributes and self._binding_scope_is_cell():
            raise self.where.error(
                f"the walrus `{name} := ...` binds a notebook variable; Metaflow stores it as "
                f"self.{name}, which `:=` cannot assign: use a plain assignment", node, name)
        node.value = self.visit(node.value)
        return node

    def visit_Global(self, node: ast.Global) -> ast.AST:
        kept = [n for n in node.names if n not in self.names.attributes]
        if kept == node.names:
            return node
        replacement = ast.Global(names=kept) if kept else ast.Pass()
        self._replace(node, f"global {', '.join(kept)}" if kept else "pass")
        return replacement

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> ast.AST:
        for alias in node.names:
            self._check_binding(alias.asname or alias.name.split(".")[0], node, "an import")
        return node

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> ast.AST:
        if node.name:
            self._check_binding(node.name, node, "`except ... as`")
        return self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs | ast.MatchStar) -> ast.AST:
        if node.name:
            self._check_binding(node.name, node, "a `case` pattern")
        return self.generic_visit(node)

    visit_MatchStar = visit_MatchAs

    def visit_MatchMapping(self, node: ast.MatchMapping) -> ast.AST:
        if node.rest:
            self._check_binding(node.rest, node, "a `case` pattern")
        return self.generic_visit(node)

    # scopes ---------------------------------------------------------------------

    def _visit_header(self, node: ast.AST) -> None:
        if isinstance(node, ast.ClassDef):
            node.decorator_list = [self.visit(d) for d in node.decorator_list]
            node.bases = [self.visit(b) for b in node.bases]
            node.keywords = [self.visit(k) for k in node.keywords]
            return
        if not isinstance(node, ast.Lambda):
            node.decorator_list = [self.visit(d) for d in node.decorator_list]
            if node.returns is not None:
                node.returns = self.visit(node.returns)
        args = node.args
        args.defaults = [self.visit(d) for d in args.defaults]
        args.kw_defaults = [self.visit(d) if d is not None else None for d in args.kw_defaults]
        if not isinstance(node, ast.Lambda):
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    arg.annotation = self.visit(arg.annotation)

    def _visit_definition(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, ast.Lambda):
            self._check_binding(node.name, node, "a def or class")
        self._visit_header(node)
        self.scopes.append(nested_scope(node))
        try:
            if isinstance(node, ast.Lambda):
                node.body = self.visit(node.body)
            else:
                node.body = [self.visit(stmt) for stmt in node.body]
        finally:
            self.scopes.pop()
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _visit_definition

    def _visit_comprehension(self, node: ast.AST) -> ast.AST:
        first = node.generators[0]
        first.iter = self.visit(first.iter)   # evaluated in the enclosing scope
        self.scopes.append(nested_scope(node))
        try:
            for number, gen in enumerate(node.generators):
                gen.target = self.visit(gen.target)
                if number:
                    gen.iter = self.visit(gen.iter)
                gen.ifs = [self.visit(cond) for cond in gen.ifs]
            for part in ("elt", "key", "value"):
                if hasattr(node, part):
                    setattr(node, part, self.visit(getattr(node, part)))
        finally:
            self.scopes.pop()
        return node

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comprehension


def _apply_edits(code: str, edits: list[_Edit]) -> str:
    lines = [line.encode("utf-8") for line in code.splitlines(keepends=True)]
    for edit in sorted(edits, key=lambda e: (e.line, e.start), reverse=True):
        raw = lines[edit.line - 1]
        lines[edit.line - 1] = raw[:edit.start] + edit.text.encode("utf-8") + raw[edit.end:]
    return b"".join(lines).decode("utf-8")

"""Writing the Metaflow script: parameters, decorators, step methods (pure)."""
from __future__ import annotations

import ast
import io
import json
import math
import tokenize
from dataclasses import dataclass

from flowmagic.flow.cells import Parameter
from flowmagic.flow.graph import FlowGraph, StepSpec
from flowmagic.errors import FlowDefinitionError
from flowmagic.export.carry import JoinPlan, plan_joins, topological
from flowmagic.export.names import RESERVED_ATTRIBUTES, read_downstream, step_attributes
from flowmagic.export.prelude import Prelude, plan_prelude
from flowmagic.export.rewrite import StepNames, Where, rewrite_step_code
from flowmagic.export.structure import MfStep, Structure

INDENT = "    "
# Metaflow's own command-line options: a Parameter may not be called so.
RESERVED_PARAMETERS = frozenset({"params", "with", "tag", "namespace", "obj", "tags", "decospecs",
                                 "run_id_file", "max_num_splits", "max_workers", "max_log_size",
                                 "user_namespace", "run_id", "task_id", "runner_attribute_file"})
_TYPES = {"int": "int", "float": "float", "str": "str", "bool": "bool", "json": "JSONType"}


@dataclass(frozen=True)
class ExportPlan:
    """Everything the script is written from; tests use it to know which names
    stayed locals of their step (not artifacts in Metaflow)."""

    graph: FlowGraph
    class_name: str
    structure: Structure
    prelude: Prelude
    attributes: dict[str, frozenset[str]]    # real step -> its self.<name> artifacts
    locals: dict[str, frozenset[str]]        # real step -> written names kept local
    joins: dict[str, JoinPlan]


def plan_export(graph: FlowGraph, class_name: str | None = None) -> ExportPlan:
    class_name = class_name or graph.name
    if not class_name.isidentifier():
        raise FlowDefinitionError(f"{class_name!r} is not a valid Python class name for the flow")
    structure = Structure(graph)
    prelude = plan_prelude(graph)
    if class_name in prelude.defines or class_name in {"FlowSpec", "Parameter", "JSONType"}:
        raise FlowDefinitionError(f"the flow's class name {class_name!r} is also a name the script "
                                  "defines or imports: pick another with --name")
    downstream = read_downstream(graph)
    attributes, local = {}, {}
    for spec in graph.steps:
        attributes[spec.name], local[spec.name] = step_attributes(graph, spec, downstream[spec.name],
                                                                  prelude.helper_needs)
        _check_step_name_reads(spec, attributes[spec.name], structure)
    _check_parameters(graph, structure, class_name)
    position = {spec.name: i for i, spec in enumerate(graph.steps)}
    writes = {spec.name: frozenset(spec.writes) & attributes[spec.name] for spec in graph.steps}
    joins = plan_joins(structure.steps, writes, position)
    return ExportPlan(graph, class_name, structure, prelude, attributes, local, joins)


def _check_step_name_reads(spec: StepSpec, attributes: frozenset[str], structure: Structure) -> None:
    for var in sorted((attributes & set(spec.reads)) & structure.steps.keys()):
        raise FlowDefinitionError(
            f"reads the variable {var!r}, but a step has the same name and Metaflow would read "
            f"self.{var} as that step: rename the variable or the step",
            step=spec.name, cell=spec.cell, variable=var)


def _check_parameters(graph: FlowGraph, structure: Structure, class_name: str) -> None:
    for param in graph.params:
        clash = ("a Metaflow command-line option" if param.name in RESERVED_PARAMETERS else
                 "an attribute of Metaflow's FlowSpec" if param.name in RESERVED_ATTRIBUTES else
                 "a step of the flow" if param.name in structure.steps else None)
        if clash:
            raise FlowDefinitionError(f"the parameter {param.name!r} has the name of {clash}; rename it",
                                      cell=param.cell, variable=param.name)


# --- the script ------------------------------------------------------------------

def render_script(plan: ExportPlan) -> str:
    methods = [_method(plan, plan.structure.steps[name]) for name in _reading_order(plan)]
    decorators = {d for m in methods for d in m[1]}
    imports = sorted({"FlowSpec", "step"} | decorators | _parameter_imports(plan.graph.params))
    needs_display = any(_uses_display(spec, plan.prelude) for spec in plan.graph.steps)
    lines = [f'"""{plan.class_name}: a Metaflow flow exported from a flowmagic notebook.', ""]
    if "pypi" in decorators or "conda" in decorators:
        env = "pypi" if "pypi" in decorators else "conda"
        lines.append(f"Some steps need packages: run it with `python <this file> --environment={env} run`.")
    else:
        lines.append("Run it with `python <this file> run`.")
    lines += ['"""', f"from metaflow import {', '.join(imports)}"]
    if needs_display:
        lines += ["try:", f"{INDENT}from IPython.display import display",
                  "except ImportError:  # a step environment without IPython: print instead",
                  f"{INDENT}display = print"]
    if any(f"{_KEEP_PICKLABLE}(" in text for text, _ in methods):
        lines += ["", "", _KEEP_PICKLABLE_SOURCE.strip("\n"), ""]
    if plan.prelude.source:
        lines += ["", plan.prelude.source.strip("\n")]
    lines += ["", "", f"class {plan.class_name}(FlowSpec):",
              f'{INDENT}"""The notebook flow {plan.graph.name}, step for step."""', ""]
    for param in plan.graph.params:
        lines.append(INDENT + _parameter(param))
    if plan.graph.params:
        lines.append("")
    lines.append("\n\n".join(text for text, _ in methods))
    lines += ["", "", 'if __name__ == "__main__":', f"{INDENT}{plan.class_name}()", ""]
    return "\n".join(lines)


def _reading_order(plan: ExportPlan) -> list[str]:
    """Steps in flow order, ties broken by notebook order (added steps follow their inputs)."""
    steps = plan.structure.steps
    position = {spec.name: float(i) for i, spec in enumerate(plan.graph.steps)}

    def rank(name: str) -> float:
        if name not in position:
            inputs = steps[name].inputs_from
            position[name] = max((rank(i) for i in inputs), default=-1.0) + 0.5
        return position[name]

    return topological(steps, rank)


def _parameter_imports(params: tuple[Parameter, ...]) -> set[str]:
    found = {"Parameter"} if params else set()
    return found | {"JSONType" for p in params if p.type == "json"}


def _parameter(param: Parameter) -> str:
    default = json.dumps(param.default) if param.type == "json" else param.default
    parts = [repr(param.name), f"default={default!r}", f"type={_TYPES.get(param.type, 'str')}"]
    if param.help:
        parts.append(f"help={param.help!r}")
    return f"{param.name} = Parameter({', '.join(parts)})"


def _uses_display(spec: StepSpec, prelude: Prelude) -> bool:
    if "display" in prelude.defines or "display" in spec.writes:
        return False
    return any(isinstance(n, ast.Name) and n.id == "display" for n in ast.walk(ast.parse(spec.code)))


def _method(plan: ExportPlan, node: MfStep) -> tuple[str, set[str]]:
    spec = plan.graph.step(node.name) if node.real else None
    decorators = _decorators(spec) if spec else []
    args = "self, inputs" if node.join else "self"
    doc = spec.doc if spec and spec.doc else node.why
    head = [INDENT + d for d in decorators] + [f"{INDENT}@step", f"{INDENT}def {node.name}({args}):"]
    body: list[str] = [_docstring(doc)] if doc else []
    if node.join:
        body += _join_lines(plan.joins[node.name], node, _read_in_foreach_body(plan, node))
    if spec is not None:
        body += _catch_lines(plan, spec)
        code = _step_code(plan, spec)
        if code.strip():
            body.append(code.rstrip("\n"))
        body += _keep_picklable_lines(plan, spec)
    transition = _transition(node)
    if transition:
        body.append(transition)
    if not body:
        body.append("pass")
    text = "\n".join(head + [_indent(b, INDENT * 2) for b in body])
    return text, {d.split("(")[0].lstrip("@") for d in decorators}


_KEEP_PICKLABLE = "_keep_picklable"
_KEEP_PICKLABLE_SOURCE = f'''
def {_KEEP_PICKLABLE}(flow, step, names):
    """Metaflow pickles every self.<name> when a step ends; the notebook run skips a value
    it cannot save that no later step reads (with a warning): do the same here."""
    import pickle
    import sys
    for name in names:
        value = getattr(flow, name, None)
        if value is None or type(value).__module__.split(".")[0] in ("builtins", "numpy", "pandas", "pyarrow") \\
                and not isinstance(value, (list, tuple, dict, set)):
            continue
        try:
            pickle.dumps(value)
        except Exception:
            delattr(flow, name)
            print(f"warning: step {{step!r}}: {{name!r}} ({{type(value).__name__}}) cannot be saved; "
                  "it is not persisted (fine while no later step reads it)", file=sys.stderr)
'''


def _keep_picklable_lines(plan: ExportPlan, spec: StepSpec) -> list[str]:
    """Outputs no later step reads may be values Metaflow cannot pickle (a lock, a client
    handle): the notebook run only warns about those, so the export drops them the same way."""
    unread = (set(spec.writes) & plan.attributes[spec.name]) - read_downstream(plan.graph)[spec.name] \
        - {spec.options.catch}
    if not unread:
        return []
    return [f"{_KEEP_PICKLABLE}(self, {spec.name!r}, {sorted(unread)!r})"]


def _decorators(spec: StepSpec) -> list[str]:
    options = spec.options
    found = []
    if options.catch:
        found.append(f"@catch(var={options.catch!r})")
    if options.retry:
        found.append(f"@retry(times={options.retry})")
    if options.timeout:
        found.append(f"@timeout(seconds={max(1, math.ceil(options.timeout))})")
    if options.memory:
        found.append(f"@resources(memory={options.memory})")
    for kind in ("pypi", "conda"):
        spec_text = getattr(options, kind)
        if spec_text:
            found.append(_environment_decorator(kind, spec_text, spec))
    return found


def _environment_decorator(kind: str, text: str, spec: StepSpec) -> str:
    """``"pandas==2.2.3 pyarrow>=15"`` -> ``@pypi(packages={"pandas": "2.2.3", "pyarrow": ">=15"})``."""
    from packaging.requirements import InvalidRequirement, Requirement

    packages: dict[str, str] = {}
    python = None
    for item in text.split():   # "pkg==1.0 other>=2,<3": one requirement per word
        try:
            req = Requirement(item)
        except InvalidRequirement:
            raise FlowDefinitionError(f"--{kind} {item!r} is not a valid requirement",
                                      step=spec.name, cell=spec.cell) from None
        version = str(req.specifier).lstrip(" =")
        name = req.name + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
        if req.name.lower() == "python":
            python = version
        else:
            packages[name] = version
    args = [f"packages={packages!r}"] + ([f"python={python!r}"] if python else [])
    return f"@{kind}({', '.join(args)})"


def _docstring(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if text.endswith('"'):
        text += " "
    return f'"""{text}"""'


def _read_in_foreach_body(plan: ExportPlan, join: MfStep) -> set[str]:
    """Artifacts the steps between a foreach and its join read from upstream.

    Metaflow saves again every artifact a task reads (``self.x`` loads it onto
    the flow object), and a frame pickled after a read may differ byte for byte,
    so ``merge_artifacts`` would see conflicting values for a name no task wrote.
    """
    if join.join != "foreach" or join.closes is None:
        return set()
    steps, names, todo = plan.structure.steps, set(), [join.closes]
    while todo:
        name = todo.pop()
        node = steps[name]
        if node.real:
            names |= set(plan.graph.step(name).reads) & plan.attributes[name]
        todo += [child for child in node.next if child != join.name]
    return names


def _join_lines(plan: JoinPlan, node: MfStep, read_in_body: set[str] = frozenset()) -> list[str]:
    lines = []
    if plan.gathered:
        lines.append(f"# One value per {node.closes} task, in item order, as the notebook's join sees them.")
        lines += [f"self.{var} = [inp.{var} for inp in inputs]" for var in plan.gathered]
    if plan.explicit:
        lines.append("# Taken from the branch that wrote it last, as in the notebook.")
        lines += [f"self.{var} = inputs.{source}.{var}" for var, source in plan.explicit]
    if plan.merge:
        pinned = [var for var in plan.merged if var in read_in_body]
        if pinned:
            lines.append(f"# Read, not written, by every {node.closes} task: one copy, as the notebook has.")
            lines += [f"self.{var} = inputs[0].{var}" for var in pinned]
        lines.append("self.merge_artifacts(inputs)")
    return lines


def _catch_lines(plan: ExportPlan, spec: StepSpec) -> list[str]:
    if not spec.options.catch:
        return []
    written = (set(spec.writes) & plan.attributes[spec.name]) - {spec.options.catch}
    unset = sorted(written - set(spec.reads))
    lines = []
    if unset:
        lines.append("# @catch: what the step has not set when it fails stays None, as in the notebook.")
        lines += [f"self.{var} = None" for var in unset]
    upstream = sorted(written & set(spec.reads))
    if upstream:
        # Setting these to None first would change what the step reads; say so instead.
        names = ", ".join(upstream)
        lines.append(f"# @catch: if this step fails before it rebinds {names}, Metaflow keeps the "
                     f"upstream value (the notebook run sets None).")
    return lines


def _step_code(plan: ExportPlan, spec: StepSpec) -> str:
    where = Where(spec.name, spec.cell, spec.body_line)
    tree = ast.parse(spec.code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "get_ipython":
            raise where.error("uses IPython syntax (a magic, `!cmd` or `?`), which a Metaflow step "
                              "cannot run: write it as plain Python", node)
    for node in _outside_async_functions(tree):
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            raise where.error("uses top-level `await`, which a Metaflow step (a plain method) cannot "
                              "run: wrap it in `asyncio.run(...)`", node)
    helpers = {h: plan.prelude.helper_needs[h] for h in spec.reads if h in plan.prelude.helper_needs}
    names = StepNames(plan.attributes[spec.name], foreach=spec.options.foreach is not None,
                      helper_args=helpers)
    code = rewrite_step_code(spec.code, names, where)
    return _drop_doc_comment(code, spec.doc)


def _outside_async_functions(tree: ast.AST):
    """Every node not inside an `async def` (where `await` is fine)."""
    for child in ast.iter_child_nodes(tree):
        if not isinstance(child, ast.AsyncFunctionDef):
            yield child
            yield from _outside_async_functions(child)


def _drop_doc_comment(code: str, doc: str) -> str:
    """The first comment line became the docstring: do not repeat it."""
    lines = code.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            if doc and line.strip().lstrip("#").strip() == doc and line.lstrip().startswith("#"):
                del lines[i]
            break
    return "\n".join(lines).strip("\n")


def _transition(node: MfStep) -> str:
    if not node.next:
        return ""
    targets = ", ".join(f"self.{n}" for n in node.next)
    if node.foreach:
        return (f"# Metaflow refuses an empty {node.foreach} (\"zero splits\"); the notebook's join "
                f"would get empty lists.\nself.next({targets}, foreach={node.foreach!r})")
    return f"self.next({targets})"


def _indent(text: str, prefix: str) -> str:
    """Indent every line except those inside a multi-line string (their text is data)."""
    inside = _string_continuation_lines(text)
    return "\n".join(prefix + line if line.strip() and number not in inside else line
                     for number, line in enumerate(text.split("\n"), start=1))


def _string_continuation_lines(text: str) -> set[int]:
    lines: set[int] = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.STRING and token.end[0] > token.start[0]:
                lines.update(range(token.start[0] + 1, token.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        pass
    return lines

"""Classifying notebook cells and parsing flowmagic's cell headers (pure).

A cell is one of:

- a *step*: its first non-blank line is ``%%step NAME [options]``;
- a *params* cell: its first non-blank line is ``%%params``;
- an *ordinary* cell: anything else (its imports, defs, classes and literal
  constants become the flow's prelude; see :mod:`flowmagic.flow.graph`);
- *empty*: nothing but whitespace (markdown and raw cells arrive as "").

Step options are parsed once, strictly (an unknown option or a bad value is a
:class:`FlowDefinitionError`), into the frozen :class:`StepOptions` record the
flow graph keeps; a ``%%params`` cell's lines become :class:`Parameter` records.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import io
import keyword
import math
import re
import shlex
import tokenize
from dataclasses import dataclass, field
from typing import Any, Literal

from flowmagic.errors import FlowDefinitionError

CellKind = Literal[
    "step",      # starts with %%step: runs as a task of the flow
    "params",    # starts with %%params: declares the flow's parameters
    "ordinary",  # any other code: contributes to the prelude
    "empty",     # whitespace only (markdown/raw cells are passed as "")
]

STEP_MAGIC = "%%step"
PARAMS_MAGIC = "%%params"

# Names the runtime binds itself, or that Metaflow reserves on a FlowSpec;
# a step called like this could not be exported.
RESERVED_STEP_NAMES = frozenset({"input", "inputs", "next", "index", "name", "foreach_stack", "merge_artifacts"})

_FLOW_NAME_LINE = re.compile(r"^\s*%flow\s+name\s+(?P<rest>.*?)\s*$")

DEFAULT_RETRIES = 3  # `--retry` without a number, as Metaflow's @retry


@dataclass(frozen=True)
class StepOptions:
    retry: int = 0              # extra attempts after the first; `--retry` alone = 3
    timeout: float | None = None
    foreach: str | None = None
    catch: str | None = None
    pypi: str | None = None     # "pandas==2.2.3 pyarrow>=15"
    conda: str | None = None
    cache: bool = False
    memory: int | None = None   # MB (Metaflow's @resources(memory=...)); None: runtime/memory.py default
    after: tuple[str, ...] = ()  # `--after STEP`: ordering without data (edges with no variables)
    executor: str | None = None  # `--executor dask` (or dask://HOST:PORT, local): where its tasks run

    def as_dict(self) -> dict:
        """Only the options that are set (the JSON ``options`` object)."""
        result: dict[str, Any] = {}
        if self.retry:
            result["retry"] = self.retry
        for key in ("timeout", "foreach", "catch", "pypi", "conda", "memory", "executor"):
            value = getattr(self, key)
            if value is not None:
                result[key] = value
        if self.cache:
            result["cache"] = True
        if self.after:
            result["after"] = list(self.after)
        return result


@dataclass(frozen=True)
class ParsedCell:
    """One notebook cell, classified; ``body`` is the code after the header line."""

    index: int
    kind: CellKind
    source: str
    body: str            # the code without the %%step / %%params line ("" if empty)
    body_line: int       # 1-based line of the body's first line within the cell
    step_name: str | None = None
    options: StepOptions = StepOptions()


class _StrictParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise _OptionError(message)


class _OptionError(Exception):
    pass


def _make_step_parser() -> _StrictParser:
    parser = _StrictParser(prog=STEP_MAGIC, add_help=False, allow_abbrev=False)
    parser.add_argument("name")
    parser.add_argument("--retry", nargs="?", const=str(DEFAULT_RETRIES), default="0")
    parser.add_argument("--timeout", default=None)
    parser.add_argument("--foreach", default=None)
    parser.add_argument("--catch", default=None)
    parser.add_argument("--pypi", default=None)
    parser.add_argument("--conda", default=None)
    parser.add_argument("--cache", action="store_true")
    parser.add_argument("--memory", default=None)
    parser.add_argument("--after", action="append", default=[])
    parser.add_argument("--executor", default=None)
    return parser


_STEP_PARSER = _make_step_parser()


def is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _first_line(source: str) -> tuple[int, str]:
    """Index (0-based) and text of the first non-blank line, or (-1, "")."""
    for number, line in enumerate(source.splitlines()):
        if line.strip():
            return number, line
    return -1, ""


def _body_after(source: str, header_index: int) -> str:
    lines = source.splitlines(keepends=True)
    return "".join(lines[header_index + 1:])


def classify_cell(source: str, index: int) -> ParsedCell:
    """Classify one cell and parse its header. Raises FlowDefinitionError."""
    header_index, header = _first_line(source)
    if header_index < 0:
        return ParsedCell(index, "empty", source, "", 1)
    stripped = header.strip()
    words = stripped.split(None, 1)
    magic = words[0]
    body_line = header_index + 2
    if magic == STEP_MAGIC:
        try:
            name, options = parse_step_header(stripped[len(STEP_MAGIC):], cell=index)
        except FlowDefinitionError as exc:
            raise FlowDefinitionError(exc.message, step=exc.step, cell=index, variable=exc.variable,
                                      line=header_index + 1) from None
        return ParsedCell(index, "step", source, _body_after(source, header_index),
                          body_line, name, options)
    if magic == PARAMS_MAGIC:
        if len(words) > 1 and not words[1].startswith("#"):
            raise FlowDefinitionError(
                f"%%params takes no options (got {words[1]!r}); declare parameters in the cell body",
                cell=index, line=header_index + 1)
        return ParsedCell(index, "params", source, _body_after(source, header_index), body_line)
    _check_magic_typo(magic, index, header_index + 1)
    return ParsedCell(index, "ordinary", source, source, 1)


def _check_magic_typo(magic: str, cell: int, line: int) -> None:
    """`%%stpe a` would silently become an ordinary cell: say what was meant."""
    if not magic.startswith("%%"):
        return
    close = difflib.get_close_matches(magic, [STEP_MAGIC, PARAMS_MAGIC], n=1, cutoff=0.8)
    if close:
        raise FlowDefinitionError(f"unknown cell magic {magic!r}: did you mean {close[0]}?",
                                  cell=cell, line=line)


def parse_step_header(arguments: str, *, cell: int | None = None) -> tuple[str, StepOptions]:
    """Parse what follows ``%%step``: ``NAME [--retry [N]] [--timeout S] ...``."""
    try:
        words = shlex.split(arguments, comments=True)  # `%%step a  # a comment` is fine
    except ValueError as exc:
        raise FlowDefinitionError(f"cannot read the %%step line: {exc}", cell=cell) from None
    if not words or words[0].startswith("-"):
        raise FlowDefinitionError("%%step needs a step name: %%step NAME [options]", cell=cell)
    step = words[0]
    if len(words) == 1:  # the common case needs no option parser
        _check_step_name(step, cell)
        return step, StepOptions()
    try:
        ns = _STEP_PARSER.parse_args(words)
    except _OptionError as exc:
        raise FlowDefinitionError(f"bad %%step options: {exc}{_option_hint(words)}", step=step, cell=cell) from None
    _check_step_name(ns.name, cell)
    return ns.name, StepOptions(
        retry=_parse_retry(ns.retry, step, cell),
        timeout=_parse_timeout(ns.timeout, step, cell),
        foreach=_check_variable("--foreach", ns.foreach, step, cell),
        catch=_check_variable("--catch", ns.catch, step, cell),
        pypi=_check_spec("--pypi", ns.pypi, step, cell),
        conda=_check_spec("--conda", ns.conda, step, cell),
        cache=bool(ns.cache),
        memory=_parse_memory(ns.memory, step, cell),
        after=_parse_after(ns.after, step, cell),
        executor=_parse_executor(ns.executor, step, cell),
    )


def _parse_executor(text: str | None, step: str, cell: int | None) -> str | None:
    """``local``, ``dask`` (the address from the run's --executor or $FLOWMAGIC_DASK_SCHEDULER)
    or ``dask://HOST:PORT``; checked here so a typo is a definition error naming the cell."""
    if text is None:
        return None
    if text in ("local", "dask") or (text.startswith("dask://") and len(text) > len("dask://")):
        return text
    raise FlowDefinitionError(f"bad value for --executor: {text!r} (expected local, dask or dask://HOST:PORT)",
                              step=step, cell=cell)


def _parse_after(names: list[str], step: str, cell: int | None) -> tuple[str, ...]:
    """``--after a --after b`` (or ``--after a,b``): step names, each once."""
    found: list[str] = []
    for name in (part for value in names for part in value.split(",")):
        if not is_identifier(name):
            raise FlowDefinitionError(f"bad value for --after: {name!r} is not a step name",
                                      step=step, cell=cell)
        if name == step:
            raise FlowDefinitionError("--after names the step itself: name a step above this one",
                                      step=step, cell=cell)
        if name not in found:
            found.append(name)
    return tuple(found)


def _option_hint(words: list[str]) -> str:
    """`--retries` -> "; did you mean --retry?" (the first unknown option close to a known one)."""
    known = [o for action in _STEP_PARSER._actions for o in action.option_strings]
    for word in words:
        option = word.split("=", 1)[0]
        if option.startswith("--") and option not in known:
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


def _check_step_name(name: str, cell: int | None) -> None:
    if not is_identifier(name):
        raise FlowDefinitionError(
            f"invalid step name {name!r}: a step name must be a Python identifier (letters, digits, _)",
            step=name, cell=cell)
    if name.startswith("_"):
        raise FlowDefinitionError(
            f"invalid step name {name!r}: step names cannot start with '_'", step=name, cell=cell)
    if name in RESERVED_STEP_NAMES:
        raise FlowDefinitionError(
            f"invalid step name {name!r}: it is reserved ({', '.join(sorted(RESERVED_STEP_NAMES))})",
            step=name, cell=cell)


def _parse_retry(text: str, step: str, cell: int | None) -> int:
    try:
        retry = int(text)
    except ValueError:
        retry = -1
    if retry < 0:
        raise FlowDefinitionError(
            f"bad value for --retry: {text!r} (expected a whole number of extra attempts, 0 or more)",
            step=step, cell=cell)
    return retry


def _parse_timeout(text: str | None, step: str, cell: int | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise FlowDefinitionError(
            f"bad value for --timeout: {text!r} (expected a positive number of seconds)",
            step=step, cell=cell)
    return seconds


def _parse_memory(text: str | None, step: str, cell: int | None) -> int | None:
    if text is None:
        return None
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = 0
    if megabytes <= 0:
        raise FlowDefinitionError(
            f"bad value for --memory: {text!r} (expected a whole number of megabytes, e.g. --memory 4000)",
            step=step, cell=cell)
    return megabytes


def _check_variable(option: str, name: str | None, step: str, cell: int | None) -> str | None:
    if name is None:
        return None
    if not is_identifier(name) or name.startswith("_"):
        raise FlowDefinitionError(
            f"bad value for {option}: {name!r} is not a variable name "
            "(a Python identifier not starting with '_')", step=step, cell=cell, variable=name)
    return name


def _check_spec(option: str, spec: str | None, step: str, cell: int | None) -> str | None:
    if spec is None:
        return None
    spec = " ".join(spec.split())
    if not spec:
        raise FlowDefinitionError(f"bad value for {option}: expected package specs such as "
                                  "\"pandas==2.2.3 pyarrow>=15\"", step=step, cell=cell)
    return spec


def flow_name_in(source: str, *, cell: int | None = None) -> str | None:
    """The NAME of the last ``%flow name NAME`` line in an ordinary cell's source."""
    found = None
    for number, line in enumerate(source.splitlines(), start=1):
        match = _FLOW_NAME_LINE.match(line)
        if match is None:
            continue
        name = match.group("rest")
        if not is_identifier(name):
            raise FlowDefinitionError(
                f"invalid flow name {name!r} in '%flow name': use a Python identifier such as MovieFlow",
                cell=cell, line=number)
        found = name
    return found


# --- %%params ------------------------------------------------------------------

@dataclass(frozen=True)
class Parameter:
    """One parameter declared in a ``%%params`` cell."""

    name: str
    default: Any
    type: str      # "int" | "float" | "str" | "bool" | "json"
    help: str
    cell: int
    line: int = field(default=0, compare=False)   # 1-based in the cell; moving a line changes nothing


_PARAM_KEYWORDS = frozenset({"default", "help", "type", "required", "show_default", "separator"})
_TYPE_NAMES = {"int": "int", "float": "float", "str": "str", "bool": "bool",
               "dict": "json", "list": "json", "JSONType": "json", "json": "json"}
_PARAMS_HINT = ("a %%params cell holds only lines like `alpha = 0.01  # help text` or "
                "`genre = Parameter(\"genre\", default=\"Sci-Fi\", help=\"...\")`")


def parse_params(cell: ParsedCell) -> list[Parameter]:
    """The parameters a ``%%params`` cell declares. Raises FlowDefinitionError."""
    offset = cell.body_line - 1
    try:
        tree = ast.parse(cell.body)
    except SyntaxError as exc:
        raise FlowDefinitionError(f"syntax error in %%params: {exc.msg}", cell=cell.index,
                                  line=offset + (exc.lineno or 1)) from None
    comments = _comments_by_line(cell.body)
    decls = []
    for stmt in tree.body:
        line = offset + stmt.lineno
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            raise FlowDefinitionError(_PARAMS_HINT, cell=cell.index, line=line)
        name = stmt.targets[0].id
        _check_param_name(name, cell.index, line)
        comment = comments.get(stmt.lineno, "")
        if _is_parameter_call(stmt.value):
            decls.append(_parameter_call(name, stmt.value, comment, cell.index, line))
        else:
            default = _literal(stmt.value, name, cell.index, line)
            decls.append(Parameter(name, default, _infer_type(default), comment, cell.index, line))
    return decls


def _comments_by_line(code: str) -> dict[int, str]:
    comments: dict[int, str] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.COMMENT:
                comments.setdefault(token.start[0], token.string.lstrip("#").strip())
    except (tokenize.TokenError, SyntaxError):
        pass
    return comments


def _check_param_name(name: str, cell: int, line: int) -> None:
    if name.startswith("_") or name in ("input", "inputs"):
        raise FlowDefinitionError(
            f"invalid parameter name {name!r}: names starting with '_', 'input' and 'inputs' are reserved",
            cell=cell, line=line, variable=name)


def _is_parameter_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "Parameter") or (
        isinstance(func, ast.Attribute) and func.attr == "Parameter")


def _parameter_call(name: str, call: ast.Call, comment: str, cell: int, line: int) -> Parameter:
    if len(call.args) > 1 or any(kw.arg is None for kw in call.keywords):
        raise FlowDefinitionError(f"Parameter(...) for {name!r}: pass the name, then keywords "
                                  "(default=, help=, type=)", cell=cell, line=line, variable=name)
    if call.args:
        given = _literal(call.args[0], name, cell, line)
        if given != name:
            raise FlowDefinitionError(
                f"Parameter name {given!r} differs from the variable {name!r}; use the same name "
                "(steps read the variable, the command line sets --NAME)", cell=cell, line=line, variable=name)
    keywords = {kw.arg: kw.value for kw in call.keywords}
    unknown = sorted(set(keywords) - _PARAM_KEYWORDS)
    if unknown:
        raise FlowDefinitionError(
            f"Parameter {name!r}: unknown keyword {unknown[0]!r} (known: {', '.join(sorted(_PARAM_KEYWORDS))})",
            cell=cell, line=line, variable=name)
    default = _literal(keywords["default"], name, cell, line) if "default" in keywords else None
    help_text = _literal(keywords["help"], name, cell, line) if "help" in keywords else comment
    if not isinstance(help_text, str):
        raise FlowDefinitionError(f"Parameter {name!r}: help must be a string", cell=cell, line=line, variable=name)
    if "type" in keywords:
        type_name = _declared_type(keywords["type"], name, cell, line)
        default = _coerce(default, type_name, name, cell, line)
    else:
        type_name = _infer_type(default)
    return Parameter(name, default, type_name, help_text, cell, line)


def _declared_type(node: ast.AST, name: str, cell: int, line: int) -> str:
    key = None
    if isinstance(node, ast.Name):
        key = node.id
    elif isinstance(node, ast.Attribute):
        key = node.attr
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        key = node.value
    if key not in _TYPE_NAMES:
        raise FlowDefinitionError(
            f"Parameter {name!r}: unsupported type; use int, float, str, bool or JSONType",
            cell=cell, line=line, variable=name)
    return _TYPE_NAMES[key]


def _literal(node: ast.AST, name: str, cell: int, line: int) -> Any:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise FlowDefinitionError(
            f"parameter {name!r}: the value must be a literal (number, string, bool, None, list or dict); "
            + _PARAMS_HINT, cell=cell, line=line, variable=name) from None
    return _jsonable(value, name, cell, line)


def _jsonable(value: Any, name: str, cell: int, line: int) -> Any:
    """Parameter values travel as JSON: tuples become lists; sets, bytes, complex are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise FlowDefinitionError(f"parameter {name!r}: the value must be a finite number",
                                  cell=cell, line=line, variable=name)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, name, cell, line) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _jsonable(item, name, cell, line) for key, item in value.items()}
    raise FlowDefinitionError(
        f"parameter {name!r}: a {type(value).__name__} value cannot be a parameter "
        "(use numbers, strings, bools, None, lists or dicts with string keys)",
        cell=cell, line=line, variable=name)


def _infer_type(default: Any) -> str:
    if isinstance(default, bool):  # before int: bool is an int subclass
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str) or default is None:
        return "str"
    return "json"


def _coerce(default: Any, type_name: str, name: str, cell: int, line: int) -> Any:
    if default is None or type_name == "json":
        return default
    if type_name == "float" and isinstance(default, int) and not isinstance(default, bool):
        return float(default)
    if _infer_type(default) != type_name:
        raise FlowDefinitionError(
            f"Parameter {name!r}: default {default!r} is not of type {type_name}",
            cell=cell, line=line, variable=name)
    return default

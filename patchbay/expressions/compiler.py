"""Compiling expressions: parse, check functions and tables at load time, and run the common nodes as closures."""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

from jmespath import exceptions as jexc
from jmespath.lexer import Lexer
from jmespath.parser import Parser
from jmespath.visitor import Options, TreeInterpreter

from patchbay.errors import ConfigError, RecordInvalid, Violation
from patchbay.expressions.conversions import DataError, show
from patchbay.expressions.functions import DEFAULT_FUNCTIONS, ENTRIES, FUNCTION_NAMES, Functions, Tables
from patchbay.expressions.truthiness import is_false

Node: TypeAlias = Any  # a jmespath AST node: {"type", "children", "value"}


class ExprError(ConfigError, ValueError):
    """An expression that cannot run: bad syntax, unknown function, wrong argument count.

    `position` is the 0-based column in the text given to compile_expr or render_template.
    """

    def __init__(self, message: str, position: int = 0) -> None:
        self.message = message
        self.position = position
        super().__init__(message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


class Expr:
    """A compiled expression; `search(data)` evaluates it against a record."""

    __slots__ = ("text", "ast", "_run")

    def __init__(self, text: str, ast: Node, functions: Functions) -> None:
        self.text = text
        self.ast = ast
        self._run = _Compiler(functions).compile(ast)

    def search(self, data: Any) -> Any:
        """Evaluate against `data`; bad data (to_int('abc')) raises RecordInvalid."""
        try:
            return self._run(data)
        except jexc.JMESPathTypeError as exc:
            msg = f"{exc.function_name}() expected {' or '.join(exc.expected_types)}, got {exc.actual_type}"
            if exc.actual_type not in ("null", "object", "array"):
                msg += f" {show(exc.current_value)}"
            raise self._invalid(msg) from exc
        except (DataError, jexc.JMESPathError) as exc:
            raise self._invalid(str(exc)) from exc
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            raise self._invalid(f"{type(exc).__name__}: {exc}") from exc

    def _invalid(self, message: str) -> RecordInvalid:
        return RecordInvalid([Violation("", f"{message} (in `{self.text}`)")], step="expression")

    def __repr__(self) -> str:
        return f"Expr({self.text!r})"


class _Compiler:
    """Turns the common node types into closures (the hot path); the rest run on jmespath's interpreter."""

    def __init__(self, functions: Functions) -> None:
        self.functions = functions
        self.interp = TreeInterpreter(Options(custom_functions=functions))

    def compile(self, node: Node) -> Callable[[Any], Any]:
        kind = node["type"]
        kids = node.get("children", [])
        if kind == "field":
            key = node["value"]
            return lambda v: v.get(key) if isinstance(v, dict) else None
        if kind in ("subexpression", "pipe"):
            if kind == "subexpression" and all(k["type"] == "field" for k in kids):
                keys = tuple(k["value"] for k in kids)

                def path(v: Any) -> Any:
                    for key in keys:
                        if not isinstance(v, dict):
                            return None
                        v = v.get(key)
                    return v

                return path
            steps = [self.compile(k) for k in kids]

            def chain(v: Any) -> Any:
                for step in steps:
                    v = step(v)
                return v

            return chain
        if kind == "literal":
            const = node["value"]
            return lambda v: const
        if kind in ("current", "identity"):
            return lambda v: v
        if kind == "or_expression":
            left, right = self.compile(kids[0]), self.compile(kids[1])

            def or_(v: Any) -> Any:
                got = left(v)
                return right(v) if is_false(got) else got

            return or_
        if kind == "and_expression":
            left, right = self.compile(kids[0]), self.compile(kids[1])

            def and_(v: Any) -> Any:
                got = left(v)
                return got if is_false(got) else right(v)

            return and_
        if kind == "not_expression":
            inner = self.compile(kids[0])

            def not_(v: Any) -> Any:
                got = inner(v)
                if got == 0 and isinstance(got, int | float) and not isinstance(got, bool):
                    return False  # JMESPath: !0 is false
                return not got

            return not_
        if kind == "function_expression":
            return self._function(node["value"], [self.compile(k) for k in kids])
        visit = self.interp.visit
        return lambda v: visit(node, v)

    def _function(self, name: str, args: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
        entry, funcs = ENTRIES[name], self.functions
        if len(args) == 1:
            (arg,) = args
            return lambda v: entry.call(funcs, [arg(v)])
        return lambda v: entry.call(funcs, [a(v) for a in args])


def walk(node: Node) -> Iterator[Node]:
    """`node` and every node below it."""
    yield node
    for child in node.get("children", ()):
        if isinstance(child, dict):
            yield from walk(child)


def _function_position(text: str, name: str) -> int:
    m = re.search(rf"(?<![\w'\"`]){re.escape(name)}\s*\(", text)
    return m.start() if m else 0


def parse(text: str) -> Node:
    """The AST of `text`, or ExprError for a syntax error."""
    shown = text.strip()
    if not shown:
        raise ExprError("empty expression", 0)
    try:
        # The lexer accepts `text` (not JSON) with a deprecation warning; we reject it instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for token in Lexer().tokenize(text):
                if caught:
                    raise ExprError(
                        f"invalid expression `{shown}`: `{token['value']}` between backticks must be JSON;"
                        f" for text write '{token['value']}' in single quotes",
                        token["start"],
                    )
        return Parser().parse(text).parsed
    except jexc.IncompleteExpressionError:
        raise ExprError(f"invalid expression `{shown}`: incomplete expression", len(text.rstrip())) from None
    except jexc.LexerError as exc:
        pos = exc.lexer_position
        raise ExprError(f"invalid expression `{shown}`: {exc.message} at column {pos}", pos) from None
    except jexc.ParseError as exc:
        pos = exc.lex_position
        if exc.token_type == "EOF":
            raise ExprError(
                f"invalid expression `{shown}`: incomplete expression", len(text.rstrip())
            ) from None
        raise ExprError(
            f"invalid expression `{shown}`: unexpected {exc.token_value!r} at column {pos}", pos
        ) from None


def check(text: str, ast: Node, tables: Tables | None) -> None:
    """ExprError for what can be known before running: unknown functions and tables, argument counts, bad regexes."""
    for node in walk(ast):
        if node["type"] != "function_expression":
            continue
        name, args = node["value"], node["children"]
        pos = _function_position(text, name)
        if name not in ENTRIES:
            close = difflib.get_close_matches(name, FUNCTION_NAMES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ExprError(f"unknown function '{name}'{hint} (functions: {', '.join(FUNCTION_NAMES)})", pos)
        entry = ENTRIES[name]
        lo, hi = entry.lo, entry.hi
        if not lo <= len(args) <= hi:
            want = f"{lo}" if lo == hi else f"at least {lo}" if hi == math.inf else f"{lo} to {int(hi)}"
            raise ExprError(f"{name}() takes {want} argument(s), got {len(args)} (in `{text}`)", pos)
        literal = [a["value"] if a["type"] == "literal" else None for a in args]
        if name == "lookup" and isinstance(literal[0], str) and literal[0] not in (tables or {}):
            known = sorted(tables or {})
            close = difflib.get_close_matches(literal[0], known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            listed = (
                f"tables: {', '.join(known)}" if known else "no tables are defined; add them under `tables:`"
            )
            raise ExprError(f"lookup(): unknown table '{literal[0]}'{hint} ({listed})", pos)
        if name == "regex_replace" and isinstance(literal[1], str):
            try:
                re.compile(literal[1])
            except re.error as exc:
                raise ExprError(f"regex_replace(): bad pattern {literal[1]!r}: {exc}", pos) from None


def compile_expr(text: str, *, tables: Tables | None = None) -> Expr:
    """Compile a JMESPath expression once; raises ExprError on bad syntax or an unknown function.

    Args:
        tables: lookup tables that `lookup('name', key)` may refer to.
    """
    ast = parse(text)
    check(text, ast, tables)
    return Expr(text.strip(), ast, Functions(tables) if tables else DEFAULT_FUNCTIONS)


_DYNAMIC = frozenset({"field", "current", "identity", "function_expression"})


def _constant_truth(node: Node, interp: TreeInterpreter) -> bool | None:
    """True/False when `node` has the same truthiness on every record, None when it depends."""
    if not any(n["type"] in _DYNAMIC for n in walk(node)):
        try:
            return not is_false(interp.visit(node, None))
        except (ValueError, TypeError):
            return None
    kind, kids = node["type"], node.get("children", [])
    if kind == "not_expression":
        inner = _constant_truth(kids[0], interp)
        return None if inner is None else not inner
    if kind in ("and_expression", "or_expression"):
        sides = [_constant_truth(k, interp) for k in kids]
        decisive: bool = kind == "or_expression"  # true decides an or, false decides an and
        if decisive in sides:
            return decisive
        if sides[0] is not None and sides[0] == sides[1]:
            return sides[0]
    return None


def is_constant(expr: Expr) -> bool:
    """True when the expression reads nothing of the record (the same value for every record)."""
    return not any(n["type"] in _DYNAMIC for n in walk(expr.ast))


def is_constant_false(expr: Expr | str) -> bool:
    """True when the expression is false for every record (`false`, `null`, `x && false`...)."""
    if isinstance(expr, str):
        expr = compile_expr(expr)
    return _constant_truth(expr.ast, TreeInterpreter(Options(custom_functions=DEFAULT_FUNCTIONS))) is False

"""The expression language of map, filter, `when`, routes and templates: JMESPath plus Patchbay's functions.

It sits below config, connectors, processors and the engine, which all use it:

    conversions.py  JSON values to text, numbers, booleans and dates; DataError
    functions.py    the functions (lower, to_int, lookup, ...) and their argument checks
    truthiness.py   what counts as true, for `filter`, `when` and the operators alike
    compiler.py     parse and check at load time (ExprError), compile to closures (Expr)
    templates.py    text with `{{ expr }}` placeholders (Template)
"""

from __future__ import annotations

from patchbay.expressions.compiler import Expr, ExprError, compile_expr, is_constant, is_constant_false
from patchbay.expressions.conversions import (
    DataError,
    describe,
    iso,
    parse_datetime,
    show,
    to_bool,
    to_float,
    to_int,
    to_str,
    to_text,
    type_name,
)
from patchbay.expressions.functions import FUNCTION_NAMES, Functions, Tables
from patchbay.expressions.templates import Template, render_template
from patchbay.expressions.truthiness import is_truthy

__all__ = [
    "FUNCTION_NAMES",
    "DataError",
    "Expr",
    "ExprError",
    "Functions",
    "Tables",
    "Template",
    "compile_expr",
    "describe",
    "is_constant",
    "is_constant_false",
    "is_truthy",
    "iso",
    "parse_datetime",
    "render_template",
    "show",
    "to_bool",
    "to_float",
    "to_int",
    "to_str",
    "to_text",
    "type_name",
]

"""Templates: text with `{{ expr }}` placeholders, compiled once, rendered per record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from patchbay.expressions.compiler import Expr, ExprError, check, parse
from patchbay.expressions.conversions import to_text
from patchbay.expressions.functions import DEFAULT_FUNCTIONS, Functions, Tables


class Template:
    """A string with `{{ expr }}` placeholders, compiled once."""

    __slots__ = ("text", "_parts", "expressions")

    def __init__(self, text: str, parts: list[str | Expr]) -> None:
        self.text = text
        self._parts = parts
        self.expressions: list[Expr] = [p for p in parts if isinstance(p, Expr)]

    @property
    def is_static(self) -> bool:
        return not self.expressions

    def render(self, data: Any, quote: Callable[[str], str] | None = None) -> str:
        """Fill the placeholders from `data` (null -> ''); `quote` escapes each value (e.g. for URLs)."""
        if not self.expressions:
            return self.text
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            else:
                s = to_text(part.search(data))
                out.append(quote(s) if quote is not None and s else s)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def render_template(text: str, *, tables: Tables | None = None) -> Template:
    """Compile a string with `{{ expr }}` placeholders; ExprError positions are columns in `text`."""
    if "{{" not in text:
        return Template(text, [text])
    parts: list[str | Expr] = []
    i = 0
    while (start := text.find("{{", i)) >= 0:
        if start > i:
            parts.append(text[i:start])
        body = start + 2
        end = text.find("}}", body)
        if end < 0:
            raise ExprError(f"unclosed placeholder at column {start}: '{{{{' without '}}}}'", start)
        first_error: ExprError | None = None
        # A `}}` may belong to the expression (`{a: {b: c}}`): try each closing `}}` until one parses.
        while end >= 0:
            inner = text[body:end]
            try:
                ast = parse(inner)
                break
            except ExprError as exc:
                if not inner.strip():
                    raise ExprError(f"empty placeholder at column {start}", start) from None
                first_error = first_error or ExprError(exc.message, body + exc.position)
                end = text.find("}}", end + 1)
        else:
            assert first_error is not None
            raise first_error
        try:
            check(inner, ast, tables)
        except ExprError as exc:
            raise ExprError(exc.message, body + exc.position) from None
        parts.append(Expr(inner.strip(), ast, Functions(tables) if tables else DEFAULT_FUNCTIONS))
        i = end + 2
    if i < len(text):
        parts.append(text[i:])
    return Template(text, parts)

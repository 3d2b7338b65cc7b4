"""Errors found while loading, as `file:line` problems: pydantic errors, unknown names, bad expressions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

from patchbay.config.source import Loc, Located
from patchbay.errors import Problem
from patchbay.expressions import Expr, ExprError, compile_expr


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`; did you mean 'crm'? (known: crm, website)`: appended to a message about an unknown name."""
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known: {', '.join(options) or 'none'})"


def pydantic_problems(
    src: Located, exc: ValidationError, base: Loc = (), model: type[BaseModel] | None = None
) -> list[Problem]:
    """One problem per validation error, at the line of the value it is about."""
    out = []
    for err in exc.errors():
        loc = tuple(base) + tuple(
            x for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "tagged-")))
        )
        kind = err["type"]
        where = ".".join(str(x) for x in err["loc"]) or "document"
        if kind == "extra_forbidden":
            key = str(err["loc"][-1])
            known = _known_fields(model, err["loc"][:-1]) if model else []
            msg = f"unknown setting {key!r}" + (did_you_mean(key, known) if known else "; remove it")
        elif kind == "missing":
            msg = f"missing required setting {where!r}; add it"
            loc = loc[:-1] if len(loc) > len(base) else loc
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{where}: {text}" if err["loc"] else text
        out.append(src.problem(loc, msg))
    return out


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        f = cur.model_fields.get(part) if hasattr(cur, "model_fields") else None
        if f is None:
            return []
        ann = f.annotation
        cur = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), None)
        if cur is None:
            return []
    return list(cur.model_fields) if hasattr(cur, "model_fields") else []


def validate(src: Located, data: Any, model: type[BaseModel], base: Loc, problems: list[Problem]) -> Any:
    """`model` validated from `data`, or None with its errors added to `problems`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(src, exc, base, model))
        return None


def compile_at(src: Located, text: str, loc: Loc, problems: list[Problem]) -> Expr | None:
    """The compiled expression written at `loc`, or None with its error added to `problems`."""
    try:
        return compile_expr(text)
    except ExprError as exc:
        problems.append(src.problem(loc, str(exc)))
        return None

"""YAML loading that remembers where every value came from, so errors point at file:line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from patchbay.errors import Problem

Loc = tuple[str | int, ...]


@dataclass
class Located:
    """A parsed document plus the line of every path in it (1-based)."""

    file: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line(self, loc: Loc) -> int:
        """Line of the deepest known prefix of `loc`."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), 1)

    def problem(self, loc: Loc, message: str) -> Problem:
        return Problem(self.file, self.line(loc), message)

    def sub(self, prefix: Loc) -> Located:
        """The same file seen from inside `prefix` (for a document holding many items)."""
        n = len(prefix)
        lines = {k[n:]: v for k, v in self.lines.items() if k[:n] == tuple(prefix)}
        data: Any = self.data
        for p in prefix:
            data = data[p]
        return Located(self.file, data, lines)


class _Loader(yaml.SafeLoader):
    pass


def _build(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, lines: dict[Loc, int], file: str) -> Any:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise _Bad(knode.start_mark.line + 1, "keys must be plain names")
            key = str(key)
            if key in out:
                raise _Bad(knode.start_mark.line + 1, f"key {key!r} appears twice in the same mapping")
            out[key] = _build(loader, vnode, (*loc, key), lines, file)
            lines[(*loc, key)] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, v, (*loc, i), lines, file) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


class _Bad(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(message)


def load_yaml(path: Path, display: str | None = None) -> Located:
    """Parse one YAML file; raise `ConfigError` with file:line on malformed input."""
    from patchbay.errors import ConfigError

    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(name, 1, f"not UTF-8 text ({exc.reason}); save the file as UTF-8")]
        ) from exc
    return parse_yaml(text, name)


def parse_yaml(text: str, name: str) -> Located:
    from patchbay.errors import ConfigError

    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Loc, int] = {}
        data = {} if node is None else _build(loader, node, (), lines, name)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = exc.problem or str(exc)
        raise ConfigError(
            [Problem(name, line, f"YAML syntax: {what}; fix the indentation or quoting")]
        ) from exc
    except _Bad as exc:
        raise ConfigError([Problem(name, exc.line, str(exc))]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(name, 1, f"YAML: {exc}")]) from exc
    finally:
        loader.dispose()
    return Located(name, data, lines)

"""YAML loading that remembers where every value came from, so errors point at file:line."""

from __future__ import annotations

from collections.abc import Callable
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


#: The bounds on what one YAML file may cost, so hostile input fails fast with file:line.
MAX_BYTES = 4 * 1024 * 1024  # a config file larger than this is refused before it is parsed
MAX_DEPTH = 100  # collections nested deeper than this (also through aliases)
MAX_ALIAS_VALUES = 100_000  # values that aliases (*name) and merge keys (<<) may expand to, in all

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_MAP, _SEQ, _MERGE = _YAML + "map", _YAML + "seq", _YAML + "merge"
_AS_TEXT = frozenset({_MERGE, _YAML + "value"})  # `<<` outside a key and `=`: YAML 1.1 oddities, text to us


class _Composing(yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """PyYAML's composer with a depth limit (it recurses once per level), on a parser's events."""

    def __init__(self) -> None:
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        yaml.composer.Composer.__init__(self)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Bad(self.peek_event().start_mark.line + 1, _too_deep())  # type: ignore[attr-defined]
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self.depth -= 1


class _PyLoader(_Composing, yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, text: str) -> None:
        yaml.reader.Reader.__init__(self, text)  # checks every character
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _Composing.__init__(self)


_Loader: Callable[[str], _Composing] = _PyLoader
if yaml.__with_libyaml__:  # libyaml scans and parses about ten times faster than pure Python
    from yaml._yaml import CParser

    class _CLoader(_Composing, CParser):  # type: ignore[misc]
        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _Composing.__init__(self)

    _Loader = _CLoader


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep; flatten the structure"


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_YAML) :] if tag.startswith(_YAML) else tag


class _Builder:
    """Turns composed nodes into plain dicts, lists and scalars, recording the line of every path.

    Aliases are expanded (each use gets its own lines), so their cost is counted: a few anchors
    repeated inside each other ("billion laughs") would otherwise grow without bound.
    """

    def __init__(self, loader: _Composing) -> None:
        self.loader = loader
        self.lines: dict[Loc, int] = {}
        self.built: set[int] = set()  # ids of nodes built once: building one again expands an alias
        self.path: list[int] = []  # ids of the collections being built or merged, outermost first
        self.expanded = 0
        self.merged: dict[int, list[tuple[str, yaml.Node, yaml.Node]]] = {}

    def build(self, node: yaml.Node, loc: Loc, line: int) -> Any:
        """`node` as plain values; errors point at `line`, where it is used (an alias's target is
        defined elsewhere, so everything inside an expanded alias points at the alias)."""
        self.lines[loc] = node.start_mark.line + 1
        again = id(node) in self.built
        if not again:
            self.built.add(id(node))
        else:
            self.expanded += 1
            if self.expanded > MAX_ALIAS_VALUES:
                raise _Bad(
                    line,
                    f"aliases expand to more than {MAX_ALIAS_VALUES:,} values; "
                    "write the values out or nest fewer aliases inside each other",
                )
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        self.enter(node, line)
        try:
            if isinstance(node, yaml.MappingNode):
                self.check_tag(node, _MAP)
                out: dict[str, Any] = {}
                for key, knode, vnode in self.pairs(node, line):
                    kline = knode.start_mark.line + 1
                    out[key] = self.build(vnode, (*loc, key), line if again else kline)
                    self.lines[(*loc, key)] = kline
                return out
            self.check_tag(node, _SEQ)
            return [
                self.build(v, (*loc, i), line if again else v.start_mark.line + 1)
                for i, v in enumerate(node.value)
            ]
        finally:
            self.path.pop()

    def enter(self, node: yaml.Node, line: int) -> None:
        if len(self.path) >= MAX_DEPTH:
            raise _Bad(line, _too_deep())
        if id(node) in self.path:
            raise _Bad(line, "an alias refers to a collection that contains it; remove the loop")
        self.path.append(id(node))

    def check_tag(self, node: yaml.Node, expected: str) -> None:
        if node.tag != expected:
            raise _Bad(
                node.start_mark.line + 1,
                f"unknown tag {_tag_name(node.tag)}; remove it: only plain YAML values "
                "(mappings, lists, text, numbers, booleans, null, dates) are read",
            )

    def scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag in _AS_TEXT:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            self.check_tag(node, "")
        return self.loader.construct_object(node, deep=True)

    def key(self, knode: yaml.Node) -> str:
        if isinstance(knode, yaml.ScalarNode):
            key = self.scalar(knode)
            if isinstance(key, str | int | float | bool):
                return str(key)
        raise _Bad(knode.start_mark.line + 1, "keys must be plain names")

    def pairs(self, node: yaml.MappingNode, line: int) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of the mapping: pairs merged in with `<<` first (the first
        merged mapping wins, as in YAML 1.1), then its own, which override them."""
        known = self.merged.get(id(node))
        if known is not None:
            return known
        own: dict[str, tuple[str, yaml.Node, yaml.Node]] = {}
        merges: list[yaml.Node] = []
        for knode, vnode in node.value:
            if isinstance(knode, yaml.ScalarNode) and knode.tag == _MERGE:
                merges.extend(vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode])
                continue
            key = self.key(knode)
            if key in own:
                raise _Bad(knode.start_mark.line + 1, f"key {key!r} appears twice in the same mapping")
            own[key] = (key, knode, vnode)
        inherited: dict[str, tuple[str, yaml.Node, yaml.Node]] = {}
        for m in merges:
            if not isinstance(m, yaml.MappingNode):
                raise _Bad(m.start_mark.line + 1, "<< merges a mapping (or a list of mappings) only")
            self.enter(m, line)
            try:
                for triple in self.pairs(m, line):
                    inherited.setdefault(triple[0], triple)
            finally:
                self.path.pop()
        result = [t for k, t in inherited.items() if k not in own] + list(own.values())
        self.merged[id(node)] = result
        return result


class _Bad(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(message)


def load_yaml(path: Path, display: str | None = None) -> Located:
    """Parse one YAML file; raise `ConfigError` with file:line on malformed or oversized input."""
    from patchbay.errors import ConfigError

    name = display or str(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # read_text reports it
    if size > MAX_BYTES:
        raise ConfigError([_too_big(name, size)])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(name, 1, f"not UTF-8 text ({exc.reason}); save the file as UTF-8")]
        ) from exc
    return parse_yaml(text, name)


def _too_big(name: str, size: int) -> Problem:
    return Problem(
        name,
        1,
        f"the file is {size / 2**20:.1f} MiB, over the {MAX_BYTES // 2**20} MiB limit for a config file; "
        "split it into several files",
    )


def parse_yaml(text: str, name: str) -> Located:
    """Parse YAML text into plain values with the line of every path. Bounded: the size, the
    nesting depth and what aliases expand to are limited, and tags other than YAML's plain ones
    are refused, each as a `ConfigError` with file:line."""
    from patchbay.errors import ConfigError

    size = len(text) if len(text) > MAX_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError([_too_big(name, size)])
    loader: _Composing | None = None
    try:
        loader = _Loader(text)
        builder = _Builder(loader)
        node = loader.get_single_node()  # type: ignore[attr-defined]
        data = {} if node is None else builder.build(node, (), node.start_mark.line + 1)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = exc.problem or str(exc)
        if "maximum nesting depth" in what:  # libyaml's own limit, met before ours in flow style
            raise ConfigError([Problem(name, line, _too_deep())]) from exc
        raise ConfigError(
            [Problem(name, line, f"YAML syntax: {what}; fix the indentation or quoting")]
        ) from exc
    except _Bad as exc:
        raise ConfigError([Problem(name, exc.line, str(exc))]) from exc
    except yaml.YAMLError as exc:
        at = getattr(exc, "position", None)  # a ReaderError (a character YAML does not allow)
        line = text.count("\n", 0, at) + 1 if isinstance(at, int) else 1
        what = str(exc).split("\n")[0]
        raise ConfigError([Problem(name, line, f"YAML: {what}")]) from exc
    finally:
        if loader is not None:
            loader.dispose()
    return Located(name, data, builder.lines)

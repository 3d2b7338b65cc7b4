"""Hostile YAML: alias bombs, deep nesting, unknown tags and huge files fail fast with file:line."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from patchbay.config import source
from patchbay.config.source import parse_yaml
from patchbay.errors import ConfigError
from tests.config.test_check import FLOW, SYSTEMS, check, p, project


def _laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each anchor is a list of `width` aliases to the one before."""
    names = [f"n{i}" for i in range(levels + 1)]
    out = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    for prev, name in zip(names, names[1:], strict=False):
        out.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(out) + "\n"


def _merge_laughs(levels: int = 9, width: int = 9) -> str:
    """The same growth through merge keys (<<), which PyYAML flattens by copying."""
    out = ["l0: &l0 {" + ", ".join(f"k{i}: {i}" for i in range(50)) + "}"]
    for i in range(1, levels + 1):
        out.append(f"l{i}: &l{i} {{<<: [{', '.join([f'*l{i - 1}'] * width)}]}}")
    return "\n".join(out) + "\n"


HOSTILE = {
    # name: (text appended to systems.yaml, expected line in systems.yaml (SYSTEMS has 10), message part)
    "alias bomb": (_laughs(), 15, "aliases expand to more than 100,000 values"),
    "deep flow list": (
        "deep: " + "[" * 100_000 + "]" * 100_000 + "\n",
        11,
        "nested more than 100 levels deep",
    ),
    "deep flow mapping": (
        "deep: " + "{a: " * 100_000 + "1" + "}" * 100_000 + "\n",
        11,
        "nested more than 100",
    ),
    "deep block mapping": (
        "deep:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(2_000)) + " " * 2001 + "x: 1\n",
        110,
        "nested more than 100 levels deep",
    ),
    "python tag on a list": ("x: !!python/tuple [1, 2]\n", 11, "unknown tag !!python/tuple"),
    "python tag on a mapping": (
        "x: !!python/object:os.system {a: 1}\n",
        11,
        "unknown tag !!python/object:os.system",
    ),
    "python tag on a scalar": ("x: !!python/name:os.system ''\n", 11, "unknown tag !!python/name:os.system"),
    "set tag": ("x: !!set {a, b}\n", 11, "unknown tag !!set"),
    "local tag": ("x:\n  - !env HOME\n", 12, "unknown tag !env"),
    "alias loop": ("x: &x [1, *x]\n", 11, "an alias refers to a collection that contains it"),
    "merge loop": ("x: &x {a: 1, <<: *x}\n", 11, "an alias refers to a collection that contains it"),
}


@pytest.mark.parametrize(("name", "case"), HOSTILE.items(), ids=list(HOSTILE))
def test_hostile_yaml_is_refused_fast_with_file_and_line(
    tmp_path: Path, name: str, case: tuple[str, int, str]
):
    text, line, message = case
    start = time.perf_counter()
    code, out = check(project(tmp_path, FLOW, SYSTEMS.lstrip() + text))
    elapsed = time.perf_counter() - start
    assert code == 2, out
    assert not any("Traceback" in o or "RecursionError" in o for o in out), out
    expected = f"{p(tmp_path, 'systems.yaml')}:{line}:"
    assert any(o.startswith(expected) and message in o for o in out), (expected, message, out)
    assert elapsed < 2.0, f"{name}: {elapsed:.2f}s"


@pytest.mark.parametrize("text", [_laughs(), _laughs(levels=30, width=2), _merge_laughs()])
def test_alias_expansion_is_bounded_in_memory_and_time(text: str):
    def parse() -> None:
        try:
            parse_yaml(text, "bomb.yaml")
        except ConfigError as exc:
            assert exc.problems[0].file == "bomb.yaml"
            assert "aliases expand" in exc.problems[0].message

    start = time.perf_counter()
    parse()
    assert time.perf_counter() - start < 1.5
    tracemalloc.start()
    try:
        parse()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_merge_keys_follow_yaml_and_are_not_reported_as_duplicates():
    doc = parse_yaml(
        "base: &b {x: 1, y: 2}\nmore: &m {y: 9, z: 3}\nd:\n  <<: [*b, *m]\n  y: 5\n  w: 0\n", "f.yaml"
    )
    # Own keys override merged ones; the first merged mapping wins over later ones.
    assert doc.data["d"] == {"x": 1, "z": 3, "y": 5, "w": 0}
    assert doc.line(("d", "y")) == 5 and doc.line(("d", "x")) == 1
    with pytest.raises(ConfigError) as exc:
        parse_yaml("d:\n  <<: {x: 1}\n  y: 1\n  y: 2\n", "f.yaml")
    assert exc.value.problems[0].line == 4 and "appears twice" in exc.value.problems[0].message


def test_a_few_aliases_still_work_and_each_use_has_its_lines():
    doc = parse_yaml("retry: &r {schedule: [5s, 1m]}\na: {retry: *r}\nb:\n  retry: *r\n", "f.yaml")
    assert doc.data["a"]["retry"] == doc.data["b"]["retry"] == {"schedule": ["5s", "1m"]}
    assert doc.data["a"]["retry"] is not doc.data["b"]["retry"]
    assert doc.line(("b", "retry")) == 4


def test_a_character_yaml_does_not_allow_is_reported_on_its_line():
    with pytest.raises(ConfigError) as exc:
        parse_yaml("a: 1\nb: 2\nc: \x7f\n", "f.yaml")
    [problem] = exc.value.problems
    assert problem.line == 3 and problem.message.startswith("YAML: unacceptable character #x007f")


def test_plain_tags_are_still_read():
    doc = parse_yaml("a: !!str 12\nb: !!int '7'\nc: !!map {x: !!null ''}\nd: !!seq [!!bool yes]\n", "f.yaml")
    assert doc.data == {"a": "12", "b": 7, "c": {"x": None}, "d": [True]}
    assert parse_yaml("op: =\nx: [<<]\n", "f.yaml").data == {"op": "=", "x": ["<<"]}


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path: Path):
    big = "x: " + "y" * (source.MAX_BYTES + 1) + "\n"
    start = time.perf_counter()
    code, out = check(project(tmp_path, FLOW, SYSTEMS.lstrip() + big))
    assert code == 2
    assert any(
        o.startswith(f"{p(tmp_path, 'systems.yaml')}:1: the file is 4.0 MiB, over the 4 MiB limit")
        for o in out
    ), out
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ConfigError, match="over the 4 MiB limit"):
        parse_yaml(big, "f.yaml")


@pytest.mark.parametrize("loader", ["_PyLoader", "_CLoader"])
@pytest.mark.parametrize(("name", "case"), HOSTILE.items(), ids=list(HOSTILE))
def test_both_parsers_refuse_the_same(monkeypatch, loader: str, name: str, case: tuple[str, int, str]):
    """libyaml parses when PyYAML was built with it; the pure-Python parser is the fallback."""
    if not hasattr(source, loader):
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(source, "_Loader", getattr(source, loader))
    text, line, message = case
    start = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        parse_yaml(SYSTEMS.lstrip() + text, "systems.yaml")
    [problem] = exc.value.problems
    assert (problem.line, message in problem.message) == (line, True), problem
    assert time.perf_counter() - start < 2.0

"""Where steps and connectors register by name; modules in processors/ and connectors/ are discovered.

The engine looks connectors and steps up here by the name a YAML file gives; it never imports a
vendor module by name. The config loader checks steps and connectors through this module too
(CheckIssue, build_to_check), so config never imports the layers above it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

T = TypeVar("T")
Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type[Any]
    config: type[BaseModel]
    roles: tuple[str, ...]  # "step", "source", "destination"
    system_config: type[BaseModel] | None = None
    summary: str = ""
    status: str = "stable"
    extra: str | None = None  # pip extra that provides its driver


def install_hint(extra: str) -> str:
    """How to install the driver of a connector whose Entry.extra is `extra`: the one wording."""
    return f"pip install 'patchbay[{extra}]'"


@dataclass
class CheckIssue:
    """A problem a step's static check finds, at `loc` inside the step's own config.

    `never_passes` says that no record gets through the step (a filter that is always false): the
    loader then reports the steps and destinations after it as unreachable.
    """

    loc: Loc
    message: str
    never_passes: bool = False


STEPS: dict[str, Entry] = {}
CONNECTORS: dict[str, Entry] = {}
_discovered = False


def step(name: str, *, config: type[BaseModel], summary: str = "") -> Callable[[type[T]], type[T]]:
    """Register a step class (map, validate, ...) under `name`."""

    def deco(cls: type[T]) -> type[T]:
        STEPS[name] = Entry(name, cls, config, ("step",), summary=summary or _doc(cls))
        cls.kind = name  # type: ignore[attr-defined]
        return cls

    return deco


def connector(
    name: str,
    *,
    roles: tuple[str, ...],
    config: type[BaseModel],
    system_config: type[BaseModel],
    summary: str = "",
    status: str = "stable",
    extra: str | None = None,
) -> Callable[[type[T]], type[T]]:
    """Register a connector: `system_config` sits on the system, `config` on each destination/source use."""

    def deco(cls: type[T]) -> type[T]:
        merged, text, needs = roles, summary or _doc(cls), extra
        if name in CONNECTORS:  # a source class and a destination class may share a name
            old = CONNECTORS[name]
            merged = tuple(dict.fromkeys(old.roles + roles))
            text, needs = old.summary or text, old.extra or needs
        CONNECTORS[name] = Entry(name, cls, config, merged, system_config, text, status, needs)
        _BY_ROLE.setdefault(name, {}).update({r: (cls, config) for r in roles})
        cls.kind = name  # type: ignore[attr-defined]
        return cls

    return deco


_BY_ROLE: dict[str, dict[str, tuple[type[Any], type[BaseModel]]]] = {}


def connector_for(name: str, role: str) -> tuple[type[Any], type[BaseModel]] | None:
    discover()
    return _BY_ROLE.get(name, {}).get(role)


_offline_resources: Callable[[], Any] | None = None


def offline_resources(factory: type[T]) -> type[T]:
    """Register what connectors are given when they are built only to be checked (connectors/base.py's
    Resources): no credentials, no connection."""
    global _offline_resources
    _offline_resources = factory
    return factory


def build_to_check(cls: type[T], system_config: Any, config: Any, policy: Any) -> T:
    """Build a connector as `check` does, so that its constructor compiles its templates and expressions
    and refuses what its config model let through; nothing is resolved or connected."""
    discover()
    if _offline_resources is None:
        raise RuntimeError("no connector module registered its Resources with registry.offline_resources")
    return cls(system_config, config, policy, _offline_resources())  # type: ignore[call-arg]


def _doc(cls: type[Any]) -> str:
    mod = importlib.import_module(cls.__module__)
    return ((mod.__doc__ or cls.__doc__ or "").strip().splitlines() or [""])[0]


def discover() -> None:
    """Import every module of patchbay.processors and patchbay.connectors once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for pkg_name in ("patchbay.processors", "patchbay.connectors"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_") or info.name == "base" or info.name.endswith("_client"):
                continue
            importlib.import_module(f"{pkg_name}.{info.name}")

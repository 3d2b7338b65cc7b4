"""What every concrete store says itself. PostgresStore subclasses SqliteStore, so a fact about the store kind
that a subclass only inherits is the other store's answer (an inherited in-memory lease broke a lease test once).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import patchbay.store
from patchbay.store.base import Leases, Store

# Facts of the store kind: each concrete store class declares them in its own body.
DECLARED_BY_EACH = ("leases_in_store", "shared")


def concrete_stores() -> list[type]:
    """Every class of patchbay/store/ with all of the Store protocol's members (the protocols excepted)."""
    members = {n for n in dir(Store) if not n.startswith("_")}
    found = []
    for info in pkgutil.walk_packages(patchbay.store.__path__, "patchbay.store."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if (
                inspect.isclass(cls)
                and cls.__module__ == module.__name__
                and not getattr(cls, "_is_protocol", False)
                and not members - set(dir(cls))
            ):
                found.append(cls)
    return found


def test_both_stores_are_found() -> None:
    assert sorted(c.__name__ for c in concrete_stores()) == ["PostgresStore", "SqliteStore"]


def test_the_protocol_declares_where_leases_live_with_its_meaning() -> None:
    prop = Leases.__dict__.get("leases_in_store")
    assert isinstance(prop, property) and prop.__doc__ and "memory" in prop.__doc__
    assert "leases_in_store" in dir(Store)


def test_each_concrete_store_declares_the_facts_of_its_kind_itself() -> None:
    missing = [
        f"{cls.__name__}.{name}"
        for cls in concrete_stores()
        for name in DECLARED_BY_EACH
        if name not in vars(cls)
    ]
    assert missing == [], "declare these in the class itself, not by inheriting another store's answer"


def test_where_leases_live_is_one_property() -> None:
    """`local_leases` and the leader's `shared and not local_leases` were two flags for one fact."""
    assert [c.__name__ for c in concrete_stores() if hasattr(c, "local_leases")] == []

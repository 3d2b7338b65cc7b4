"""The identity map's rules over identities in memory (engine/identity.py): link, review, settle, plan."""

from __future__ import annotations

from typing import Any

import pytest

from patchbay.config.entities import EntityDoc, EntitySpec
from patchbay.engine.identity import Incoming, Session, normalize, read_record, same
from patchbay.expressions import compile_expr
from patchbay.store.base import Identity, IdentityLookup


def entity(**over: Any) -> EntitySpec:
    doc: dict[str, Any] = {
        "fields": {
            "email": {"owner": "crm"},
            "name": {"owner": "crm"},
            "plan": {"owner": "billing"},
            "phone": {"rule": "latest"},
            "source": {"rule": "first"},
            "notes": {"rule": "manual"},
            "zip": {"rule": "latest"},
        },
        "match": [
            {"field": "email", "normalize": "email"},
            {"fields": ["name", "zip"], "normalize": "lower", "weak": True},
        ],
        "systems": {
            "crm": {
                "id": "id",
                "fields": {f: f for f in ("email", "name", "phone", "source", "notes", "zip")},
            },
            "billing": {
                "id": "cus",
                "fields": {"email": "mail", "plan": "plan", "phone": "tel", "zip": "zip"},
                "deleted": "deleted == `true`",
            },
            "mkt": {
                "id": "id",
                "fields": {"email": "email", "name": "name", "notes": "notes", "source": "src"},
            },
        },
        **over,
    }
    ent = EntitySpec("customer", EntityDoc.model_validate(doc), "entities/customer.yaml", 1)
    ent.deleted = {"billing": compile_expr("deleted == `true`")}
    return ent


def session(ent: EntitySpec, *idents: Identity) -> Session:
    s = Session(ent, IdentityLookup(identities={i.id: i for i in idents}), now=1000.0)
    for i in idents:
        s._index(i)
    return s


def inc(system: str, rid: str, **values: Any) -> Incoming:
    return Incoming(system, rid, values)


def test_normalised_keys_and_equal_values():
    assert normalize("  Ada@Example.COM ", "email") == "ada@example.com"
    assert normalize("Ada  Lovelace", "lower") == "ada lovelace"
    assert normalize("+33 (0)6 12", "digits") == "330612"
    assert normalize("", "email") is None and normalize(None, "none") is None
    assert same(1, 1.0) and same(5, "5") and not same(True, 1) and not same(None, "")


def test_a_record_is_read_through_its_systems_mapping():
    ent = entity()
    got = read_record(ent, "billing", {"cus": "cus_9", "mail": "a@x.io", "plan": "pro", "deleted": True})
    assert got.record_id == "cus_9" and got.values["email"] == "a@x.io" and got.values["plan"] == "pro"
    assert got.deleted and got.values["phone"] is None


def test_records_link_by_their_normalised_email_and_a_create_becomes_an_update_once_linked():
    ent = entity()
    s = session(ent)
    first = s.apply(inc("crm", "45", email="ada@example.com", name="Ada", phone="1"), "e1")
    assert first.action == "created"
    ident = first.identity
    assert ident is not None
    [op] = s.plan(ident, {"billing"})
    assert op.op == "create" and op.values == {"email": "ada@example.com", "phone": "1"}
    assert op.as_record(ent, ident)["fields"] == {"mail": "ada@example.com", "tel": "1"}
    s.wrote(ident, op, "e1", "billing_create")
    assert s.plan(ident, {"billing"}) == []  # a create in flight: never a second one
    echo = s.apply(inc("billing", "cus_9", email=" ADA@example.com", plan=None, phone="1", zip=None), "e2")
    assert echo.identity is ident and echo.action == "linked"
    assert ident.systems["billing"]["id"] == "cus_9"
    # billing wrote the email its own way: the CRM owns it, so that is a conflict and billing gets it back
    [c] = echo.conflicts
    assert (c.field, c.kind, c.winner) == ("email", "owned", "crm")
    [fix] = s.plan(ident, {"billing", "crm"})
    assert (fix.system, fix.op, fix.id, fix.values) == (
        "billing",
        "update",
        "cus_9",
        {"email": "ada@example.com"},
    )


def test_the_echo_of_a_write_is_recognised_by_value_whatever_the_system_stamps():
    ent = entity()
    s = session(ent)
    ident = s.apply(inc("crm", "45", email="a@x.io", phone="1", zip=None), "e1").identity
    assert ident is not None
    s.apply(inc("billing", "cus_9", email="a@x.io", phone="1", plan=None, zip=None), "e2")
    s.apply(inc("crm", "45", email="a@x.io", phone="2", zip=None), "e3")
    [op] = s.plan(ident, {"billing", "crm"})
    assert (op.system, op.values) == ("billing", {"phone": "2"})
    s.wrote(ident, op, "e3", "billing_update")
    # A read from before the write landed says phone 1, as billing last said: not a change.
    stale = s.apply(inc("billing", "cus_9", email="a@x.io", phone="1", plan=None, zip=None), "e4")
    assert stale.changed == [] and not stale.conflicts
    assert s.plan(ident, {"billing", "crm"}) == []  # the write is on its way: not sent twice
    # The write read back (with whatever updated_at billing stamped) is its echo: nothing goes anywhere.
    back = s.apply(inc("billing", "cus_9", email="a@x.io", phone="2", plan=None, zip=None), "e5")
    assert back.changed == [] and not back.conflicts
    assert ident.systems["billing"]["written"] == {}
    assert s.plan(ident, {"billing", "crm"}) == []


def test_a_non_owner_change_is_a_conflict_and_the_owner_value_is_written_back():
    ent = entity()
    s = session(ent)
    ident = s.apply(inc("crm", "45", email="a@x.io", name="Ada"), "e1").identity
    assert ident is not None
    s.apply(inc("mkt", "m1", email="a@x.io", name="Ada"), "e2")
    out = s.apply(inc("mkt", "m1", email="a@x.io", name="Ada L."), "e3")
    [c] = out.conflicts
    assert (c.kind, c.winner, c.winner_value, c.status) == ("owned", "crm", "Ada", "settled")
    assert [v["value"] for v in c.values] == ["Ada", "Ada L."]
    assert ident.golden["name"]["value"] == "Ada"
    ops = {o.system: o for o in s.plan(ident, {"crm", "mkt"})}
    assert set(ops) == {"mkt"} and ops["mkt"].values == {"name": "Ada"}  # never a write against the owner


def test_a_non_owner_change_of_a_value_the_owner_got_from_elsewhere_names_the_owner_in_the_conflict():
    # The customer started in mkt: the CRM (the owner of `name`) got it from the hub's create and read it
    # back as an echo. A later mkt edit of the name is a conflict between the owner's value and mkt's.
    ent = entity()
    s = session(ent)
    ident = s.apply(inc("mkt", "m1", email="a@x.io", name="Ada"), "e1").identity
    assert ident is not None
    [op] = s.plan(ident, {"crm"})
    s.wrote(ident, op, "e1", "crm_create")
    s.apply(inc("crm", "45", email="a@x.io", name="Ada"), "e2")  # the create read back
    [c] = s.apply(inc("mkt", "m1", email="a@x.io", name="Ada L."), "e3").conflicts
    assert [(v["system"], v["value"]) for v in c.values] == [("crm", "Ada"), ("mkt", "Ada L.")]
    assert (c.winner, c.winner_value) == ("crm", "Ada")


def test_concurrent_changes_of_a_shared_field_follow_its_rule_and_are_recorded():
    ent = entity()
    s = session(ent)
    ident = s.apply(inc("crm", "45", email="a@x.io", phone="1", source="web", notes="n0"), "e1").identity
    assert ident is not None
    s.apply(inc("mkt", "m1", email="a@x.io", source="web", notes="n0"), "e2")
    s.apply(inc("billing", "cus_9", email="a@x.io", phone="1"), "e3")
    # the CRM changes the phone; before billing has read it back, billing changes it too
    s.apply(inc("crm", "45", email="a@x.io", phone="2", source="web", notes="n0"), "e4")
    out = s.apply(inc("billing", "cus_9", email="a@x.io", phone="3"), "e5")
    [c] = out.conflicts
    assert (c.field, c.kind, c.rule, c.winner, c.winner_value) == (
        "phone",
        "concurrent",
        "latest",
        "billing",
        "3",
    )
    assert ident.golden["phone"]["value"] == "3"
    # `first`: the first value stays
    s.apply(inc("crm", "45", email="a@x.io", phone="3", source="ads", notes="n0"), "e6")
    assert ident.golden["source"]["value"] == "ads"  # a plain change: nobody else had changed it
    out = s.apply(inc("mkt", "m1", email="a@x.io", source="fair", notes="n0"), "e7")
    [c] = out.conflicts
    assert (c.rule, c.winner, c.winner_value) == ("first", "crm", "ads")
    # `manual`: held until a person decides; nobody receives it meanwhile
    s.apply(inc("crm", "45", email="a@x.io", phone="3", source="ads", notes="n1"), "e8")
    out = s.apply(inc("mkt", "m1", email="a@x.io", source="fair", notes="n2"), "e9")
    [c] = out.conflicts
    assert (c.rule, c.status, c.winner) == ("manual", "open", None)
    assert all("notes" not in o.values for o in s.plan(ident, {"crm", "mkt", "billing"}))
    s.resolve(ident, "notes", "n3", "ops")
    assert {o.system: o.values.get("notes") for o in s.plan(ident, {"crm", "mkt"})} == {
        "crm": "n3",
        "mkt": "n3",
    }


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        (
            [("crm", "1", "a@x.io", "Ada", "75001"), ("crm", "2", "b@x.io", "Ada", "75001")],
            "only the weak rule",
        ),
        ([("crm", "1", "a@x.io", "Ada", "1"), ("billing", "c1", "a@x.io", None, "1")], ""),
    ],
)
def test_weak_rules_go_to_review(records, reason):
    ent = entity()
    s = session(ent)
    outs = [
        s.apply(inc(sys_, rid, email=e, name=n, zip=z), f"e{i}")
        for i, (sys_, rid, e, n, z) in enumerate(records)
    ]
    if reason:
        assert outs[-1].action == "review" and reason in outs[-1].reason
        [r] = s.changes.reviews
        assert r.record_id == "2" and r.candidates == [outs[0].identity.id]  # type: ignore[union-attr]
    else:
        assert outs[-1].action == "linked"


def test_two_records_of_one_system_matching_one_identity_are_a_duplicate_to_review():
    ent = entity()
    s = session(ent)
    s.apply(inc("crm", "1", email="a@x.io"), "e1")
    out = s.apply(inc("crm", "2", email="A@x.io "), "e2")
    assert (
        out.action == "review"
        and "duplicate inside crm" in out.reason
        and "merge record 2 into 1" in out.reason
    )


def test_several_identities_matching_go_to_review():
    ent = entity()
    a = Identity("idn_a", "customer", 1, 1, keys=[("email", "a@x.io")])
    b = Identity("idn_b", "customer", 1, 1, keys=[("email", "a@x.io")])
    s = Session(
        ent,
        IdentityLookup(by_key={("email", "a@x.io"): ["idn_a", "idn_b"]}, identities={"idn_a": a, "idn_b": b}),
        5.0,
    )
    out = s.apply(inc("mkt", "m1", email="a@x.io"), "e1")
    assert out.action == "review" and "2 identities match" in out.reason


@pytest.mark.parametrize(
    ("policy", "ops"), [("ignore", set()), ("archive", {"archive"}), ("propagate", {"delete"})]
)
def test_deletes_follow_the_policy(policy, ops):
    ent = entity(deletes={"policy": policy})
    s = session(ent)
    ident = s.apply(inc("crm", "45", email="a@x.io"), "e1").identity
    assert ident is not None
    s.apply(inc("billing", "cus_9", email="a@x.io"), "e2")
    gone = Incoming("billing", "cus_9", {"email": "a@x.io"}, deleted=True)
    assert s.apply(gone, "e3").deleted
    planned = s.plan(ident, {"crm", "billing"})
    assert {o.op for o in planned} == ops
    assert all(o.system == "crm" for o in planned)  # never to the system it was deleted in
    if policy == "ignore":
        assert s.plan(ident, {"billing"}) == []  # not recreated where it was deleted


def test_a_read_older_than_one_already_applied_from_that_system_is_stale_and_ignored():
    # Webhooks arrive out of order: the one for an old edit, after a newer read of the same record, must
    # not put the old value back (the record's own clock, or a change sequence, orders its reads).
    doc = {
        "fields": {"email": {"owner": "a"}, "phone": {"rule": "latest"}},
        "match": [{"field": "email", "normalize": "email"}],
        "systems": {
            "a": {"id": "id", "fields": {"email": "email", "phone": "phone"}, "clock": "seq"},
            "b": {"id": "id", "fields": {"email": "email", "phone": "phone"}, "clock": "seq"},
        },
    }
    ent = EntitySpec("customer", EntityDoc.model_validate(doc), "entities/customer.yaml", 1)
    s = session(ent)

    def rec(system: str, phone: str, seq: int) -> Incoming:
        return Incoming(system, "1", {"email": "a@x.io", "phone": phone}, clock=seq)

    ident = s.apply(rec("a", "1", 10), "e1").identity
    assert ident is not None
    s.apply(rec("b", "1", 5), "e2")
    s.apply(rec("a", "2", 11), "e3")  # a changed the phone; the hub writes it to b
    [op] = s.plan(ident, {"b"})
    s.wrote(ident, op, "e3", "b_update")
    s.apply(rec("b", "2", 7), "e4")  # b's read of that write (its echo)
    stale = s.apply(rec("b", "1", 6), "e5")  # b's webhook for an older change, arriving last
    assert stale.action == "ignored" and "older" in stale.reason
    assert ident.golden["phone"]["value"] == "2" and s.plan(ident, {"a", "b"}) == []
    again = s.apply(rec("b", "2", 7), "e6")  # the same read again: no change, not stale
    assert again.action == "unchanged"


def test_latest_by_the_systems_clock_keeps_the_newer_change_whatever_arrives_last():
    doc = {
        "fields": {"email": {"owner": "a"}, "phone": {"rule": "latest", "clock": "system"}},
        "match": [{"field": "email", "normalize": "email"}],
        "systems": {
            "a": {"id": "id", "fields": {"email": "email", "phone": "phone"}, "clock": "updated_at"},
            "b": {"id": "id", "fields": {"email": "email", "phone": "phone"}, "clock": "updated_at"},
        },
    }
    ent = EntitySpec("customer", EntityDoc.model_validate(doc), "entities/customer.yaml", 1)
    s = session(ent)

    def rec(system: str, phone: str, at: str) -> Incoming:
        return Incoming(system, "1", {"email": "a@x.io", "phone": phone}, clock=at)

    ident = s.apply(rec("a", "1", "2026-12-06T10:00:00Z"), "e1").identity
    assert ident is not None
    s.apply(rec("b", "1", "2026-12-06T10:00:01Z"), "e2")
    s.apply(rec("a", "2", "2026-12-06T10:05:00Z"), "e3")  # a changed it at 10:05
    late = s.apply(rec("b", "3", "2026-12-06T10:04:00Z"), "e4")  # b at 10:04, arriving later
    [c] = late.conflicts
    assert (c.rule, c.winner, c.winner_value) == ("latest", "a", "2")
    assert ident.golden["phone"]["value"] == "2"
    [op] = s.plan(ident, {"a", "b"})
    assert (op.system, op.values) == ("b", {"phone": "2"})  # b gets the newer value back


def test_an_update_carries_what_the_hub_last_knew_each_field_held_for_compare_and_set():
    ent = entity()
    s = session(ent)
    ident = s.apply(inc("crm", "45", email="a@x.io", phone="1", zip=None), "e1").identity
    assert ident is not None
    s.apply(inc("billing", "cus_9", email="a@x.io", phone="1", plan=None, zip=None), "e2")
    s.apply(inc("crm", "45", email="a@x.io", phone="2", zip=None), "e3")
    [op] = s.plan(ident, {"billing"})
    rec = op.as_record(ent, ident)
    assert rec["fields"] == {"tel": "2"}
    # Under billing's own names, for every field of the record (a whole-record write compares them all).
    assert rec["expected"] == {"mail": "a@x.io", "tel": "1", "plan": None, "zip": None}
    s.wrote(ident, op, "e3", "billing_update")
    s.apply(inc("crm", "45", email="a@x.io", phone="3", zip="75001"), "e4")
    [op] = s.plan(ident, {"billing"})
    # The phone: the hub's own write not read back yet is what it last put there; the zip billing never had.
    assert op.as_record(ent, ident)["expected"] == {"mail": "a@x.io", "tel": "2", "plan": None, "zip": None}
    [create] = s.plan(s.apply(inc("crm", "46", email="b@x.io"), "e5").identity, {"billing"})  # type: ignore[arg-type]
    assert create.op == "create" and create.as_record(ent, ident)["expected"] == {}


def test_an_update_carries_the_version_the_system_gave_last_for_if_match():
    ent = entity()
    ent.doc.systems["billing"].version = "etag"
    s = session(ent)
    ident = s.apply(inc("crm", "45", email="a@x.io", phone="1"), "e1").identity
    assert ident is not None
    billing = read_record(ent, "billing", {"cus": "cus_9", "mail": "a@x.io", "tel": "1", "etag": 'W/"7"'})
    s.apply(billing, "e2")
    s.apply(inc("crm", "45", email="a@x.io", phone="2"), "e3")
    [op] = s.plan(ident, {"billing"})
    assert op.as_record(ent, ident)["version"] == 'W/"7"'  # headers: {If-Match: "{{ version }}"}
    [crm] = s.plan(s.apply(billing, "e4").identity, {"crm"}) or [None]  # type: ignore[arg-type]
    assert crm is None or crm.as_record(ent, ident)["version"] is None  # the CRM gives none

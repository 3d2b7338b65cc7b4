"""Form posts and JSON batches on a real socket: fields become a record, files are refused or kept, a
signature still covers the raw body, and an array is a batch of events only when the trigger says so."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from patchbay.security.webhook_auth import sign_standard_webhooks
from tests.conftest import SECRET_WHSEC, lead_project
from tests.server import test_console_browser

FORM = "application/x-www-form-urlencoded"
browser = test_console_browser.browser  # the headless Chromium fixture (skips without it)


def form_project(
    root: Path,
    sink_url: str,
    public: bool = False,
    steps: str | None = None,
    max_body: int = 4096,
    **trigger: Any,
) -> Path:
    """The lead-capture flow with `trigger` settings on its webhook (and, if `public`, no signature)."""
    lead_project(root, sink_url, hub={"max_body_bytes": max_body}, steps=steps)
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["trigger"]["webhook"].update(trigger)
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    if public:
        systems_file = root / "systems.yaml"
        systems = yaml.safe_load(systems_file.read_text())
        systems["website"]["webhook"] = {"scheme": "none", "public": True}
        systems_file.write_text(yaml.safe_dump(systems, sort_keys=False))
    return root


def multipart(boundary: str, *parts: tuple[str, str | None, str | None, bytes]) -> bytes:
    """A multipart/form-data body byte for byte as Chromium writes it: (name, filename, type, content)."""
    out = b""
    for name, filename, ctype, content in parts:
        disp = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out += f"--{boundary}\r\n{disp}\r\n".encode()
        if ctype is not None:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


BOUNDARY = "----WebKitFormBoundaryx8Kq2pPZr7cL0aXy"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture
async def hub(tmp_path, sink, start_hub):
    return await start_hub(form_project(tmp_path, sink.url))


async def test_urlencoded_form_lands_as_a_record(hub, sink):
    # The bytes a browser sends for <input name=email> <input name=first_name> and two checked boxes.
    body = b"email=+Ada%40Example.com+&first_name=Ad%C3%A5&interest=crm&interest=billing&note="
    status, got = await hub.post("/hooks/lead-capture", body, headers={"Content-Type": FORM})
    assert status == 202, got
    run = await hub.run(got["event_id"])
    assert run["payload"] == {
        "email": " Ada@Example.com ",
        "first_name": "Adå",
        "interest": ["crm", "billing"],
        "note": "",
    }
    assert run["record_key"] == "ada@example.com"
    await sink.wait_for(1)
    assert sink.received[0].body["properties"]["email"] == "ada@example.com"
    assert sink.received[0].body["properties"]["firstname"] == "Adå"


async def test_multipart_fields_land_as_a_record(hub):
    body = multipart(
        BOUNDARY,
        ("email", None, None, b"ada@example.com"),
        ("interest", None, None, b"crm"),
        ("interest", None, None, b"billing"),
        ("properties[company]", None, None, "Zürich AG".encode()),
        ("cv", "", "application/octet-stream", b""),  # a file input left empty
    )
    status, got = await hub.post("/hooks/lead-capture", body, headers={"Content-Type": MULTIPART})
    assert status == 202, got
    run = await hub.run(got["event_id"])
    assert run["payload"] == {
        "email": "ada@example.com",
        "interest": ["crm", "billing"],
        "properties[company]": "Zürich AG",  # names stay flat: no bracket convention is standard
        "cv": None,
    }


async def test_a_bracketed_name_is_reshaped_by_a_map_step(tmp_path, sink, start_hub):
    steps = """
      - map:
          properties.email: '"properties[email]"'
          properties.tags: '"tags[]"'
    """
    hub = await start_hub(form_project(tmp_path, sink.url, steps=steps))
    body = b"properties%5Bemail%5D=ada%40example.com&tags%5B%5D=a&tags%5B%5D=b"
    status, got = await hub.post("/hooks/lead-capture", body, headers={"Content-Type": FORM})
    assert status == 202, got
    await sink.wait_for(1)
    assert sink.received[0].body == {"properties": {"email": "ada@example.com", "tags": ["a", "b"]}}


async def test_file_part_is_refused_by_default_and_nothing_is_stored(hub):
    body = multipart(
        BOUNDARY,
        ("email", None, None, b"ada@example.com"),
        ("cv", "cv.pdf", "application/pdf", b"%PDF-1.4 not really"),
    )
    status, got = await hub.post("/hooks/lead-capture", body, headers={"Content-Type": MULTIPART})
    assert status == 415, got
    assert got["error"] == "file_not_accepted"
    assert "cv.pdf" in got["message"] and "files: keep" in got["message"]
    assert await hub.count("events") == 0


async def test_file_part_is_kept_when_the_trigger_says_so(tmp_path, sink, start_hub):
    hub = await start_hub(form_project(tmp_path, sink.url, files="keep"))
    content = b"%PDF-1.4 \x00\xff binary"
    body = multipart(
        BOUNDARY,
        ("email", None, None, b"ada@example.com"),
        ("cv", "cv.pdf", "application/pdf", content),
    )
    status, got = await hub.post("/hooks/lead-capture", body, headers={"Content-Type": MULTIPART})
    assert status == 202, got
    run = await hub.run(got["event_id"])
    assert run["payload"]["cv"] == {
        "filename": "cv.pdf",
        "content_type": "application/pdf",
        "size": len(content),
        "content_base64": base64.b64encode(content).decode(),
    }
    big = multipart(BOUNDARY, ("email", None, None, b"a@b.co"), ("cv", "big.bin", None, b"x" * 5000))
    status, got = await hub.post("/hooks/lead-capture", big, headers={"Content-Type": MULTIPART})
    assert (status, got["error"]) == (413, "body_too_large")


async def test_signature_covers_the_raw_form_body(hub):
    signed = b"email=ada%40example.com"
    headers = sign_standard_webhooks(SECRET_WHSEC, "msg_form", int(time.time()), signed)
    headers["Content-Type"] = FORM
    # The same fields written another way are other bytes: the signature does not match.
    status, got = await hub.post("/hooks/lead-capture", b"email=ada@example.com", headers=headers, sign=False)
    assert (status, got["error"]) == (401, "bad_signature")
    status, got = await hub.post("/hooks/lead-capture", signed, headers=headers, sign=False)
    assert status == 202, got
    # A re-sent form (same webhook-id, same bytes) is a duplicate, found by the stored record's hash.
    status, again = await hub.post("/hooks/lead-capture", signed, headers=headers, sign=False)
    assert (status, again) == (200, {"event_id": got["event_id"], "status": "duplicate"})


BAD_FORMS = [
    ("wrong boundary", MULTIPART.replace("x8Kq", "zzzz"), multipart(BOUNDARY, ("a", None, None, b"1")), 400),
    ("no boundary", "multipart/form-data", multipart(BOUNDARY, ("a", None, None, b"1")), 400),
    ("not utf-8", FORM, b"email=%FF%FE", 400),
    ("raw non-ascii", FORM, "email=å".encode(), 400),
    ("unknown charset", FORM + "; charset=klingon", b"email=a", 415),
]


@pytest.mark.parametrize(("name", "ctype", "body", "status"), BAD_FORMS, ids=[c[0] for c in BAD_FORMS])
async def test_malformed_forms_are_refused_and_leave_no_trace(hub, name, ctype, body, status):
    got_status, got = await hub.post("/hooks/lead-capture", body, headers={"Content-Type": ctype})
    assert got_status == status, got
    assert got["error"] in ("malformed_form", "unsupported_charset") and got["message"]
    assert await hub.count("events") == 0


# ----------------------------------------------------------------------------- JSON arrays as batches
async def test_an_array_is_refused_without_the_batch_setting(hub):
    status, got = await hub.post("/hooks/lead-capture", orjson.dumps([{"email": "a@b.co"}]))
    assert (status, got["error"]) == (422, "not_an_object")
    assert "batch: true" in got["message"]


async def test_an_array_is_a_batch_of_events_deduped_per_element(tmp_path, sink, start_hub):
    hub = await start_hub(form_project(tmp_path, sink.url, batch=True, id_path="id"))
    leads = [{"id": f"L{i}", "email": f"lead{i}@example.com"} for i in range(3)]
    status, got = await hub.post("/hooks/lead-capture", orjson.dumps(leads))
    assert status == 202, got
    assert len(got["event_ids"]) == 3 and len(set(got["event_ids"])) == 3
    assert [e["status"] for e in got["events"]] == ["accepted"] * 3
    for eid, lead in zip(got["event_ids"], leads, strict=True):
        assert (await hub.run(eid))["payload"] == lead
    await sink.wait_for(3)
    # Re-sent with one new element: the three known ones are duplicates, by their id, one at a time.
    status, again = await hub.post(
        "/hooks/lead-capture", orjson.dumps([*leads, {"id": "L9", "email": "n@e.co"}])
    )
    assert status == 202, again
    assert again["event_ids"][:3] == got["event_ids"]
    assert [e["status"] for e in again["events"]] == ["duplicate"] * 3 + ["accepted"]
    assert await hub.count("events") == 4
    # The same batch a third time: nothing new, so 200.
    status, third = await hub.post("/hooks/lead-capture", orjson.dumps(leads))
    assert status == 200 and [e["status"] for e in third["events"]] == ["duplicate"] * 3


async def test_a_bad_element_refuses_the_whole_batch(tmp_path, sink, start_hub):
    hub = await start_hub(form_project(tmp_path, sink.url, batch=True))
    status, got = await hub.post("/hooks/lead-capture", orjson.dumps([{"email": "a@b.co"}, "oops"]))
    assert (status, got["error"]) == (422, "not_an_object")
    assert "element 1" in got["message"]
    status, got = await hub.post("/hooks/lead-capture", b"[]")
    assert (status, got["error"]) == (422, "empty_batch")
    assert await hub.count("events") == 0
    status, got = await hub.post("/hooks/lead-capture", {"email": "one@b.co"})  # an object is still one event
    assert status == 202 and "event_id" in got


# ----------------------------------------------------------------------------- a real browser
PAGE = """<!doctype html><meta charset="utf-8"><title>Contact us</title>
<form method="post" action="{action}" enctype="{enctype}">
  <input name="email" value="">
  <input name="first_name" value="">
  <label><input type="checkbox" name="interest" value="crm" checked> CRM</label>
  <label><input type="checkbox" name="interest" value="billing" checked> Billing</label>
  <select name="size"><option>1-10</option><option selected>11-50</option></select>
  <textarea name="message"></textarea>
  {file}
  <button type="submit">Send</button>
</form>"""


@pytest.mark.parametrize("enctype", [FORM, "multipart/form-data"])
async def test_a_plain_html_form_in_chromium_lands_as_a_record(tmp_path, sink, start_hub, browser, enctype):
    hub = await start_hub(form_project(tmp_path, sink.url, public=True, files="keep"))
    upload = tmp_path / "note.txt"
    upload.write_bytes("hello, wörld\n".encode())
    page = await browser.new_page()
    file_input = '<input type="file" name="attachment">' if enctype != FORM else ""
    await page.set_content(
        PAGE.format(action=f"{hub.url}/hooks/lead-capture", enctype=enctype, file=file_input)
    )
    await page.fill("input[name=email]", "Ada@Example.com")
    await page.fill("input[name=first_name]", "Adå & Co")
    await page.fill("textarea[name=message]", "Line one\nline two = 100%")
    if file_input:
        await page.set_input_files("input[name=attachment]", str(upload))
    async with page.expect_navigation() as nav:
        await page.click("button[type=submit]")
    response = await nav.value
    assert response is not None and response.status == 202
    answer = orjson.loads(await response.body())
    run = await hub.run(answer["event_id"])
    expected: dict[str, Any] = {
        "email": "Ada@Example.com",
        "first_name": "Adå & Co",
        "interest": ["crm", "billing"],
        "size": "11-50",
        "message": "Line one\r\nline two = 100%",  # browsers send a textarea's line breaks as CRLF
    }
    if file_input:
        expected["attachment"] = {
            "filename": "note.txt",
            "content_type": "text/plain",
            "size": len(upload.read_bytes()),
            "content_base64": base64.b64encode(upload.read_bytes()).decode(),
        }
    assert run["payload"] == expected
    assert run["record_key"] == "ada@example.com"
    await sink.wait_for(1)
    assert sink.received[0].body["properties"]["email"] == "ada@example.com"


async def test_a_resent_batch_is_known_by_the_request_id_and_index(tmp_path, sink, start_hub):
    hub = await start_hub(form_project(tmp_path, sink.url, batch=True))  # no id_path: webhook-id + index
    raw = orjson.dumps([{"email": "a@b.co"}, {"email": "c@d.co"}])
    s1, first = await hub.post("/hooks/lead-capture", raw, msg_id="msg_batch")
    s2, again = await hub.post("/hooks/lead-capture", raw, msg_id="msg_batch")
    assert (s1, s2) == (202, 200)
    assert again["event_ids"] == first["event_ids"]
    assert [e["status"] for e in again["events"]] == ["duplicate", "duplicate"]
    # The same id with other elements: each changed element is a replayed id, reported per element.
    other = orjson.dumps([{"email": "a@b.co"}, {"email": "eve@evil.test"}])
    s3, third = await hub.post("/hooks/lead-capture", other, msg_id="msg_batch")
    assert s3 == 409 and [e["status"] for e in third["events"]] == ["duplicate", "replayed_id"]
    assert await hub.count("events") == 2

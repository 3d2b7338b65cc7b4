"""A flow's `sensitive:` paths into a call's bound answer (`contact.body.phone`) hide that value in the
run as shown: the trace, the call's kept answer and every excerpt that echoed it."""

from __future__ import annotations

import orjson
import yaml

from tests.conftest import eventually, lead_project

PHONE = "+44 20 7946 0958"
STEPS = """
- name: find_contact
  call: {system: crm, method: GET, path: "/search?email={{ email }}", as: contact}
"""


async def test_a_sensitive_field_of_an_answer_is_redacted_where_the_run_is_shown(tmp_path, sink, start_hub):
    def answer(request, rec):
        if request.method == "GET":
            return (
                200,
                {"Content-Type": "application/json"},
                orjson.dumps({"id": "c-1", "phone": PHONE}).decode(),
            )
        return 201

    sink.default = answer
    root = lead_project(tmp_path, sink.url, steps=STEPS, dest={"body": {"id": "contact.body.id"}})
    flow_file = root / "flows" / "lead-capture.yaml"
    flow = yaml.safe_load(flow_file.read_text())
    flow["sensitive"] = ["contact.body.phone"]
    flow_file.write_text(yaml.safe_dump(flow, sort_keys=False))
    hub = await start_hub(root)
    _, body = await hub.post("/hooks/lead-capture", {"email": "ada@example.com"})

    async def delivered() -> bool:
        return (await hub.run(body["event_id"]))["status"] == "delivered"

    await eventually(delivered, what="delivered")
    shown = await hub.run(body["event_id"])  # as the API, the console and `runs show` read it
    assert PHONE not in orjson.dumps(shown).decode()
    [call] = [d for d in shown["deliveries"] if d["destination"] == "call:find_contact"]
    assert call["response"]["body"] == {"id": "c-1", "phone": "[redacted]"}
    assert sink.received[-1].body == {"id": "c-1"}  # the flow itself had the answer

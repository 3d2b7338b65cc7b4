"""Property-based fuzzing of every API operation from its own OpenAPI document (schemathesis).

For each operation, valid and invalid requests are generated from the document and sent to a real
hub on 127.0.0.1. With an admin token nothing may answer 5xx, every status and body must be the
documented ones, valid input must be accepted (not a 400/422) and invalid input refused with a 4xx. Each same request is then sent
without a token (must be 401) and with a token lacking the operation's scope (must be 403): no
input may get past authentication.

The suite runs 10 examples per operation and mode (about 35 s). A longer run, locally:

    PATCHBAY_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/server/test_api_fuzz.py -o timeout=0

or against a running hub with the schemathesis CLI (create an admin token first):

    st run http://127.0.0.1:8787/api/v1/openapi.json -H "Authorization: Bearer $TOKEN" \\
        --max-examples 1000 --checks all --mode all
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (a dev dependency)")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.security.tokens import SCOPES, create_token
from patchbay.server.app import make_app
from patchbay.store.base import Actor
from tests.conftest import _start, lead_project, resolver
from tests.server.conftest import FAST, make_vault

EXAMPLES = int(os.environ.get("PATCHBAY_FUZZ_EXAMPLES", "10"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class HubThread:
    """A hub serving on 127.0.0.1 from its own event loop, so synchronous fuzzing can call it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = ""
        self.tokens: dict[str, str] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed hub", daemon=True)

    def __enter__(self) -> HubThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            hub = Hub(load_or_raise(self.root), resolver=resolver())
            await hub.start()
            runner, self.url = await _start(make_app(hub))
            assert hub.store is not None
            self.tokens["admin"], _ = await create_token(
                hub.store, "fuzz-admin", ["admin"], None, Actor("fuzz")
            )
            for n in range(3):  # a quarantined event and dead letters to replay and discard
                record = {"email": "broken"} if n == 0 else {"email": f"fuzz-{n}@example.com"}
                await hub.ingest("lead-capture", orjson.dumps(record), record)
            for scope in SCOPES:
                self.tokens[scope], _ = await create_token(
                    hub.store, f"fuzz-{scope.replace(':', '-')}", [scope], None, Actor("fuzz")
                )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await hub.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[HubThread]:
    root = tmp_path_factory.mktemp("fuzz")
    # Nothing listens on port 9: deliveries fail and become dead letters for replay and discard to find.
    lead_project(root, "http://127.0.0.1:9", delivery=FAST)
    make_vault(root)
    with HubThread(root) as h:
        yield h


@pytest.fixture(scope="module")
def schema(served: HubThread) -> Any:
    doc = requests.get(served.url + "/api/v1/openapi.json", timeout=10).json()
    # Invalid input must be refused with one of the documented client errors (413 for an oversized body).
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "negative_data_rejection": {
                    "expected-statuses": ["400", "404", "405", "409", "413", "415", "422"]
                }
            }
        }
    )
    return schemathesis.openapi.from_dict(doc, config=config)


def operations(schema: Any) -> list[Any]:
    ops = [r.ok() for r in schema.get_all_operations()]
    return [op for op in ops if op.path.startswith("/api/v1/") and op.path != "/api/v1/openapi.json"]


def _scope(op: Any) -> str | None:
    return op.definition.raw.get("x-required-scope")


def _without_auth(headers: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}


def test_every_operation_is_in_the_fuzz(schema):
    names = {f"{op.method.upper()} {op.path}" for op in operations(schema)}
    assert len(names) >= 24 and "POST /api/v1/dead-letters/replay" in names


def fuzz_operation(
    op: Any, mode: GenerationMode, served: HubThread, session: Any, seen: dict[str, int]
) -> None:
    """Send generated requests to one operation: as admin, without a token, and with a scope that is not enough."""
    label = f"{op.method.upper()} {op.path}"
    scope = _scope(op)
    lacking = [s for s in SCOPES if s not in (scope, "admin")] if scope else []
    checks = CHECKS + (
        [negative_data_rejection] if mode is GenerationMode.NEGATIVE else [positive_data_acceptance]
    )
    admin = {"Authorization": f"Bearer {served.tokens['admin']}"}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), weak_scope=st.sampled_from(lacking or [None]))
    def fuzz(case: Any, weak_scope: str | None) -> None:
        headers = _without_auth(case.headers)
        case.headers = {**headers, **admin}
        response = case.call(base_url=served.url, session=session)
        case.validate_response(response, checks=checks, headers=case.headers)
        seen[label] = seen.get(label, 0) + 1
        # The same request without a token, and with a token whose scopes do not include this one.
        case.headers = headers
        anonymous = case.call(base_url=served.url, session=session)
        assert anonymous.status_code == 401, (label, anonymous.status_code, anonymous.text[:200])
        assert anonymous.json()["error"] in ("missing_token", "bad_token")
        if weak_scope is not None:
            case.headers = {**headers, "Authorization": f"Bearer {served.tokens[weak_scope]}"}
            weak = case.call(base_url=served.url, session=session)
            assert weak.status_code == 403, (label, weak_scope, weak.status_code, weak.text[:200])
            assert weak.json()["scope"] == scope

    fuzz()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_5xx_and_no_auth_bypass(served, schema, mode):
    session = requests.Session()
    seen: dict[str, int] = {}
    for op in operations(schema):
        fuzz_operation(op, mode, served, session, seen)
    assert len(seen) == len(operations(schema))

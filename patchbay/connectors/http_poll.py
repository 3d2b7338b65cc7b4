"""http (source): poll a JSON API on a schedule: incremental cursor, pagination, dedupe of seen records."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import orjson
from pydantic import Field, field_validator

from patchbay.config.models import Spec
from patchbay.connectors.base import Batch, OutcomeClass, Resources, SourceRecord
from patchbay.connectors.http import HttpSystem
from patchbay.connectors.http_client import HttpClient, appended_path, classify_response
from patchbay.connectors.http_wire import BadRequest, same_server
from patchbay.connectors.oauth2_client import OAuth2Error
from patchbay.errors import AuthError, TerminalError, TransientError
from patchbay.records import dig
from patchbay.registry import connector
from patchbay.security.ssrf import BlockedAddress

PAGE_LIMIT = 64 * 2**20  # bytes of one page read; a larger one is refused, not cut


class Pagination(Spec):
    type: Literal["none", "page", "offset", "cursor", "link"] = Field(
        "none",
        description="none, page (page=1,2,…), offset (offset=0,100,…), cursor (a token from the body), "
        "link (the Link header's rel=next).",
    )
    size: int = Field(100, ge=1, le=10000, description="Records asked for per page.")
    page_param: str = Field("page", description="page: the page number parameter.")
    start: int = Field(1, description="page: the first page number.")
    size_param: str = Field(
        "per_page", description="page/offset/cursor: the page size parameter ('' to omit)."
    )
    offset_param: str = Field("offset", description="offset: the offset parameter.")
    cursor_path: str = Field(
        "next_cursor", description="cursor: dotted path of the next-page token in the body."
    )
    cursor_param: str = Field("cursor", description="cursor: the parameter that carries it.")
    more_path: str | None = Field(
        None,
        description="cursor: dotted path of a flag in the body saying whether more pages exist (e.g. "
        "has_more); without it a page with a token is followed until one comes back empty.",
    )


class IncrementalCursor(Spec):
    field: str = Field(description="Record field whose largest value is remembered, e.g. updated_at or id.")
    param: str = Field(description="Query parameter that sends the remembered value, e.g. updated_since.")
    initial: str | None = Field(
        None, description="Value to start from on the first poll (default: none sent)."
    )


class HttpPollConfig(Spec):
    path: str = Field("", description="Appended to the system's URL; starts with /.")
    params: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Query parameters.")
    items_path: str = Field(
        "", description="Dotted path to the array of records; empty if the body is the array."
    )
    id_field: str | None = Field("id", description="Record field that identifies it upstream (dedupe).")
    cursor: IncrementalCursor | None = Field(
        None, description="Incremental polling: only what changed since last time."
    )
    pagination: Pagination = Field(
        default_factory=Pagination,
        description=f"How to ask for the next page. A page is read up to {PAGE_LIMIT // 2**20} MiB; a larger one is refused "
        "(ask for fewer records per page).",
    )
    max_pages: int = Field(
        100, ge=1, description="Most pages read in one poll; the rest waits for the next poll."
    )
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout in seconds.")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return appended_path(v)


_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


@connector("http", roles=("source",), config=HttpPollConfig, system_config=HttpSystem)
class HttpPollSource:
    """GET a JSON API each tick; one record per array item."""

    mode = "poll"

    def __init__(self, system: HttpSystem, config: HttpPollConfig, resources: Resources) -> None:
        self.system = system
        self.config = config
        self.resources = resources
        self.client = HttpClient(
            resources, auth=system.auth, verify_tls=system.verify_tls, ca_bundle=system.ca_bundle
        )

    async def poll(self, cursor: Any) -> AsyncIterator[Batch]:
        cfg = self.config
        pg = cfg.pagination
        params: dict[str, Any] = {
            k: str(v).lower() if isinstance(v, bool) else v for k, v in cfg.params.items()
        }
        since = cursor if cursor is not None else (cfg.cursor.initial if cfg.cursor else None)
        if cfg.cursor and since is not None:
            params[cfg.cursor.param] = since
        url: str | None = self.system.url.rstrip("/") + cfg.path
        best = since
        page_no, offset, token = pg.start, 0, None
        for i in range(cfg.max_pages):
            q = dict(params)
            if pg.type in ("page", "offset", "cursor") and pg.size_param:
                q[pg.size_param] = pg.size
            if pg.type == "page":
                q[pg.page_param] = page_no
            elif pg.type == "offset":
                q[pg.offset_param] = offset
            elif pg.type == "cursor" and token:
                q[pg.cursor_param] = token
            assert url is not None
            body, headers = await self._get(url, q if (pg.type != "link" or i == 0) else {})
            items = dig(body, cfg.items_path) if cfg.items_path else body
            if items is None:
                items = []
            if not isinstance(items, list):
                raise TerminalError(
                    f"polling {url}: {cfg.items_path or 'the body'} is not an array; set items_path"
                )
            records = []
            for item in items:
                rid = None
                if cfg.id_field and isinstance(item, dict) and item.get(cfg.id_field) is not None:
                    rid = str(item[cfg.id_field])
                    if cfg.cursor and item.get(cfg.cursor.field) is not None:
                        rid += (
                            f"@{item[cfg.cursor.field]}"  # a changed record is a new event; a re-read is not
                        )
                if cfg.cursor and isinstance(item, dict):
                    v = item.get(cfg.cursor.field)
                    if v is not None and (best is None or _gt(v, best)):
                        best = v
                records.append(SourceRecord(item, rid))
            if pg.type == "page":
                page_no += 1
                more = len(items) >= pg.size
            elif pg.type == "offset":
                offset += len(items)
                more = len(items) >= pg.size
            elif pg.type == "cursor":
                token = dig(body, pg.cursor_path)
                more = (
                    bool(token) and bool(items) and (pg.more_path is None or dig(body, pg.more_path) is True)
                )
            elif pg.type == "link":
                m = _LINK_NEXT.search(headers.get("Link", ""))
                url = urljoin(url, m.group(1)) if m else None
                if url is not None and not same_server(url, self.system.url):
                    raise TerminalError(
                        f"polling {self.system.url}: the next-page Link points to another server; "
                        "it is not followed (the system's credentials go only to its own server)"
                    )
                more = url is not None
            else:
                more = False
            # The cursor is saved only with the last page: a crash mid-way re-reads, dedupe drops repeats.
            yield Batch(records, cursor=best if not more and best != since else None)
            if not more:
                return

    async def _get(self, url: str, params: dict[str, Any]) -> tuple[Any, Any]:
        headers = {"Accept": "application/json", "User-Agent": "patchbay/0.1", **self.system.headers}
        if params:  # merged into the URL's own query, a parameter of the same name replaced
            parts = urlsplit(url)
            query = {k: v for k, v in parse_qsl(parts.query, keep_blank_values=True)} | params
            url = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            answer = await self.client.exchange(
                "GET", url, headers=headers, body=None, timeout_s=self.config.timeout_s, limit=PAGE_LIMIT
            )
        except BlockedAddress as exc:
            raise TerminalError(f"polling {url}: {exc}") from exc
        except OAuth2Error as exc:
            if exc.refused:
                raise AuthError(f"polling {url}: {exc}") from exc
            raise TransientError(f"polling {url}: {exc}") from exc
        except BadRequest as exc:
            raise TerminalError(f"polling {url}: {exc}") from exc
        except TimeoutError as exc:
            raise TransientError(f"polling {url}: timed out after {self.config.timeout_s:g}s") from exc
        except OSError as exc:  # refused, unreachable, cut: BadAnswer included
            raise TransientError(f"polling {url}: {type(exc).__name__}: {exc}") from exc
        raw = answer.body
        retry_after = (self.system.retry_after_header, self.system.retry_after_unit)
        outcome = classify_response(
            answer.status, answer.headers, raw[:4096], 0, self.resources.redact, retry_after
        )
        if outcome.cls is OutcomeClass.SUCCESS:
            if len(raw) >= PAGE_LIMIT:
                raise TerminalError(
                    f"polling {url}: a page of {PAGE_LIMIT // 2**20} MiB or more is not read; ask for smaller pages"
                )
            try:
                return orjson.loads(raw), answer.headers
            except orjson.JSONDecodeError as exc:
                raise TerminalError(f"polling {url}: the answer is not JSON") from exc
        # The status only: the shared classifier's words are a destination's ("destination paused").
        msg = f"polling {url}: HTTP {answer.status} {outcome.excerpt[:200]}"
        if outcome.cls is OutcomeClass.AUTH:
            raise AuthError(msg)
        if outcome.cls is OutcomeClass.TRANSIENT:
            raise TransientError(msg, outcome.retry_after_s)
        raise TerminalError(msg)

    async def close(self) -> None:
        return None


def _gt(a: Any, b: Any) -> bool:
    try:
        return bool(a > b)
    except TypeError:
        return str(a) > str(b)

"""A lookup's SELECT, sent through the SQL system's own source connection (read-only where the dialect
allows): bound parameters only, at most `max_rows` rows, answered as a call's `{status, body}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from patchbay.config.models import DeliveryPolicy
from patchbay.connectors.base import Outcome, OutcomeClass, Resources, Stopwatch
from patchbay.connectors.sql_client.source import SqlSource
from patchbay.connectors.sql_client.source_config import SqlSourceConfig
from patchbay.connectors.sql_client.source_query import jsonable
from patchbay.errors import AuthError, TerminalError, TransientError
from patchbay.processors.lookup import bind_sql


def is_sql_source(cls: type[Any]) -> bool:
    return isinstance(cls, type) and issubclass(cls, SqlSource)


class SqlLookup:
    """Runs one lookup step's query; `render` is pure (the parameters), `send` reads."""

    def __init__(
        self, source_cls: type[Any], system: Any, step: Any, policy: DeliveryPolicy, resources: Resources
    ) -> None:
        self.step = step
        self.policy = policy
        self.resources = resources
        # The source's settings only open its connection: the lookup's own statement is run.
        dummy = SqlSourceConfig(query="SELECT 1 AS id", cursor_column="id", timeout_s=policy.timeout_s)
        self.source = source_cls(system, dummy, resources)
        cfg = step.config
        self.sql = f"SELECT * FROM ({bind_sql(cfg.query, source_cls.dialect)}) AS patchbay_lookup LIMIT {cfg.max_rows}"

    def render(self, record: Any, key: str) -> dict[str, Any]:
        return {"params": self.step.params(record)}

    async def send(self, request: Mapping[str, Any], key: str) -> Outcome:
        sw = Stopwatch()
        try:
            rows = await self.source._read(self.sql, dict(request.get("params") or {}))
        except TransientError as exc:
            return Outcome(
                OutcomeClass.TRANSIENT, None, sw.ms, error=str(exc), retry_after_s=exc.retry_after_s
            )
        except AuthError as exc:
            return Outcome(OutcomeClass.AUTH, None, sw.ms, error=str(exc))
        except TerminalError as exc:
            return Outcome(OutcomeClass.TERMINAL, None, sw.ms, error=str(exc))
        found = [{k: jsonable(v) for k, v in row.items()} for row in rows]
        body: Any = found if self.step.config.rows == "all" else (found[0] if found else None)
        status = 200 if found else 404
        excerpt = self.resources.redact(orjson.dumps(body).decode()[:500])
        return Outcome(OutcomeClass.SUCCESS, status, sw.ms, excerpt, fields={"status": status, "body": body})

    async def close(self) -> None:
        await self.source.close()

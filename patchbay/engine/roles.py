"""Roles: which parts of the hub a process runs, and the name it goes by among the others.

`patchbay serve` runs every role. Several processes sharing one PostgreSQL store each run some:
  web        takes webhooks and serves the API and the console (ingest commits, then the 202)
  worker     claims due deliveries and calls from the store and sends them
  scheduler  runs what must run once in the whole cluster: schedules, polls and broker consumers,
             window closing, alerts, retention, batch runs, first runs (each held by a lease)

A node's id names it in the store (delivery claims, leases, the cluster view). It is unique per
process: `--node` / PATCHBAY_NODE_ID when given, else `host:pid`, so two processes on one machine
never take each other's claims for their own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

WEB, WORKER, SCHEDULER = "web", "worker", "scheduler"
ROLES: tuple[str, ...] = (WEB, WORKER, SCHEDULER)
ALL_ROLES: frozenset[str] = frozenset(ROLES)


def default_node_id() -> str:
    return os.environ.get("PATCHBAY_NODE_ID") or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Node:
    """This process among the hub's processes: its id and the roles it runs."""

    id: str = field(default_factory=default_node_id)
    roles: frozenset[str] = ALL_ROLES

    def runs(self, role: str) -> bool:
        return role in self.roles

    @property
    def everything(self) -> bool:
        return self.roles == ALL_ROLES


def parse_roles(text: str) -> frozenset[str]:
    """`web,worker` -> the roles; an unknown name is a ValueError that names the known ones."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in ALL_ROLES]
    if unknown or not names:
        raise ValueError(
            f"--role {text!r}: {'unknown role ' + ', '.join(unknown) if unknown else 'no role given'};"
            f" use one or more of {', '.join(ROLES)}, comma-separated (default: all)"
        )
    return frozenset(names)


__all__ = ["ALL_ROLES", "ROLES", "SCHEDULER", "WEB", "WORKER", "Node", "default_node_id", "parse_roles"]

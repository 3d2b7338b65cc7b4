"""Roles: which parts of the hub a process runs, and the name it goes by among the others.

`patchbay serve` runs every role. Several processes sharing one PostgreSQL store each run some:
  web        takes webhooks and serves the API and the console (ingest commits, then the 202)
  worker     claims due deliveries and calls from the store and sends them
  scheduler  runs what must run once in the whole cluster: schedules, polls and broker consumers,
             window closing, alerts, retention, batch runs, first runs (each held by a lease)

A node's id names it in the store (delivery claims, leases, the cluster view). It is unique per
process: `--node` / PATCHBAY_NODE_ID when given, else `host:pid`, so two processes on one machine
never take each other's claims for their own.

The role names (WEB, WORKER, SCHEDULER, ROLES, ALL_ROLES) are defined in patchbay/roles.py, below every layer,
because the SQLite store's flock per role uses them too; they are re-exported here.

Several processes on one machine may each keep to CPUs of their own (`serve --cpus`, `parse_cpus`, `pin`): a
process's threads hand Python's GIL to one another at every webhook (the event loop, the store's writer and its
fsync), and on one CPU that hand-off wakes no other core (docs/scaling.md measures it).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from patchbay.roles import ALL_ROLES, ROLES, SCHEDULER, WEB, WORKER
from patchbay.store.base import Lease, NodeRow

HEARTBEAT_S = 2.0  # each hub writes its node row's heartbeat this often
LOST_AFTER_S = 10.0  # a node without a heartbeat for this long is lost (killed, hung, cut off from the store)


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

    @property
    def role_names(self) -> tuple[str, ...]:
        """The roles in their usual order: web, worker, scheduler."""
        return tuple(r for r in ROLES if r in self.roles)


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


def parse_cpus(text: str) -> frozenset[int]:
    """`0`, `0-3`, `0,2` -> the CPU numbers; a ValueError says what is wrong and which CPUs may be used."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs Linux (CPU affinity); leave it out here")
    available = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(
                f"--cpus {text!r}: {part!r} is not a CPU number or range; write e.g. 0, 0-1 or 0,2"
            ) from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus {text!r}: {part!r} is not a range from low to high, e.g. 0-1")
        # Past the last CPU there is, only that end is named: `0-100000000` is no range to build.
        cpus.update(range(first, last + 1) if last <= max(available) else (last,))
    missing = sorted(cpus - available)
    if missing:
        raise ValueError(
            f"--cpus {text!r}: CPU {', '.join(map(str, missing[:8]))} is not available to this process;"
            f" it may use {cpu_list(available)}"
        )
    return frozenset(cpus)


def cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> `0-2,5`, as `--cpus` and Linux's cpu lists write them."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pin(cpus: frozenset[int], pid: int | str = "self") -> None:
    """Every thread of process `pid` (this one by default), and every thread it starts later, runs on `cpus`
    only."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def node_view(row: NodeRow, now: float, leases: Sequence[str] = ()) -> dict[str, Any]:
    """One node of the cluster view (API, CLI, console): its row, its status and what it holds."""
    return {
        "id": row.id,
        "host": row.host,
        "pid": row.pid,
        "roles": list(row.roles),
        "version": row.version,
        "port": row.port,
        "status": row.status(now, LOST_AFTER_S),
        "started_at": row.started_at,
        "heartbeat_at": row.heartbeat_at,
        "heartbeat_age_s": round(max(0.0, now - row.heartbeat_at), 1),
        "stopped_at": row.stopped_at,
        "claims": row.claims,  # deliveries it holds leased (store/cluster.py q_nodes: rows, or its heartbeat's figure)
        "leases": sorted(leases),  # named leases it holds (engine/leader.py): schedule:<flow>, alerts, ...
    }


def cluster_view(rows: list[NodeRow], now: float, leases: Sequence[Lease] = ()) -> dict[str, Any]:
    """Every node (up, lost, or stopped within the last hour) with the leases it holds (not run out at
    `now`), and the thresholds that say which. On SQLite the one hub runs everything: no lease is stored."""
    held: dict[str, list[str]] = {}
    for lease in leases:
        if lease.holder is not None and lease.until > now:
            held.setdefault(lease.holder, []).append(lease.name)
    return {
        "nodes": [node_view(r, now, held.get(r.id, ())) for r in rows],
        "heartbeat_s": HEARTBEAT_S,
        "lost_after_s": LOST_AFTER_S,
    }


__all__ = [
    "ALL_ROLES",
    "HEARTBEAT_S",
    "LOST_AFTER_S",
    "ROLES",
    "SCHEDULER",
    "WEB",
    "WORKER",
    "Node",
    "cluster_view",
    "default_node_id",
    "node_view",
    "parse_roles",
]

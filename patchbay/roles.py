"""The names of a process's roles, which every layer speaks: `serve --role` (cli/), the HTTP app (server/), the
hub (engine/roles.py: `Node`, `parse_roles`, the cluster view) and the SQLite store's flock per singleton role
(store/sqlite.py `lock`). Here, below them all, so that there is one definition."""

from __future__ import annotations

WEB, WORKER, SCHEDULER = "web", "worker", "scheduler"
ROLES: tuple[str, ...] = (WEB, WORKER, SCHEDULER)  # their usual order
ALL_ROLES: frozenset[str] = frozenset(ROLES)

__all__ = ["ALL_ROLES", "ROLES", "SCHEDULER", "WEB", "WORKER"]

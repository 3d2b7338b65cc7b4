"""Replay dead letters and quarantined events through the flow as it is configured now."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from patchbay.store.base import Actor, ReplayReport, Reprocessor, Store

__all__ = ["REPLAY_CHUNK", "ReplayReport", "event_ids", "replay"]

REPLAY_CHUNK = 200  # events replayed per store transaction


def event_ids(ids: Sequence[str]) -> list[str]:
    """Run ids as given by a user (`evt_...` or without the prefix), as the store names them."""
    return [e if e.startswith("evt_") else f"evt_{e}" for e in ids]


async def replay(
    store: Store,
    pipelines: Mapping[str, Reprocessor],
    ids: Sequence[str],
    destination: str | None,
    by: Actor,
) -> ReplayReport:
    """Re-run each event's steps from its original payload and requeue what is dead or was quarantined.

    Short transactions of REPLAY_CHUNK events, so webhooks keep being acknowledged meanwhile.
    """
    rep = ReplayReport()
    for i in range(0, len(ids), REPLAY_CHUNK):
        part = await store.replay(pipelines, ids[i : i + REPLAY_CHUNK], destination, by)
        rep.requeued += part.requeued
        rep.still_invalid += part.still_invalid
        rep.skipped += part.skipped
    return rep

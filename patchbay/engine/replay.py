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
    ids = await _without_batch_rows(store, pipelines, ids, rep)
    for i in range(0, len(ids), REPLAY_CHUNK):
        part = await store.replay(pipelines, ids[i : i + REPLAY_CHUNK], destination, by)
        rep.requeued += part.requeued
        rep.still_invalid += part.still_invalid
        rep.skipped += part.skipped
    return rep


def batch_row_refusal(flow: str, cursor: str | None) -> str:
    moved = f"moves its {cursor}" if cursor else "is made"
    return (
        f"a row that batch flow {flow} quarantined is not replayed: a batch sync writes rows it reads from "
        f"its source, in one transaction with its cursor. Fix the row at the source (a change that {moved} is "
        f"read by the next run) or fix the flow's steps, then run the flow (`patchbay run {flow}`, the "
        "console's Run button, or its schedule); discard this entry in the console once the row arrived"
    )


async def _without_batch_rows(
    store: Store, pipelines: Mapping[str, Reprocessor], ids: Sequence[str], rep: ReplayReport
) -> list[str]:
    """The ids that are not rows quarantined by a batch flow; those are skipped with what to do instead."""
    batch = {n: getattr(p, "flow", None) for n, p in pipelines.items()}
    batch = {n: f for n, f in batch.items() if getattr(f, "batch", None) is not None}
    if not batch:
        return list(ids)
    keep = []
    for eid in ids:
        run = await store.get_run(eid)
        flow = batch.get(run["flow"]) if run is not None else None
        if run is not None and flow is not None and run["status"] == "quarantined":
            cursor = flow.batch.cursor.column if flow.batch.cursor is not None else None
            rep.skipped.append((run["id"], batch_row_refusal(run["flow"], cursor)))
        else:
            keep.append(eid)
    return keep

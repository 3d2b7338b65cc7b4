"""Prometheus metrics of one hub (its own registry, so several hubs can live in one test process).

Counters and histograms are updated in the hub as things happen. Series that describe the store
(queue depth, oldest pending delivery, schedule lag) come from a snapshot that the alert loop reads
every few seconds on its own thread: a scrape never runs a query on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STEP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


@dataclass
class StoreSnapshot:
    """What the store held at `at`: pending deliveries per destination and how overdue each schedule is."""

    at: float = 0.0
    # (flow, destination) -> (pending deliveries, created_at of the oldest)
    queue: dict[tuple[str, str], tuple[int, float | None]] = field(default_factory=dict)
    schedule_lag: dict[str, float] = field(default_factory=dict)  # flow -> seconds overdue (0: on time)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "patchbay_events_received_total", "Webhook requests received.", ["flow"], registry=r
        )
        self.accepted = Counter(
            "patchbay_events_accepted_total",
            "Events persisted, by status after the steps.",
            ["flow", "status"],
            registry=r,
        )
        self.duplicates = Counter(
            "patchbay_events_duplicate_total", "Re-sent events acknowledged again.", ["flow"], registry=r
        )
        self.history_removed = Counter(
            "patchbay_history_removed_total",
            "Finished runs removed by the flow's `history` retention.",
            ["flow"],
            registry=r,
        )
        self.history_compressed = Counter(
            "patchbay_history_compressed_total",
            "Finished runs whose payload and trace were compressed (`history.compress_after`).",
            ["flow"],
            registry=r,
        )
        self.drift = Counter(
            "patchbay_contract_drift_events_total",
            "Events whose shape differs from their flow's pinned input contract.",
            ["flow"],
            registry=r,
        )
        self.answer_drift = Counter(
            "patchbay_contract_drift_answers_total",
            "Successful answers whose body differs from the flow's pinned response contract.",
            ["flow", "destination"],
            registry=r,
        )
        self.rejected = Counter(
            "patchbay_requests_rejected_total",
            "Inbound requests refused, by reason.",
            ["flow", "code"],
            registry=r,
        )
        self.attempts = Counter(
            "patchbay_delivery_attempts_total",
            "Delivery attempts by outcome class.",
            ["flow", "destination", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "patchbay_delivery_latency_seconds",
            "Latency of delivery attempts.",
            ["flow", "destination"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.windows_open = Gauge(
            "patchbay_windows_open",
            "Aggregate windows holding records not yet emitted.",
            ["flow"],
            registry=r,
        )
        self.windows_emitted = Counter(
            "patchbay_windows_emitted_total",
            "Window records emitted (revisions included).",
            ["flow"],
            registry=r,
        )
        self.intake_limited = Gauge(
            "patchbay_intake_limited",
            "1 while a destination of this process falls behind and webhooks are taken a few at a time"
            " (`intake_when_behind`).",
            registry=r,
        )
        self.destination_paused = Gauge(
            "patchbay_destination_paused",
            "1 while a destination is paused or disabled.",
            ["flow", "destination"],
            registry=r,
        )
        self.source_paused = Gauge(
            "patchbay_source_paused",
            "1 while a flow's source or schedule is paused (auth) or stopped (terminal error) until resumed.",
            ["flow"],
            registry=r,
        )
        self.source_failures = Gauge(
            "patchbay_source_failures",
            "Failed runs in a row of a flow's source or schedule (0 after a success).",
            ["flow"],
            registry=r,
        )
        self.retries = Counter(
            "patchbay_delivery_retries_total",
            "Attempts that repeated an earlier attempt of the same delivery (after a transient failure, "
            "a resume or a replay), counted from the store every few seconds.",
            ["flow", "destination"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "patchbay_step_duration_seconds",
            "Time one step of a flow took for one event (from the run trace).",
            ["flow", "step"],
            registry=r,
            buckets=STEP_BUCKETS,
        )
        self.alerts_firing = Gauge(
            "patchbay_alerts_firing",
            "Alerts firing now, by kind of rule and flow.",
            ["kind", "flow"],
            registry=r,
        )
        self.snapshot = StoreSnapshot()
        # The store's own count of its work (a PostgreSQL store counts statements, round trips and
        # transactions: what bench/cluster.py divides by the events), read at scrape time.
        self.store_work: Callable[[], dict[str, int] | None] = lambda: None
        r.register(_StoreCollector(self))
        r.register(_StoreWorkCollector(self))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: the hot path (every event, every attempt) asks for the same few
        series, and `labels()` costs several times the update itself. Only for series never removed."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def observe_steps(self, flow: str, trace: Iterable[dict[str, Any]]) -> None:
        """Record each step's duration from a run trace (skipped steps and routing have none)."""
        for entry in trace:
            ms = entry.get("ms")
            if ms is not None:
                self.child(self.step_seconds, flow, str(entry.get("step", "?"))).observe(ms / 1000)

    def set_alerts_firing(self, counts: dict[tuple[str, str], int]) -> None:
        self.alerts_firing.clear()  # no await between clear and set: a scrape never sees them half-done
        for (kind, flow), n in counts.items():
            self.alerts_firing.labels(kind, flow).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    """Series read from the last store snapshot; the oldest pending age is computed at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot
        depth, age, lag, at = self._families()
        now = time.time()
        for (flow, dest), (n, oldest) in sorted(snap.queue.items()):
            depth.add_metric([flow, dest], n)
            age.add_metric([flow, dest], max(0.0, now - oldest) if n and oldest is not None else 0.0)
        for flow, seconds in sorted(snap.schedule_lag.items()):
            lag.add_metric([flow], seconds)
        if snap.at:
            at.add_metric([], snap.at)
        return iter((depth, age, lag, at))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "patchbay_delivery_queue_depth",
                "Deliveries waiting (pending) per destination.",
                labels=["flow", "destination"],
            ),
            GaugeMetricFamily(
                "patchbay_delivery_oldest_pending_age_seconds",
                "Age of the oldest pending delivery per destination (0 when none waits).",
                labels=["flow", "destination"],
            ),
            GaugeMetricFamily(
                "patchbay_schedule_lag_seconds",
                "How far a scheduled flow's next run is overdue (0 when on time).",
                labels=["flow"],
            ),
            GaugeMetricFamily(
                "patchbay_store_snapshot_timestamp_seconds",
                "When the store-derived series were last read (Unix time).",
            ),
        )


class _StoreWorkCollector(Collector):
    """`patchbay_store_<what>_total` from the store's counters, for a store that keeps them."""

    WHAT = {
        "statements": "SQL statements the store ran.",
        "round_trips": "Round trips the store made to its server.",
        "transactions": "Transactions the store committed (an accept group is one).",
    }

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        counts = self.metrics.store_work() or {}
        for what, text in self.WHAT.items():
            if what in counts:
                yield CounterMetricFamily(f"patchbay_store_{what}", text, value=counts[what])

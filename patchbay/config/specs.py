"""What a loaded project is: the specs the engine runs (systems, flows, steps, destinations, sources)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from patchbay.config.batch import BatchSpec
from patchbay.config.models import (
    AlertRule,
    DeliveryPolicy,
    DestinationBatch,
    History,
    HubSettings,
    SecretRef,
    SystemCommon,
    Trigger,
)
from patchbay.config.source import Located
from patchbay.expressions import Expr

if TYPE_CHECKING:
    from patchbay.config.entities import EntitySpec


@dataclass
class SystemSpec:
    name: str
    common: SystemCommon
    config: BaseModel | None
    file: str
    line: int
    secret_lines: dict[str, int] = field(default_factory=dict)  # "secret:NAME" -> line where it is referenced
    preset: dict[str, Any] | None = None  # the prebuilt definition it starts from (presets/<name>.yaml)
    src: Located | None = None  # the file it was loaded from, with the line of every setting

    @property
    def kind(self) -> str | None:
        return self.common.kind

    def line_of(self, *loc: str | int) -> int:
        """The line of a setting in the system's file (its own line when the file does not set it)."""
        return self.src.line((self.name, *loc)) if self.src is not None else self.line


@dataclass
class StepSpec:
    kind: str
    name: str
    config: BaseModel
    step: Any  # the Step instance
    when: Expr | None = None  # apply the step only when true (expressions.is_truthy)


@dataclass
class DestinationSpec:
    name: str
    system: str
    kind: str
    config: BaseModel
    policy: DeliveryPolicy
    when: Expr | None = None  # route: deliver only when true
    batch: DestinationBatch | None = None  # several deliveries in one request (the sink can `send_batch`)
    order_by: Expr | None = None  # per-key order: the key of a record's delivery (NewDelivery.order_key)


@dataclass
class SourceSpec:
    system: str
    kind: str
    mode: str  # poll | stream
    config: BaseModel


@dataclass
class FlowSpec:
    name: str
    purpose: str
    owner: str
    trigger: Trigger
    steps: list[StepSpec]
    destinations: list[DestinationSpec]
    record_key: str | None
    sensitive: list[str]
    enabled: bool
    file: str
    line: int
    source: SourceSpec | None = None
    alerts: list[AlertRule] = field(default_factory=list)
    encrypt_sensitive: bool = False  # the flow's setting, else the hub's
    contract: Any = None  # contracts.Contract pinned in flows/<name>.contract.yaml, if there is one
    batch: BatchSpec | None = None
    sync: str | None = None  # the entity this flow's records feed (entities/<name>.yaml), if a sync flow
    history: History = field(default_factory=History)  # retention: the flow's setting over the hub's

    @property
    def webhook_path(self) -> str | None:
        if self.trigger.webhook is None:
            return None
        return self.trigger.webhook.path or f"/hooks/{self.name}"

    def secret_refs(self, systems: dict[str, SystemSpec]) -> list[SecretRef]:
        """The credentials this flow declares: those of the systems it uses, nothing else."""
        names = {d.system for d in self.destinations}
        names |= {
            getattr(s.config, "system", "") for s in self.steps if getattr(s.step, "calls", False)
        }  # call, lookup
        if self.trigger.webhook:
            names.add(self.trigger.webhook.system)
        if self.source:
            names.add(self.source.system)
        if self.batch:
            names |= {self.batch.from_.system, self.batch.to.system}
        return [r for n in sorted(names) if n in systems for r in system_secret_refs(systems[n])]


@dataclass
class Project:
    root: Path
    settings: HubSettings
    systems: dict[str, SystemSpec] = field(default_factory=dict)
    flows: dict[str, FlowSpec] = field(default_factory=dict)
    entities: dict[str, EntitySpec] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / ".patchbay"

    @property
    def store_url(self) -> str | None:
        """The PostgreSQL store's URL, or None when the store is a SQLite file (`store_path`)."""
        s = self.settings.store
        return s if s.startswith(("postgresql://", "postgres://")) else None

    @property
    def store_location(self) -> str | Path:
        """What opens the store: the PostgreSQL URL, or the SQLite file's path."""
        return self.store_url or self.store_path

    @property
    def store_path(self) -> Path:
        p = Path(self.settings.store)
        return p if p.is_absolute() else self.root / p


def system_secret_refs(system: SystemSpec) -> list[SecretRef]:
    """Every credential reference in a system's settings, whatever its kind."""
    found: list[SecretRef] = []

    def walk(v: Any) -> None:
        if isinstance(v, SecretRef):
            found.append(v)
        elif isinstance(v, BaseModel):
            for name in type(v).model_fields:
                walk(getattr(v, name))
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(system.common)
    walk(system.config)
    return found

"""The endpoint table: every route of the REST API, its scope, models and handler, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from patchbay.engine.hub import Hub
from patchbay.server import api_models as m
from patchbay.server.api import identity as im
from patchbay.server.api.admin import Admin
from patchbay.server.api.dead_letters import DeadLetters
from patchbay.server.api.destinations import Destinations
from patchbay.server.api.flow_runs import FlowRuns
from patchbay.server.api.flows import Flows
from patchbay.server.api.http import PREFIX
from patchbay.server.api.identity import Identities
from patchbay.server.api.runs import Runs
from patchbay.server.api.secrets import Secrets
from patchbay.server.api.state import State
from patchbay.server.openapi import Endpoint


@dataclass(frozen=True)
class Handlers:
    """One instance of each resource's handlers."""

    admin: Admin
    flows: Flows
    runs: Runs
    dead_letters: DeadLetters
    destinations: Destinations
    state: State
    secrets: Secrets
    flow_runs: FlowRuns
    identities: Identities

    @classmethod
    def of(cls, hub: Hub) -> Handlers:
        return cls(
            Admin(hub),
            Flows(hub),
            Runs(hub),
            DeadLetters(hub),
            Destinations(hub),
            State(hub),
            Secrets(hub),
            FlowRuns(hub),
            Identities(hub),
        )


def identity_endpoints(h: Handlers) -> list[Endpoint]:
    """Entities: the identity map, conflicts and the review queue (issue 9)."""
    E, P = Endpoint, PREFIX
    read, write = "identities:read", "identities:write"
    return [
        E(
            "GET",
            f"{P}/entities",
            h.identities.list_entities,
            read,
            "Entities: fields with their owner or rule, "
            "systems, identities linked per system, open conflicts and reviews.",
            "identities",
            im.EntitiesOut,
        ),
        E(
            "GET",
            f"{P}/entities/{{entity}}/identities",
            h.identities.search,
            read,
            "Find an entity across systems by a match value (an email), a record id or an identity id.",
            "identities",
            im.IdentitiesOut,
            query=im.SearchQuery,
            path_params=im.EntityPath,
        ),
        E(
            "GET",
            f"{P}/identities/{{identity_id}}",
            h.identities.get_identity,
            read,
            "One identity: its id in every "
            "system, the agreed value of each field, and what each system said and when.",
            "identities",
            im.IdentityOut,
            path_params=im.IdentityPath,
        ),
        E(
            "GET",
            f"{P}/conflicts",
            h.identities.list_conflicts,
            read,
            "Conflicts, newest first: both values, sources and times, the winner and why.",
            "identities",
            im.ConflictsOut,
            query=im.ItemsQuery,
        ),
        E(
            "POST",
            f"{P}/conflicts/{{conflict_id}}/resolve",
            h.identities.resolve_conflict,
            write,
            "Settle a "
            "conflict with a value; it is written to every system that differs, its owner too. Audited.",
            "identities",
            im.DecisionOut,
            path_params=im.ConflictPath,
            body=im.ConflictResolve,
        ),
        E(
            "GET",
            f"{P}/reviews",
            h.identities.list_reviews,
            read,
            "The review queue: records not linked by "
            "themselves (several matches, a weak rule, a duplicate inside one system).",
            "identities",
            im.ReviewsOut,
            query=im.ItemsQuery,
        ),
        E(
            "POST",
            f"{P}/reviews/{{review_id}}/resolve",
            h.identities.resolve_review,
            write,
            "Decide a review: link the record to an identity, make it a new one, or dismiss it. Audited.",
            "identities",
            im.DecisionOut,
            path_params=im.ReviewPath,
            body=im.ReviewResolve,
        ),
    ]


def endpoints(h: Handlers) -> list[Endpoint]:
    E, P = Endpoint, PREFIX
    flow, dest = f"{P}/flows/{{flow}}", f"{P}/flows/{{flow}}/destinations/{{destination}}"
    return [
        E("GET", f"{P}/whoami", h.admin.whoami, None, "The token making this call.", "meta", m.WhoAmI),
        E(
            "GET",
            f"{P}/cluster",
            h.admin.cluster,
            "flows:read",
            "The hub's processes on this store: roles, heartbeat (up, lost, stopped), claims held.",
            "meta",
            m.ClusterOut,
        ),
        E(
            "GET",
            f"{P}/systems",
            h.flows.list_systems,
            "flows:read",
            "Systems: kind, owner, purpose, what they own.",
            "flows",
            m.SystemsOut,
        ),
        E(
            "GET",
            f"{P}/flows",
            h.flows.list_flows,
            "flows:read",
            "Flows: trigger, owner, purpose, destinations, health, last run, success rate and p95 latency.",
            "flows",
            m.FlowsOut,
        ),
        E(
            "GET",
            flow,
            h.flows.get_flow,
            "flows:read",
            "One flow: its definition (read-only, credentials redacted), delivery policies, recent runs.",
            "flows",
            m.FlowDetail,
            path_params=m.FlowPath,
        ),
        E(
            "POST",
            f"{flow}/runs",
            h.flow_runs.start_run,
            "runs:start",
            "Start a run now: a batch flow's sync (202 at once; 409 with the run's id while one is going), or "
            "`data` as one event of a `manual: true` flow; audited.",
            "runs",
            m.FlowRunOut,
            status=202,
            path_params=m.FlowPath,
            body=m.StartRun,
        ),
        E(
            "GET",
            f"{flow}/runs/{{run_id}}",
            h.flow_runs.get_flow_run,
            "runs:read",
            "A run started on demand or by the schedule: a batch run's phase and progress (rows, rows/s, ETA) "
            "while it runs, its report when done.",
            "runs",
            m.FlowRunOut,
            path_params=m.FlowRunPath,
        ),
        E(
            "GET",
            f"{P}/map",
            h.flows.get_map,
            "flows:read",
            "The map: systems as nodes, flows as edges from source to destination, each with a health.",
            "flows",
            m.MapOut,
        ),
        E(
            "GET",
            f"{P}/runs",
            h.runs.list_runs,
            "runs:read",
            "Runs, newest first, filtered.",
            "runs",
            m.RunsOut,
            query=m.RunsQuery,
        ),
        E(
            "GET",
            f"{P}/runs/{{run_id}}",
            h.runs.get_run,
            "runs:read",
            "One run's trace: payload, each step, each destination's attempts.",
            "runs",
            m.RunDetail,
            path_params=m.RunPath,
        ),
        E(
            "GET",
            f"{P}/counts",
            h.runs.counts,
            "runs:read",
            "Events and deliveries by status, overall and per flow.",
            "runs",
            m.CountsOut,
        ),
        E(
            "GET",
            f"{P}/dead-letters",
            h.dead_letters.list_dead,
            "runs:read",
            "Dead deliveries and quarantined events, grouped by flow, destination and reason.",
            "dead-letters",
            m.DeadLettersOut,
            query=m.DeadQuery,
        ),
        E(
            "POST",
            f"{P}/dead-letters/replay",
            h.dead_letters.replay,
            "runs:replay",
            "Replay selected runs, or all matching, through the flow as configured now.",
            "dead-letters",
            m.ReplayOut,
            body=m.ReplayRequest,
        ),
        E(
            "POST",
            f"{P}/dead-letters/discard",
            h.dead_letters.discard,
            "runs:replay",
            "Discard selected dead letters (status `discarded`); audited.",
            "dead-letters",
            m.DiscardOut,
            body=m.DiscardRequest,
        ),
        E(
            "GET",
            f"{P}/destinations",
            h.destinations.list_destinations,
            "flows:read",
            "Every destination: state, backlog, health, delivery policy.",
            "destinations",
            m.DestinationsOut,
        ),
        E(
            "POST",
            f"{dest}/pause",
            h.destinations.pause,
            "destinations:write",
            "Pause a destination: its deliveries wait in the store.",
            "destinations",
            m.DestinationStateOut,
            path_params=m.DestinationPath,
        ),
        E(
            "POST",
            f"{dest}/resume",
            h.destinations.resume,
            "destinations:write",
            "Resume a paused or disabled destination; waiting deliveries go in order of arrival.",
            "destinations",
            m.DestinationStateOut,
            path_params=m.DestinationPath,
        ),
        E(
            "POST",
            f"{flow}/source/resume",
            h.state.resume_source,
            "destinations:write",
            "Try a paused (auth error) or stopped (terminal error) source or schedule again now; audited.",
            "state",
            m.SourceResumeOut,
            path_params=m.FlowPath,
        ),
        E(
            "GET",
            f"{flow}/cursor",
            h.state.get_cursor,
            "flows:read",
            "A flow's saved source cursor.",
            "state",
            m.CursorOut,
            path_params=m.FlowPath,
        ),
        E(
            "DELETE",
            f"{flow}/cursor",
            h.state.reset_cursor,
            "runs:replay",
            "Forget the source cursor: the next poll reads from the start (seen records are not repeated).",
            "state",
            m.CursorResetOut,
            path_params=m.FlowPath,
        ),
        E(
            "GET",
            f"{P}/schedules",
            h.state.list_schedules,
            "flows:read",
            "Scheduled flows: last and next run, lateness.",
            "state",
            m.SchedulesOut,
        ),
        E(
            "GET",
            f"{P}/secrets",
            h.secrets.list_secrets,
            "secrets:read",
            "Secret names, versions and the flows using them. Never values.",
            "secrets",
            m.SecretsOut,
        ),
        E(
            "PUT",
            f"{P}/secrets/{{name}}",
            h.secrets.put_secret,
            "secrets:write",
            "Set or rotate a secret. The value is never logged or echoed.",
            "secrets",
            m.SecretWriteOut,
            path_params=m.SecretPath,
            body=m.SecretWrite,
        ),
        E(
            "DELETE",
            f"{P}/secrets/{{name}}",
            h.secrets.delete_secret,
            "secrets:write",
            "Delete a secret; refused while flows use it unless force=true.",
            "secrets",
            m.SecretDeleteOut,
            path_params=m.SecretPath,
            query=m.SecretDeleteQuery,
        ),
        E(
            "GET",
            f"{P}/audit",
            h.admin.list_audit,
            "admin",
            "The audit log, newest first. Read-only: there is no API to change it.",
            "admin",
            m.AuditOut,
            query=m.AuditQuery,
        ),
        E(
            "GET",
            f"{P}/tokens",
            h.admin.list_tokens,
            "admin",
            "API tokens (never their secrets).",
            "admin",
            m.TokensOut,
        ),
        E(
            "POST",
            f"{P}/tokens",
            h.admin.create_token,
            "admin",
            "Create a token; the answer shows it once.",
            "admin",
            m.TokenCreated,
            status=201,
            body=m.TokenCreate,
        ),
        E(
            "DELETE",
            f"{P}/tokens/{{token_id}}",
            h.admin.revoke_token,
            "admin",
            "Revoke a token.",
            "admin",
            m.TokenOut,
            path_params=m.TokenPath,
        ),
        *identity_endpoints(h),
    ]

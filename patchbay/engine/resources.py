"""What a connector of one system gets for one flow: that system's credentials and address policy only."""

from __future__ import annotations

from patchbay.config.project import Project, SystemSpec, system_secret_refs
from patchbay.connectors.base import Resources
from patchbay.security.secrets import SecretResolver

__all__ = ["system_resources"]


def system_resources(
    project: Project,
    resolver: SecretResolver,
    system: SystemSpec,
    flow_name: str,
    shared: Resources | None = None,
) -> Resources:
    """What a connector of `system` gets for flow `flow_name`: only that system's credentials, its address
    policy, and the hub's shared sessions (`shared`) when there are some."""
    return Resources(
        http=shared.http if shared else None,
        secret=resolver.scoped(system_secret_refs(system)),
        redact=resolver.redactor,
        extra={**(shared.extra if shared else {}), "root": project.root, "flow": flow_name},
        system=system.name,
        allow_private=system.common.allow_private_network,
        allow_networks=tuple(system.common.allow_networks),
    )

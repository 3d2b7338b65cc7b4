"""Handlers for the project's vault: names and versions, set, rotate, delete."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from patchbay.server.api.common import Resource
from patchbay.server.api.http import ApiError, Call

log = logging.getLogger("patchbay.api")


class Secrets(Resource):
    """The vault's secrets, never their values."""

    def _usage(self) -> dict[str, list[str]]:
        project = self.hub.project
        used: dict[str, list[str]] = {}
        for f in project.flows.values():
            for ref in f.secret_refs(project.systems):
                if ref.secret and f.name not in used.setdefault(ref.secret, []):
                    used[ref.secret].append(f.name)
        return used

    async def _vault(self, required: bool) -> Any:
        from patchbay.security.project import open_project_secrets

        vault, _ = await asyncio.to_thread(open_project_secrets, self.hub.project.root)
        if vault is None and required:
            raise ApiError(
                409,
                "no_vault",
                "this project has no master key yet: run "
                f"`patchbay secrets init -p {self.hub.project.root}` on the hub's machine",
            )
        return vault

    async def list_secrets(self, c: Call) -> Any:
        vault = await self._vault(required=False)
        used = self._usage()
        infos = await asyncio.to_thread(vault.list) if vault is not None else []
        rows = [
            {
                "name": i.name,
                "stored": True,
                "created_at": i.created_at,
                "rotated_at": i.rotated_at,
                "version": i.version,
                "key_id": i.key_id,
                "used_by": used.get(i.name, []),
            }
            for i in infos
        ]
        stored = {i.name for i in infos}
        rows += [
            {
                "name": n,
                "stored": False,
                "created_at": None,
                "rotated_at": None,
                "version": None,
                "key_id": None,
                "used_by": used[n],
            }
            for n in sorted(set(used) - stored)
        ]
        return {"vault": vault is not None, "secrets": rows}

    async def put_secret(self, c: Call) -> Any:
        name = c.path.name
        vault = await self._vault(required=True)
        value = c.body.value

        def write() -> tuple[bool, int]:
            existed = any(i.name == name for i in vault.list())
            vault.set(name, value)
            version = next(i.version for i in vault.list() if i.name == name)
            return existed, version

        try:
            existed, version = await asyncio.to_thread(write)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
        if self.hub.resolver is not None:
            self.hub.resolver.redactor.add(value)  # scrubbed from logs and excerpts from now on
        action = "secret.rotate" if existed else "secret.set"
        await self.store.audit(action, name, c.by(version=version))
        log.info("%s %s via the API (%s)", action, name, c.actor)
        return {"name": name, "action": "rotated" if existed else "created", "version": version}

    async def delete_secret(self, c: Call) -> Any:
        name = c.path.name
        vault = await self._vault(required=True)
        users = self._usage().get(name, [])
        if users and not c.query.force:
            raise ApiError(
                409,
                "secret_in_use",
                f"{name} is used by {', '.join(users)}; change those flows or pass force=true",
            )
        if not await asyncio.to_thread(vault.delete, name):
            raise ApiError(404, "not_found", f"no secret {name!r}")
        await self.store.audit("secret.delete", name, c.by(used_by=users))
        return {"name": name, "deleted": True}

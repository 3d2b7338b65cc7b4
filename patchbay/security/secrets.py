"""Resolving secret references (vault first, then environment) and scrubbing their values from text."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

from patchbay.config.models import SecretRef
from patchbay.errors import SecretMissing

ENV_PREFIX = "PATCHBAY_SECRET_"


def env_name(secret: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", secret).upper()


class SecretResolver:
    """Looks references up; remembers every value it hands out so the redactor can hide them."""

    def __init__(
        self, vault_get: Callable[[str], str | None] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self._vault_get = vault_get
        self._env = os.environ if env is None else env
        self.redactor = Redactor()

    def lookup(self, ref: SecretRef) -> str | None:
        if ref.env:
            return self._env.get(ref.env)
        assert ref.secret is not None
        value = self._vault_get(ref.secret) if self._vault_get else None
        if value is None:
            value = self._env.get(env_name(ref.secret))
        return value

    def exists(self, ref: SecretRef) -> bool:
        return self.lookup(ref) is not None

    def resolve(self, ref: SecretRef) -> str:
        value = self.lookup(ref)
        if value is None:
            hint = f"patchbay secrets set {ref.secret}" if ref.secret else f"export {ref.env}=..."
            raise SecretMissing(ref.label, hint)
        self.redactor.add(value)
        return value

    def scoped(self, allowed: Iterable[SecretRef]) -> Callable[[SecretRef | None], str]:
        """A resolver that only answers for the references a flow or system declared."""
        allowed_labels = {r.label for r in allowed}

        def get(ref: SecretRef | None) -> str:
            if ref is None or ref.label not in allowed_labels:
                raise SecretMissing(ref.label if ref else "?", "not declared by this flow's systems")
            return self.resolve(ref)

        return get


class Redactor:
    """Replaces every known secret value (and its common encodings) in a text with [secret]."""

    MASK = "[secret]"

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._re: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < 4 or value in self._values:
            return
        import base64

        self._values.add(value)
        self._values.add(base64.b64encode(value.encode()).decode().rstrip("="))
        self._re = re.compile("|".join(re.escape(v) for v in sorted(self._values, key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        if self._re is None or not text:
            return text
        return self._re.sub(self.MASK, text)

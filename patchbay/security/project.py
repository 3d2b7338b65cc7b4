"""The secrets of one project folder: its master key ring, its vault (in the store file) and a resolver."""

from __future__ import annotations

from pathlib import Path

import yaml

from patchbay.config.models import store_location
from patchbay.errors import ConfigError, Problem
from patchbay.security.secrets import SecretResolver
from patchbay.security.vault import ENV_VAR, KEY_FILE, MasterKey, Vault

DEFAULT_STORE = ".patchbay/patchbay.db"


def store_location_of(root: Path) -> str | Path:
    """The project's store: a PostgreSQL URL (str), or the SQLite file's path (see `store_path_of`)."""
    root = Path(root)
    store_path_of(root)  # the one validation of the setting
    try:
        doc = yaml.safe_load((root / "patchbay.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        doc = {}
    store = doc.get("store") if isinstance(doc, dict) else None
    if isinstance(store, str) and store.startswith(("postgresql://", "postgres://")):
        return store
    return store_path_of(root)


def store_path_of(root: Path) -> Path:
    """Where a project keeps its store, read from patchbay.yaml without loading the whole project. A setting
    the hub cannot use raises ConfigError located at its line (never a file named like a URL)."""
    root = Path(root)
    store, text = DEFAULT_STORE, ""
    try:
        text = (root / "patchbay.yaml").read_text()
        doc = yaml.safe_load(text) or {}
        if isinstance(doc, dict) and isinstance(doc.get("store"), str):
            store = doc["store"]
    except (OSError, yaml.YAMLError):
        pass
    try:
        store = store_location(store)
    except ValueError as exc:
        line = next((n for n, ln in enumerate(text.splitlines(), 1) if ln.startswith("store:")), 0)
        raise ConfigError([Problem(str(root / "patchbay.yaml"), line, f"store: {exc}")]) from None
    p = Path(store)
    return p if p.is_absolute() else root / p


def open_project_secrets(root: Path, *, create_key: bool = False) -> tuple[Vault | None, SecretResolver]:
    """The project's vault (None while it has no master key) and a resolver: vault first, then environment."""
    import os

    root = Path(root)
    state_dir = root / ".patchbay"
    vault = None
    if create_key or os.environ.get(ENV_VAR) or (state_dir / KEY_FILE).exists():
        keys = MasterKey.load_ring(state_dir, create=create_key)
        location = store_location_of(root)
        if isinstance(location, str):  # PostgreSQL: the vault's rows are a table of the store
            from patchbay.store.opening import secret_rows_at

            vault = Vault(secret_rows_at(location), keys)
        else:
            from patchbay.store.sqlite import open_store  # the vault lives in the store file: same checks

            open_store(location).close()
            vault = Vault.at(location, keys)
        vault.ensure_schema()
    return vault, SecretResolver(vault.get if vault else None)


def require_vault(root: Path, create_key: bool = False) -> Vault:
    vault, _ = open_project_secrets(root, create_key=create_key)
    if vault is None:
        raise ConfigError(
            f"this project has no master key yet: create one with `patchbay secrets init -p {root}` "
            f"or set ${ENV_VAR}"
        )
    return vault

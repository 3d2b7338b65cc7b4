"""The secrets of one project folder: its master key ring, its vault (in the store file) and a resolver."""

from __future__ import annotations

from pathlib import Path

import yaml

from patchbay.errors import ConfigError
from patchbay.security.secrets import SecretResolver
from patchbay.security.vault import ENV_VAR, KEY_FILE, MasterKey, Vault

DEFAULT_STORE = ".patchbay/patchbay.db"


def store_path_of(root: Path) -> Path:
    """Where a project keeps its store, read from patchbay.yaml without loading the whole project."""
    root = Path(root)
    store = DEFAULT_STORE
    try:
        doc = yaml.safe_load((root / "patchbay.yaml").read_text()) or {}
        if isinstance(doc, dict) and isinstance(doc.get("store"), str):
            store = doc["store"]
    except (OSError, yaml.YAMLError):
        pass
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
        path = store_path_of(root)
        from patchbay.store.sqlite import open_store  # the vault lives in the store file: same checks

        open_store(path).close()
        vault = Vault.at(path, keys)
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

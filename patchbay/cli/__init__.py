"""The `patchbay` command: thin wrappers that parse arguments and call the engine and the store.

Exit codes: 0 ok, 1 the thing asked about is not well (problems found, nothing matched), 2 usage or
config errors, 3 the store or the hub could not be reached.
"""

from __future__ import annotations

# Each registers its commands on main: cluster, connect, contract, run, secrets, store, test (and runs export),
# tokens (and audit), identity (identities, conflicts, sync).
from patchbay.cli import (  # noqa: F401
    cluster,
    connect,
    contract,
    identity,
    run,
    secrets,
    store,
    test,
    tokens,
)
from patchbay.cli.main import main

__all__ = ["main"]

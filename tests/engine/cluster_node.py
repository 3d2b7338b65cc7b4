"""One hub process of a test cluster: `patchbay serve` on a PostgreSQL store that other such processes share.

`PostgresStore.lock()` refuses a second serving hub until roles land (`patchbay serve --role worker`): this
skips that lock and nothing else. Run as `python -m tests.engine.cluster_node ROOT PORT NODE_ID`; it prints
`ready PORT` once it serves.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.engine.roles import Node
from patchbay.server.app import run_hub


class SharedHub(Hub):
    async def start(self, *, lock: bool = True) -> None:
        await super().start(lock=False)


def main() -> None:
    root, port, node = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    hub = SharedHub(load_or_raise(root), node=Node(node))
    asyncio.run(run_hub(hub, host="127.0.0.1", port=port, on_ready=lambda p: print("ready", p, flush=True)))


if __name__ == "__main__":
    main()

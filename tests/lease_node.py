"""A hub process for the lease tests: `python -m tests.lease_node ROOT NODE_ID` runs every part of the hub
(no HTTP server) on the project's shared store, without the one-hub store lock, until SIGTERM or SIGKILL.

Until `patchbay serve --role … --node …` runs several hubs on one PostgreSQL store, this is how the tests
start several scheduler nodes; it writes ROOT/NODE_ID.ready once started."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from patchbay.config.project import load_or_raise
from patchbay.engine.hub import Hub
from patchbay.engine.roles import Node


async def main(root: Path, node_id: str) -> None:
    hub = Hub(load_or_raise(root), node=Node(node_id))
    await hub.start(lock=False)
    (root / f"{node_id}.ready").write_text("ready")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await hub.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {sys.argv[2]} %(name)s %(message)s")
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))

"""`patchbay serve --cpus`: a process, every thread of it, keeps to the CPUs it is given (split processes on one
machine each on a core of their own, docs/cluster.md); a CPU list that cannot be used is refused before
anything is opened."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from patchbay.cli.main import main
from patchbay.engine.roles import cpu_list, parse_cpus
from tests.cluster.harness import LEAD_SECRETS, Cluster, Sender, lead
from tests.conftest import Sink, lead_project

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")


def allowed_cpus(pid: int) -> dict[str, str]:
    """Thread id -> its `Cpus_allowed_list`, for every thread of process `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        out[tid] = next(
            ln.split(":", 1)[1].strip() for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")
        )
    return out


async def test_every_thread_of_a_process_given_cpus_runs_on_them_and_it_serves(
    tmp_path: Path, sink: Sink
) -> None:
    root = lead_project(tmp_path, sink.url)
    cpu = min(os.sched_getaffinity(0))  # one this machine lets us use (not always 0 in a container)
    async with Cluster(root, LEAD_SECRETS) as cluster:
        node = await cluster.start("hub", roles="web,worker,scheduler", args=("--cpus", str(cpu)))
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{node.url}/hooks/lead-capture", data=lead(1), headers=Sender.headers(lead(1), "msg_1")
            ) as r:
                assert r.status == 202, await r.text()
        await sink.wait_for(1)
        threads = allowed_cpus(node.proc.pid)
        # The event loop, the store's writer, syncer and checkpointer, the readers: all started after the pin.
        assert len(threads) >= 4, threads
        assert set(threads.values()) == {str(cpu)}, threads
        assert f"(on CPU {cpu} only: --cpus)" in node.log_tail()


@pytest.mark.parametrize(
    ("cpus", "says"),
    [
        ("99999", "CPU 99999 is not available to this process; it may use "),
        ("0-100000000", "CPU 100000000 is not available to this process"),
        ("first", "'first' is not a CPU number or range; write e.g. 0, 0-1 or 0,2"),
        ("1-0", "'1-0' is not a range from low to high"),
        ("0,", "'' is not a CPU number or range"),
    ],
)
def test_cpus_that_cannot_be_used_are_refused_before_anything_is_opened(
    tmp_path: Path, cpus: str, says: str
) -> None:
    root = lead_project(tmp_path, "http://127.0.0.1:9/")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    r = CliRunner().invoke(main, ["serve", str(root), "--port", "0", "--cpus", cpus], env=LEAD_SECRETS)
    assert r.exit_code == 2, r.output
    assert f"serve: --cpus {cpus!r}: " in r.output and says in r.output, r.output
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no store, no lock, no log


def test_a_cpu_list_is_read_and_written_as_linux_writes_it() -> None:
    cpu = min(os.sched_getaffinity(0))
    assert parse_cpus(str(cpu)) == {cpu}
    assert parse_cpus(f" {cpu} , {cpu}-{cpu}") == {cpu}
    assert parse_cpus(cpu_list(os.sched_getaffinity(0))) == os.sched_getaffinity(0)
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cpu_list([3]) == "3"

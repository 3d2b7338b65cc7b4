"""tls_client: one context per setting, built in a worker thread, renewed when the CA file changes."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import threading
from pathlib import Path

import pytest

from patchbay.connectors import tls_client
from patchbay.connectors.tls_client import TlsSettings, tls_context


@pytest.fixture
def builds(monkeypatch) -> list[tuple[TlsSettings, int]]:
    tls_client.forget()
    seen: list[tuple[TlsSettings, int]] = []
    real = tls_client.build

    def spy(settings: TlsSettings) -> ssl.SSLContext:
        seen.append((settings, threading.get_ident()))
        return real(settings)

    monkeypatch.setattr(tls_client, "build", spy)
    yield seen
    tls_client.forget()


async def test_concurrent_first_connects_share_one_context_built_off_the_loop(builds):
    settings = TlsSettings(server_name="db.example")
    contexts = await asyncio.gather(*(tls_context(settings) for _ in range(8)))
    contexts.append(await tls_context(TlsSettings(server_name="db.example")))  # equal settings
    assert len({id(c) for c in contexts}) == 1
    assert [s for s, _ in builds] == [settings]
    assert builds[0][1] != threading.get_ident()


async def test_each_setting_gets_its_own_context(builds):
    verified = await tls_context(TlsSettings())
    unverified = await tls_context(TlsSettings(verify=False, check_hostname=False))
    ca_only = await tls_context(TlsSettings(check_hostname=False))
    assert verified.verify_mode is ssl.CERT_REQUIRED and verified.check_hostname
    assert unverified.verify_mode is ssl.CERT_NONE and not unverified.check_hostname
    assert ca_only.verify_mode is ssl.CERT_REQUIRED and not ca_only.check_hostname
    assert len(builds) == 3


async def test_an_unverified_context_loads_no_cas(builds):
    ctx = await tls_context(TlsSettings(verify=False, check_hostname=False, server_name="h"))
    assert ctx.cert_store_stats()["x509_ca"] == 0


async def test_a_changed_ca_file_gets_a_new_context(builds, tmp_path: Path):
    system_cas = ssl.get_default_verify_paths().cafile
    if system_cas is None or not os.path.exists(system_cas):
        pytest.skip("no system CA file to copy")
    ca = tmp_path / "ca.pem"
    shutil.copy(system_cas, ca)
    settings = TlsSettings(ca_bundle=str(ca))
    first = await tls_context(settings)
    assert await tls_context(settings) is first
    with ca.open("a") as f:
        f.write("\n")  # a rotated bundle: another size
    assert await tls_context(settings) is not first
    assert len(builds) == 2


async def test_a_missing_ca_file_fails_and_is_not_kept(builds, tmp_path: Path):
    settings = TlsSettings(ca_bundle=str(tmp_path / "missing.pem"))
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            await tls_context(settings)
    assert len(builds) == 2

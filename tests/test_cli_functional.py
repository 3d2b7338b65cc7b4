"""The newcomer's path, for real: init, check, serve, send, runs, runs show, dead — as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.cluster.harness import free_port

pytestmark = pytest.mark.slow


def pb(*args: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    res = subprocess.run(
        [sys.executable, "-m", "patchbay", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"patchbay {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def test_init_check_serve_send_and_look(tmp_path):
    demo = tmp_path / "demo"
    out = pb("init", str(demo)).stdout
    assert "Next: patchbay serve" in out
    assert (demo / ".patchbay" / "master.key").stat().st_mode & 0o077 == 0
    assert "whsec_" not in (demo / "systems.yaml").read_text()  # secrets live in the vault, not in config

    port = free_port()
    for f in ("patchbay.yaml", "systems.yaml"):
        p = demo / f
        p.write_text(p.read_text().replace("8787", str(port)))
    assert pb("check", str(demo)).stdout.startswith("ok: 4 systems, 1 flow\n")

    log = open(tmp_path / "serve.log", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchbay", "serve", str(demo)], stdout=log, stderr=log, env=env
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        banner = (tmp_path / "serve.log").read_text()
        assert "patchbay send lead-capture" in banner and "curl -s" in banner
        # The printed curl command works as printed, in a shell.
        [curl] = [line.strip() for line in banner.splitlines() if line.strip().startswith("curl ")]
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "pending", done.stdout

        sent = pb("send", "lead-capture", "-p", str(demo))
        assert sent.stdout.startswith("202 ")
        event_id = json.loads(sent.stdout[4:])["event_id"]

        def runs() -> list[dict]:
            return json.loads(pb("runs", "-p", str(demo), "--json").stdout)

        deadline = time.monotonic() + 15
        while runs()[0]["status"] != "delivered":
            assert time.monotonic() < deadline, runs()
            time.sleep(0.1)
        # The lead visibly landed in the demo CRM, mapped.
        crm = [json.loads(line) for line in (demo / "inbox" / "crm.jsonl").read_text().splitlines()]
        assert crm[0]["body"]["properties"]["email"] == "ada@example.com"
        chat = [json.loads(line) for line in (demo / "inbox" / "chat.jsonl").read_text().splitlines()]
        assert "ada@example.com" in chat[0]["body"]["text"]

        found = pb("runs", "-p", str(demo), "--key", "ada@example.com")
        assert event_id in found.stdout and "delivered" in found.stdout
        trace = pb("runs", "show", event_id, "-p", str(demo)).stdout
        assert "normalise" in trace and "deliver to crm: DELIVERED" in trace and "attempt 1" in trace

        bad = pb("send", "lead-capture", "-p", str(demo), "--data", '{"email": "not-an-email"}')
        bad_id = json.loads(bad.stdout.splitlines()[0][4:])["event_id"]
        assert "quarantined: " in bad.stdout and "not a valid email" in bad.stdout, bad.stdout
        dead = pb("dead", "-p", str(demo)).stdout
        assert bad_id in dead and "not a valid email" in dead
        assert pb("runs", "-p", str(demo), "--status", "dead", check=False).returncode == 1  # nothing matched
        assert pb("runs", "show", "evt_nope", "-p", str(demo), check=False).returncode == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()
    assert proc.returncode == 0
    text = (tmp_path / "serve.log").read_text()
    assert "stopped; pending work stays in the store" in text
    # No secret value ever reaches the log.
    from patchbay.security.project import open_project_secrets

    vault, _ = open_project_secrets(demo)
    for name in ("website_signing_secret", "crm_token"):
        value = vault.get(name)
        assert value and value not in text

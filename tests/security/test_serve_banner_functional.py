"""`patchbay serve`'s banner never prints an inbound secret: a real serve process, text and JSON logs.

For bearer and basic webhooks the sample curl names the secret through a shell variable; once the
variable holds the secret, the printed command is accepted by the hub. Signature schemes print a
signature (it does not reveal the secret) and never the secret itself.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from patchbay.security.project import open_project_secrets
from tests.cluster.harness import free_port
from tests.conftest import write_project

pytestmark = pytest.mark.slow

SECRET = "inb0und-s3cret-Value-98765"
USER = "website-bot"


def _project(root: Path, scheme: str, port: int) -> None:
    webhook: dict[str, object] = {"scheme": scheme, "secrets": [{"secret": "website_secret"}]}
    if scheme == "basic":
        webhook["username"] = USER
    systems = {
        "website": {"owner": "web", "webhook": webhook},
        "inbox": {
            "kind": "http",
            "owner": "ops",
            "url": f"http://127.0.0.1:{port}/_inbox/crm",
            "allow_private_network": True,
        },
    }
    flow = {
        "purpose": "leads reach the inbox",
        "owner": "ops",
        "trigger": {"webhook": {"system": "website"}},
        "destinations": [{"name": "crm", "system": "inbox"}],
    }
    write_project(
        root,
        {
            "patchbay.yaml": yaml.safe_dump({"port": port, "demo_inbox": True}),
            "systems.yaml": yaml.safe_dump(systems, sort_keys=False),
            "flows/lead-capture.yaml": yaml.safe_dump(flow, sort_keys=False),
        },
    )
    vault, _ = open_project_secrets(root, create_key=True)
    assert vault is not None
    vault.set("website_secret", SECRET)


def _serve_banner(root: Path, log_format: str) -> tuple[str, subprocess.Popen[str]]:
    """Start `patchbay serve` and return what it wrote up to the end of its banner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchbay", "serve", str(root), "--log-format", log_format],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(30, proc.kill)  # a hub that never gets ready fails the test, not the run
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Stop with Ctrl-C"):
                break
    finally:
        watchdog.cancel()
    assert lines and lines[-1].startswith("Stop with Ctrl-C"), "".join(lines)
    return "".join(lines), proc


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    return rest


@pytest.mark.parametrize(
    ("scheme", "log_format"),
    [("bearer", "text"), ("bearer", "json"), ("basic", "json"), ("standard_webhooks", "text")],
)
def test_the_banner_names_the_secret_and_never_prints_it(tmp_path, scheme, log_format):
    port = free_port()
    root = tmp_path / "proj"
    _project(root, scheme, port)
    banner, proc = _serve_banner(root, log_format)
    try:
        [curl] = [line.strip() for line in banner.splitlines() if line.strip().startswith("curl ")]
        if scheme in ("bearer", "basic"):
            assert "$PATCHBAY_SECRET_WEBSITE_SECRET" in curl
            assert "PATCHBAY_SECRET_WEBSITE_SECRET" in banner.split(curl)[0]  # says what to set first
            # The printed command works once the variable holds the secret (curl, a shell, the live hub).
            sent = subprocess.run(
                ["bash", "-c", curl + " -o /dev/null -w '%{http_code}'"],
                capture_output=True,
                text=True,
                timeout=30,
                env={"PATH": os.environ["PATH"], "PATCHBAY_SECRET_WEBSITE_SECRET": SECRET},
            )
            assert sent.stdout == "202", (sent.stdout, sent.stderr)
        else:
            assert "webhook-signature: v1," in curl
    finally:
        rest = _stop(proc)
    output = banner + rest
    pair = f"{USER}:{SECRET}".encode()
    for form in (
        SECRET,
        base64.b64encode(pair).decode().rstrip("="),
        base64.b64encode(SECRET.encode()).decode()[:12],
    ):
        assert form not in output, f"{form!r} printed:\n{output}"

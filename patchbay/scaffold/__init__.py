"""`patchbay init`: the example project, the serve banner and signed test requests."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from patchbay.errors import PatchbayError

EXAMPLE = Path(__file__).parent / "example"
TEMPLATE_DIR = Path(__file__).parent / "templates"
# name -> (folder, what it shows). Each is runnable on a laptop against the demo inbox or a local
# SQLite file, and has tests beside its flows that `patchbay test` runs.
TEMPLATES: dict[str, tuple[Path, str]] = {
    "lead-capture": (EXAMPLE, "website form -> CRM + sales chat + email sequence (the default)"),
    "support-ticket": (TEMPLATE_DIR / "support-ticket", "helpdesk ticket -> support chat notification"),
    "payment-reporting": (TEMPLATE_DIR / "payment-reporting", "payment webhook -> reporting table (SQLite)"),
    "contact-sync": (TEMPLATE_DIR / "contact-sync", "CRM <-> email platform: consent and unsubscribes"),
    "sales-analytics": (TEMPLATE_DIR / "sales-analytics", "shop orders -> analytics table (SQLite)"),
    "nightly-orders-export": (
        TEMPLATE_DIR / "nightly-orders-export",
        "orders table -> reporting table, nightly batch sync (SQLite)",
    ),
    "stripe-hubspot": (
        TEMPLATE_DIR / "stripe-hubspot",
        "new Stripe customer -> find or create the HubSpot contact -> its id back to billing",
    ),
}
EXAMPLE_LEAD = {
    "email": "  Ada@Example.com ",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "company": "Analytical Engines",
    "utm_source": "ads",
}


def create_project(directory: Path, *, force: bool = False, template: str = "lead-capture") -> list[Path]:
    """Copy a template and give it fresh secrets in a fresh vault: a signing secret for each webhook
    that verifies Standard Webhooks, a random demo value for every other secret it references; each
    `data/NAME.sql` becomes the SQLite database `data/NAME.db` its flows write to."""
    import sqlite3

    from patchbay.config.project import load_project, system_secret_refs
    from patchbay.security.project import open_project_secrets
    from patchbay.security.webhook_auth import generate_whsec

    if template not in TEMPLATES:
        raise PatchbayError(
            f"no template {template!r}; `patchbay init --list` shows them: {', '.join(TEMPLATES)}"
        )
    source = TEMPLATES[template][0]
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not force:
        raise PatchbayError(f"{directory} is not empty; choose a new folder or pass --force")
    created = []
    for src in sorted(source.rglob("*")):
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        dst = directory / src.relative_to(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        created.append(dst)
        if dst.suffix == ".sql" and dst.parent.name == "data":
            db = dst.with_suffix(".db")
            db.unlink(missing_ok=True)
            with sqlite3.connect(db) as conn:
                conn.executescript(dst.read_text(encoding="utf-8"))
            conn.close()
            created.append(db)
    gi = directory / ".gitignore"
    gi.write_text(
        "# the store, the master key, the demo inbox and local databases never go into git\n"
        ".patchbay/\ninbox/\ndata/*.db\n"
    )
    created.append(gi)
    vault, _ = open_project_secrets(directory, create_key=True)
    assert vault is not None
    project, problems = load_project(directory)
    if project is None:  # a template is tested to load; this is a broken installation
        raise PatchbayError(f"template {template!r} does not load: " + "; ".join(map(str, problems)))
    for system in project.systems.values():
        auth = system.common.webhook
        signing = {r.secret for r in auth.secrets} if auth and auth.scheme == "standard_webhooks" else set()
        for ref in system_secret_refs(system):
            if ref.secret and vault.get(ref.secret) is None:
                vault.set(
                    ref.secret, generate_whsec() if ref.secret in signing else "demo-" + os.urandom(16).hex()
                )
    created.append(directory / ".patchbay" / "master.key")
    return created


def signed_headers(
    project: Any, flow: Any, resolver: Any, body: bytes, event_id: str | None = None
) -> dict[str, str]:
    """Headers that authenticate `body` for `flow`'s webhook, per its system's scheme."""
    import base64

    from patchbay.records import new_id
    from patchbay.security.webhook_auth import sign_hmac, sign_standard_webhooks, sign_stripe

    auth = project.systems[flow.trigger.webhook.system].common.webhook
    headers = {"Content-Type": "application/json"}
    if auth.scheme == "none":
        return headers
    secret = resolver.resolve(auth.secrets[0])
    if auth.scheme == "standard_webhooks":
        headers.update(sign_standard_webhooks(secret, event_id or new_id("msg"), int(time.time()), body))
    elif auth.scheme == "stripe":
        headers.update(sign_stripe(secret, int(time.time()), body))
    elif auth.scheme == "hmac":
        ts = int(time.time()) if auth.timestamp_header else None
        headers.update(sign_hmac(auth, secret, body, ts))
    elif auth.scheme == "bearer":
        headers["Authorization"] = f"Bearer {secret}"
    elif auth.scheme == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth.username}:{secret}".encode()).decode()
    return headers


def _seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


def describe_trigger(flow: Any, base: str = "") -> str:
    """A flow's trigger in a few words, as `check` and the serve banner print it: `POST /hooks/leads`,
    `every 1s: poll shop_db`, `cron 0 2 * * * (Europe/Paris)`, `consume broker`, or `manual`."""
    if flow.webhook_path is not None:
        return f"POST {base}{flow.webhook_path}"
    trigger = flow.trigger
    when = ""
    if trigger.schedule is not None:
        sch = trigger.schedule
        when = f"cron {sch.cron} ({sch.timezone})" if sch.cron else f"every {_seconds(sch.every)}"
    if trigger.source is not None:
        what = f"{'poll' if when else 'consume'} {trigger.source.get('system')}"
        return f"{when}: {what}" if when else what
    if flow.batch is not None:
        b = flow.batch
        src = b.from_.table or "query"
        what = f"{b.mode} {b.from_.system}.{src} into {b.to.system}.{b.to.table}"
        ways = [w for w in (when, "manual" if trigger.manual else "") if w]
        return f"{' or '.join(ways) or 'manual'}: {what}"
    return when or "manual"


def _curl_example(project: Any, flow: Any, url: str) -> list[str]:
    """A curl command for `flow`'s webhook that never holds the inbound secret itself.

    A signature scheme gets headers signed now (a signature does not reveal its key). A bearer
    token or basic password is referred to by a shell variable, the one the hub also reads the
    secret from, and the lines before the command say to set it.
    """
    from patchbay.security.project import open_project_secrets
    from patchbay.security.secrets import env_name

    body = json.dumps(EXAMPLE_LEAD).encode()
    data = f"-d {shlex.quote(body.decode())}"
    auth = project.systems[flow.trigger.webhook.system].common.webhook
    json_type = "-H 'Content-Type: application/json'"
    if auth.scheme in ("bearer", "basic"):
        ref = auth.secrets[0]
        var = ref.env or env_name(ref.secret)
        where = f"the value of secret {ref.secret}" if ref.secret else f"${ref.env} as the hub sees it"
        if auth.scheme == "bearer":
            cred = f'-H "Authorization: Bearer ${var}"'
        else:
            cred = f'-u "{_double_quoted(auth.username or "")}:${var}"'
        return [
            f"or with curl, after `read -rs {var}` (paste {where}; it is not printed here):",
            f"  curl -s {url} {json_type} {cred} {data}",
        ]
    _, resolver = open_project_secrets(project.root)
    headers = signed_headers(project, flow, resolver, body)
    h = " ".join(f"-H {shlex.quote(f'{k}: {v}')}" for k, v in headers.items())
    return ["or with curl (this signature is valid for 5 minutes):", f"  curl -s {url} {h} {data}"]


def _double_quoted(text: str) -> str:
    """`text` safe inside a shell's double quotes (which still expand the $VARIABLE after it)."""
    return "".join("\\" + c if c in '"\\$`' else c for c in text)


def banner(project: Any, host: str, port: int) -> str:
    """What to do next, printed when the hub is ready."""
    base = f"http://{host}:{port}"
    root = project.root
    lines = [f"Patchbay is running on {base} (store: {project.store_path})", ""]
    for f in project.flows.values():
        dests = ", ".join(f"{d.name}" for d in f.destinations)
        lines.append(f"  flow {f.name}: {describe_trigger(f, base)} -> {dests}")
    lines.append("")
    first = next((f for f in project.flows.values() if f.webhook_path), None)
    if first is not None:
        p = "" if root.resolve() == Path.cwd().resolve() else f" -p {shlex.quote(str(root))}"
        lines.append("Send a signed test lead (from another terminal):")
        lines.append(f"  patchbay send {first.name}{p}")
        try:
            lines += _curl_example(project, first, f"{base}{first.webhook_path}")
        except PatchbayError:
            pass
        lines.append("Then look:")
        look = [
            (f"patchbay runs{p}", "every run, newest first"),
            (f"patchbay runs show RUN_ID{p}", "its trace"),
        ]
        if project.settings.demo_inbox:
            look.append(
                (f"cat {shlex.quote(str(root / 'inbox' / 'crm.jsonl'))}", "what the demo CRM received")
            )
        look.append((f"patchbay dead{p}", "dead letters and quarantined events"))
        width = max(len(command) for command, _ in look) + 2
        lines += [f"  {command.ljust(width)}# {what}" for command, what in look]
    lines.append("Stop with Ctrl-C: in-flight work finishes or stays queued in the store.")
    return "\n".join(lines)

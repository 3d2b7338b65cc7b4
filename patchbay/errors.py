"""The exception tree: what is retried, what goes to the dead letter, what is rejected at load time.

    PatchbayError
    ├── ConfigError        rejected at load time, never retried (carries file:line problems)
    ├── RejectedRequest    an inbound request refused with a 4xx (never stored)
    ├── TransientError     retried with backoff: timeouts, refused connections, 408/425/429/5xx
    ├── TerminalError      sent to the dead letter (a source stops): other 4xx, integrity errors
    │   └── RecordInvalid  a record failed validation; carries every reason with its field path
    ├── AuthError          401/403: the destination (or source) is paused, nothing fails
    ├── SecretMissing      a referenced secret has no value
    ├── LeaseLost          a write under a lease (engine/leader.py) another node holds now: refused
    └── StoreError         the store itself is in trouble (not one record or destination)
        ├── StoreUnusable     the file is empty, foreign, damaged or newer: refused at open, never retried
        └── StoreUnavailable  writes fail right now (disk full, I/O error): answered 503, retried

Messages start with the action, lowercase: "delivering to crm: HTTP 503". Sources raise these;
`engine/policy.outcome_of` reads any exception as the deliveries' `OutcomeClass`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PatchbayError(Exception):
    """Base of every error Patchbay raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a project, located in its file."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(PatchbayError):
    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("<config>", 0, problems)]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RejectedRequest(PatchbayError):
    """An inbound request we refuse; `status` is the HTTP status, `code` a stable machine name."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.headers = headers or {}
        super().__init__(message)


class TransientError(PatchbayError):
    """Worth another try later; `retry_after_s` is the remote's own hint, if it gave one."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class TerminalError(PatchbayError):
    """Will fail the same way on every try: dead-letter it with the reason."""


@dataclass
class Violation:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RecordInvalid(TerminalError):
    def __init__(self, violations: list[Violation], step: str = "validate") -> None:
        self.violations = violations
        self.step = step
        super().__init__("; ".join(str(v) for v in violations))


class AuthError(PatchbayError):
    """The destination refused our credentials; the destination pauses until resumed."""


@dataclass
class SecretMissing(PatchbayError):
    name: str
    hint: str = field(default="")

    def __str__(self) -> str:
        return f"secret {self.name!r} has no value{': ' + self.hint if self.hint else ''}"


class LeaseLost(PatchbayError):
    """A write made under a lease (a fencing token) that this node no longer holds: another node took it,
    so the write is refused and this node's work under the lease stops."""


class StoreError(PatchbayError):
    """The store itself is in trouble; messages name the file and say what to do."""


class StoreUnusable(StoreError):
    """The store file cannot be used as it is (empty, not a Patchbay store, damaged, from a newer version)."""


class StoreUnavailable(StoreError):
    """Writing to the store fails right now (disk full, I/O error); the same write may succeed later.

    `condition` says what in a few words ("the disk is full"), without the file's path."""

    def __init__(self, message: str, condition: str = "") -> None:
        self.condition = condition or message
        super().__init__(message)

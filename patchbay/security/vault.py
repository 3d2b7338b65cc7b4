"""The vault: credentials encrypted at rest (AES-256-GCM) in the store, under a master key.

The master key comes from $PATCHBAY_MASTER_KEY or `<state_dir>/master.key` (mode 0600) and never
enters the database; each row records the id of the key that encrypted it, so a wrong or missing
key is named rather than guessed at. Rotation is described in `MasterKey.rotate_files`.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import hmac
import os
import re
import secrets as _random
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from patchbay.errors import ConfigError, PatchbayError
from patchbay.store.base import Sealed, SecretRow, SecretRows
from patchbay.store.secrets import SCHEMA, SqliteSecretRows

__all__ = ["SCHEMA", "MasterKey", "SecretInfo", "Vault", "VaultError"]

ENV_VAR = "PATCHBAY_MASTER_KEY"
ENV_VAR_OLD = "PATCHBAY_MASTER_KEY_OLD"  # previous key while rotating a key that lives in the environment
KEY_FILE = "master.key"
OLD_KEY_FILE = "master.key.old"
NEW_KEY_FILE = "master.key.new"
KEY_BYTES = 32
NONCE_BYTES = 12
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")  # the rule SecretRef applies to `secret: NAME`
_URLSAFE = str.maketrans("-_", "+/")
_GENERATE_HINT = "python -c 'import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"


class VaultError(PatchbayError):
    """A secret could not be decrypted; the message names the secret and the key id, never a value."""


class MasterKey:
    """A 32-byte AES-256 key; `id` (first 8 hex digits of its SHA-256) is stored beside each ciphertext."""

    __slots__ = ("_aead", "_key", "id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a master key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self._aead = AESGCM(key)
        self.id = hashlib.sha256(key).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"MasterKey(id={self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random key."""
        return cls(_random.token_bytes(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str, *, source: str = "text") -> MasterKey:
        """Parse URL-safe base64 of 32 bytes (what `to_text` writes); `source` names it in errors."""
        t = text.strip()
        try:
            raw = base64.b64decode(t.translate(_URLSAFE) + "=" * (-len(t) % 4), validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != KEY_BYTES:
            raise ConfigError(
                f"reading master key from {source}: expected {KEY_BYTES} random bytes in URL-safe base64 "
                f"(44 characters); generate one with: {_GENERATE_HINT}"
            )
        return cls(raw)

    def to_text(self) -> str:
        """URL-safe base64, the form of $PATCHBAY_MASTER_KEY and of the key file."""
        return base64.urlsafe_b64encode(self._key).decode()

    @classmethod
    def load(cls, state_dir: Path, env: Mapping[str, str] = os.environ, create: bool = False) -> MasterKey:
        """The current master key: $PATCHBAY_MASTER_KEY if set, else `state_dir/master.key`.

        With `create`, a missing key file is generated (mode 0600). A key file readable or writable
        by group or others is refused.
        """
        if env.get(ENV_VAR):
            return cls.from_text(env[ENV_VAR], source=f"${ENV_VAR}")
        path = Path(state_dir) / KEY_FILE
        if not path.exists() and create:
            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            key = cls.generate()
            try:
                key.write(path)
                return key
            except FileExistsError:
                pass  # another process created it first: use theirs
        if not path.exists():
            raise ConfigError(
                f"no master key: run `patchbay secrets init` (it writes {path} with mode 0600), or set "
                f"${ENV_VAR} to 32 random bytes in URL-safe base64: {_GENERATE_HINT}"
            )
        return cls.read(path)

    @classmethod
    def load_ring(
        cls, state_dir: Path, env: Mapping[str, str] = os.environ, create: bool = False
    ) -> list[MasterKey]:
        """The keys a Vault should get: the current one first, then any still held during a rotation.

        Those are $PATCHBAY_MASTER_KEY_OLD, `master.key.old` and `master.key.new` (present only if a
        rotation stopped half way).
        """
        ring = [cls.load(state_dir, env, create)]
        if env.get(ENV_VAR_OLD):
            ring.append(cls.from_text(env[ENV_VAR_OLD], source=f"${ENV_VAR_OLD}"))
        for name in (OLD_KEY_FILE, NEW_KEY_FILE):
            if (Path(state_dir) / name).exists():
                ring.append(cls.read(Path(state_dir) / name))
        unique: list[MasterKey] = []
        for k in ring:
            if k not in unique:
                unique.append(k)
        return unique

    @classmethod
    def read(cls, path: Path) -> MasterKey:
        """Read a key file, refusing one that group or others may read or write."""
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)  # of the file actually opened, not of whatever the name points to later
            if os.name == "posix" and st.st_mode & 0o077:
                raise ConfigError(
                    f"refusing to read master key {path}: its mode {stat.filemode(st.st_mode)} lets group "
                    f"or others read or write it; run: chmod 600 {path}"
                )
            text = os.read(fd, 4096).decode("ascii", "replace")
        finally:
            os.close(fd)
        return cls.from_text(text, source=str(path))

    def write(self, path: Path) -> None:
        """Write the key to a new file with mode 0600; raises FileExistsError rather than overwrite one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{_random.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, (self.to_text() + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)  # atomic and never replaces: readers see no key or a whole one
        finally:
            tmp.unlink()
        _fsync_dir(path.parent)

    @classmethod
    def rotate_files(
        cls, state_dir: Path, vault: Vault, env: Mapping[str, str] = os.environ
    ) -> tuple[MasterKey, MasterKey]:
        """Replace `master.key` with a new key and re-encrypt the vault under it; returns (old, new).

        Steps, each safe to crash after (run it again to finish):

        1. write the new key to `master.key.new` (an existing one, left by a stopped run, is reused);
        2. `vault.rekey(new)`: every secret re-encrypted under the new key in one transaction
           (`vault` must hold the current key);
        3. copy `master.key` to `master.key.old`, then atomically rename `master.key.new` to `master.key`,
           so `master.key` always exists and holds one whole key.

        Keep `master.key.old` until every process using the vault has restarted (they load it with
        `load_ring`, and one still running may have written a secret under the old key); delete it
        once `Vault.list()` shows no secret under the old key id. A second rotation is refused while
        an older `master.key.old` remains. A key taken from $PATCHBAY_MASTER_KEY is not rotated here:
        set the new one there, the previous one in $PATCHBAY_MASTER_KEY_OLD, and call `Vault.rekey`.
        """
        if env.get(ENV_VAR):
            raise ConfigError(
                f"rotating the master key: it comes from ${ENV_VAR}, not a file; put the new key there, "
                f"the current one in ${ENV_VAR_OLD}, and rekey the vault"
            )
        d = Path(state_dir)
        cur_path, old_path, new_path = d / KEY_FILE, d / OLD_KEY_FILE, d / NEW_KEY_FILE
        if not cur_path.exists():
            raise ConfigError(f"rotating the master key: {cur_path} does not exist")
        old = cls.read(cur_path)
        if old_path.exists():
            previous = cls.read(old_path)
            if previous != old:  # equal only when a stopped run of this rotation wrote it
                raise ConfigError(
                    f"rotating the master key: {old_path} (key {previous.id}) is left from an earlier "
                    f"rotation; delete it once no secret is listed under key {previous.id}, then rotate again"
                )
        if new_path.exists():
            new = cls.read(new_path)
        else:
            new = cls.generate()
            new.write(new_path)
        vault.rekey(new)
        if not old_path.exists():
            old.write(old_path)
        os.replace(new_path, cur_path)
        _fsync_dir(d)
        return old, new

    def _seal(self, name: str, plaintext: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, plaintext, name.encode())

    def _open(self, name: str, nonce: bytes, ciphertext: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext, name.encode())


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What may be shown about a secret: everything but its value."""

    name: str
    created_at: float
    rotated_at: float | None
    version: int
    key_id: str


class Vault:
    """Named secrets, encrypted under `keys[0]`; later keys are still accepted for reading (rotation).

    `rows` keeps the encrypted rows (store/secrets.py: the store's SQLite file); it never sees a
    value or a key.
    """

    def __init__(
        self,
        rows: SecretRows,
        keys: list[MasterKey],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ConfigError("opening the vault: no master key was given")
        self._rows = rows
        self._now = now
        self._use(list(keys))

    @classmethod
    def at(cls, path: Path | str, keys: list[MasterKey], *, busy_timeout_s: float = 10.0) -> Vault:
        """A vault on the SQLite file at `path`."""
        return cls(SqliteSecretRows(path, busy_timeout_s=busy_timeout_s), keys)

    @property
    def keys(self) -> builtins.list[MasterKey]:
        return list(self._keys)

    def ensure_schema(self) -> None:
        self._rows.ensure_schema()

    def set(self, name: str, value: str) -> None:
        """Create or replace; replacing counts as a rotation (version + 1, rotated_at = now)."""
        if not _NAME_RE.match(name):
            raise ValueError(f"bad secret name {name!r}: use 1-100 letters, digits, '_', '-', '.'")
        key = self._keys[0]
        nonce, ciphertext = key._seal(name, value.encode())
        self._rows.put(name, (key.id, nonce, ciphertext), self._now())

    def setdefault(self, name: str, value: str) -> str:
        """The secret's value; `value` is stored first if there is none (one transaction, so when two
        processes race, both get the value of the one that wrote first)."""
        if not _NAME_RE.match(name):
            raise ValueError(f"bad secret name {name!r}: use 1-100 letters, digits, '_', '-', '.'")
        key = self._keys[0]
        nonce, ciphertext = key._seal(name, value.encode())
        row = self._rows.put_if_absent(name, (key.id, nonce, ciphertext), self._now())
        return self._decrypt(name, row.key_id, row.nonce, row.ciphertext).decode()

    def get(self, name: str) -> str | None:
        """The value, or None if there is no such secret; VaultError if it cannot be decrypted."""
        row = self._rows.get(name)
        if row is None:
            return None
        return self._decrypt(name, row.key_id, row.nonce, row.ciphertext).decode()

    def list(self) -> builtins.list[SecretInfo]:
        return [
            SecretInfo(r.name, r.created_at, r.rotated_at, r.version, r.key_id) for r in self._rows.list()
        ]

    def delete(self, name: str) -> bool:
        """Remove a secret; False if there was none."""
        return self._rows.delete(name)

    def rekey(self, new: MasterKey) -> int:
        """Re-encrypt every secret under `new` in one transaction; returns how many.

        Rows already under `new` (a repeated run) are read with it. Afterwards this vault writes
        under `new`; the keys it replaced may be retired once no other process still writes with them.
        """

        def reseal(row: SecretRow) -> Sealed:
            plaintext = self._decrypt(row.name, row.key_id, row.nonce, row.ciphertext, also=new)
            nonce, ciphertext = new._seal(row.name, plaintext)
            return new.id, nonce, ciphertext

        n = self._rows.reseal(reseal)
        self._use([new, *(k for k in self._keys if k != new)])
        return n

    # -- internals ----------------------------------------------------------------------------

    def _use(self, keys: builtins.list[MasterKey]) -> None:
        # Both are replaced whole, so a reader in another thread sees the old ring or the new one.
        by_id: dict[str, MasterKey] = {}
        for k in keys:
            by_id.setdefault(k.id, k)
        self._keys: builtins.list[MasterKey] = keys
        self._by_id = by_id

    def _decrypt(
        self, name: str, key_id: str, nonce: bytes, ciphertext: bytes, also: MasterKey | None = None
    ) -> bytes:
        key = self._by_id.get(key_id) or (also if also is not None and also.id == key_id else None)
        if key is None:
            loaded = ", ".join(self._by_id)
            raise VaultError(
                f"reading secret {name!r}: it is encrypted under master key {key_id}, which is not loaded "
                f"(loaded: {loaded}); restore that key (e.g. as {OLD_KEY_FILE}) or set the secret again"
            )
        try:
            return key._open(name, nonce, ciphertext)
        except InvalidTag:
            raise VaultError(
                f"reading secret {name!r}: decryption with master key {key_id} failed: the row was altered "
                "or copied from another secret"
            ) from None


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The wake across processes on one SQLite file: unix datagram sockets in a folder beside the store.

Several `patchbay serve` processes may share one SQLite file (any number with the `web` role, one with
`worker`, one with `scheduler`: store/sqlite_roles.py). A web process commits an event and its
deliveries, then tells the others, as PostgreSQL's NOTIFY does: each process that listens binds a
datagram socket `<store>.wake/<node>.sock`, and `send` sends the store's wake lines to every socket there
(`n:<flow>`: new deliveries of the flow; `r:<flow>`: states changed too, rescan; an empty flow: every
flow; `b:`/`k:` a destination of the sender behind or caught up: store/common.py), one line each, several
lines a datagram. A process that does not deliver binds `<node>+quiet.sock` and is not sent the `n:` lines.
A socket whose process is gone refuses the datagram and is removed. A lost datagram costs at most the
workers' rescan or look (each half second), never an event.

Socket paths are limited to 107 bytes; a longer one is reached through `/proc/self/fd/<folder fd>/`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import threading
from collections.abc import Collection, Iterable
from pathlib import Path

from patchbay.store.common import Heard, for_deliverers

log = logging.getLogger("patchbay.store")

MAX_DATAGRAM = 8192  # lines beyond this go in the next datagram
QUIET = "+quiet.sock"  # the socket of a process that does not deliver: it is not sent new deliveries' lines
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@-]")


def wake_dir(store: Path) -> Path:
    return Path(str(store) + ".wake")


def socket_name(node_id: str, deliveries: bool = True) -> str:
    """`<node>.sock`, the node id made safe for a file name (and short enough: long ids are hashed);
    `<node>+quiet.sock` for a process that does not deliver (`+` is never in a safe id)."""
    safe = _UNSAFE.sub("_", node_id)
    if len(safe) > 60:
        safe = safe[:40] + "-" + hashlib.sha256(node_id.encode()).hexdigest()[:16]
    return safe + (".sock" if deliveries else QUIET)


def _datagrams(lines: Iterable[str]) -> list[bytes]:
    """`lines`, several a datagram of at most MAX_DATAGRAM bytes."""
    datagrams: list[bytes] = []
    chunk = b""
    for text in lines:
        line = text.encode()
        if chunk and len(chunk) + 1 + len(line) > MAX_DATAGRAM:
            datagrams.append(chunk)
            chunk = b""
        chunk = chunk + b"\n" + line if chunk else line
    if chunk:
        datagrams.append(chunk)
    return datagrams


class Wake:
    """This process's side of the wake: `send` to the others, `listen` for theirs."""

    def __init__(self, store: Path, node_id: str) -> None:
        self.dir = wake_dir(store)
        self.node_id = node_id
        self.name = socket_name(node_id)
        self._dir_fd: int | None = None
        self._send: socket.socket | None = None
        self._recv: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._inode = 0
        self._closed = False
        # The listener's check-and-bind-again and `close`'s removal of the socket file, one at a time: a close
        # between the check and the bind would leave the new file behind.
        self._binding = threading.Lock()

    # -------------------------------------------------------------- paths
    def _folder(self) -> str:
        """The folder as a path short enough for a socket address (`/proc/self/fd/N` when it is long)."""
        if self._dir_fd is None:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        plain = str(self.dir)
        return plain if len(plain) + 70 < 100 else f"/proc/self/fd/{self._dir_fd}"

    def _path(self, name: str) -> str:
        return f"{self._folder()}/{name}"

    # -------------------------------------------------------------- send
    def send(self, lines: Collection[str]) -> None:
        """Send `lines` to every other process's socket, several a datagram; remove dead ones."""
        if self._closed or not lines:
            return
        if self._send is None:
            self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._send.setblocking(False)
        everyone = _datagrams(lines)
        others = [line for line in lines if not for_deliverers(line)]  # for a process that does not deliver
        quiet = everyone if len(others) == len(lines) else _datagrams(others)
        folder = self._folder()
        try:
            names = [e.name for e in os.scandir(self.dir) if e.name.endswith(".sock")]
        except FileNotFoundError:
            return
        for name in names:
            if name == self.name and self._recv is not None:
                continue  # this process's own workers were woken directly
            for data in quiet if name.endswith(QUIET) else everyone:
                try:
                    self._send.sendto(data, f"{folder}/{name}")
                except BlockingIOError:
                    break  # its queue is full: it has plenty to read, and rescans anyway
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                        self._remove_dead(folder, name)
                    else:
                        log.debug("waking %s: %s", name, exc)
                    break

    def _remove_dead(self, folder: str, name: str) -> None:
        """A socket nobody reads (its process died without removing it)."""
        try:
            os.unlink(f"{folder}/{name}")
        except OSError:
            pass

    # -------------------------------------------------------------- listen
    def listen(self, heard: Heard, deliveries: bool = True) -> None:
        """Hand what the other processes send to `heard` (store/common.py), on a thread, until closed."""
        self.name = socket_name(self.node_id, deliveries)
        self._bind()
        self._thread = threading.Thread(
            target=self._listen, args=(heard,), name="patchbay-store-listen", daemon=True
        )
        self._thread.start()

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self._path(self.name)
        try:
            os.unlink(path)  # a socket left by a process of this node id that died (ids are unique: cluster)
        except FileNotFoundError:
            pass
        sock.bind(path)
        sock.settimeout(0.5)
        old, self._recv = self._recv, sock
        self._inode = os.stat(path).st_ino
        if old is not None:
            old.close()

    def _still_bound(self) -> bool:
        """The socket file is still ours: another process may have removed it, taking it for a dead one's
        (it found the socket of this node id's previous process refusing, just before this one bound)."""
        try:
            return os.stat(self._path(self.name)).st_ino == self._inode
        except OSError:
            return False

    def _listen(self, heard: Heard) -> None:
        assert self._recv is not None
        heard.wake("", True)  # what was announced before this socket existed: a rescan of every flow finds it
        while not self._closed and not heard.closed:
            try:
                data = self._recv.recv(65536)
            except TimeoutError:
                with self._binding:
                    rebound = not self._closed and not self._still_bound()
                    if rebound:
                        self._bind()
                if rebound:
                    heard.wake("", True)  # what was sent meanwhile went nowhere
                continue
            except OSError:
                if self._closed:
                    return
                continue
            if self._closed:  # closing (its nudge, or a late announce): nobody is to be woken any more
                return
            for line in dict.fromkeys(data.decode("utf-8", "replace").split("\n")):  # each line once
                heard.line(line)

    # -------------------------------------------------------------- close
    def close(self) -> None:
        with self._binding:
            self._closed = True
            if self._recv is not None:
                path = self._path(self.name)
                if self._thread is not None and self._still_bound():
                    try:  # an empty datagram: the listener's recv returns now, not at its next half-second timeout
                        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as nudge:
                            nudge.setblocking(False)
                            nudge.sendto(b"", path)
                    except OSError:
                        pass  # its timeout ends the wait
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(2.0)
        for s in (self._recv, self._send):
            if s is not None:
                s.close()
        self._recv = self._send = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


__all__ = ["Wake", "socket_name", "wake_dir"]

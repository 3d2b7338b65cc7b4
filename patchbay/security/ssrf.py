"""Outbound address guard: configured URLs may not reach loopback, link-local, private or reserved addresses.

Every new connection is checked on the addresses it is about to connect to (after DNS, redirects
included), so a name that resolves (or re-resolves) to an internal address is refused just like an IP
literal. The HTTP client (connectors/http_wire.py) calls `resolve_allowed` for each connection it
opens and connects to a checked IP; the database, broker and SMTP connectors do the same through
`Resources.allowed_addresses` and hand their driver a checked IP, keeping the name for TLS. Systems
that are internal on purpose opt out with `allow_private_network: true`, or open a few networks with
`allow_networks: [CIDR]`.

    HttpPools             the hub's kept-alive HTTP connections, one pool per address policy (guarded by default)
    AddressPolicy         what is blocked and why; `allowed` networks are exceptions
    parse_host()          the IP a host written as a number stands for (127.1 and 0x7f.1 too): the one
                          reader of host forms, for the guard and for `patchbay check` alike
    resolve_allowed()     resolve a host and keep the addresses the policy allows (then connect by IP)
    connect_first()       try the checked addresses in turn
    open_socket()         a TCP socket connected to one of the checked addresses (for drivers that take one)
    tls_client_context()  a TLS context that checks the configured host name while the socket goes to an IP
    blocked_cause()       the BlockedAddress behind a driver's own wrapping exception
    outbound_warnings()   `patchbay check` warnings: plain http:// to a remote host, verify_tls: false,
                          and hosts (URLs, database, broker and SMTP hosts) the guard will refuse
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from patchbay.errors import PatchbayError, Problem

if TYPE_CHECKING:
    from patchbay.config.project import Project

__all__ = [
    "AddressPolicy",
    "BlockedAddress",
    "HttpPools",
    "ServerNameContext",
    "blocked_cause",
    "blocked_reason",
    "connect_first",
    "open_socket",
    "outbound_warnings",
    "parse_host",
    "resolve_allowed",
    "tls_client_context",
]

T = TypeVar("T")
A = TypeVar("A")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_METADATA = "cloud metadata address"
# Checked in order; the first match names the reason. Anything else that is not globally routable
# (ipaddress's is_global) is blocked too, as a "non-public address".
_BLOCKED: tuple[tuple[IpNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("169.254.169.254/32", _METADATA),  # AWS, GCP, Azure, OpenStack instance metadata
        ("0.0.0.0/8", "unspecified address"),  # Linux connects 0.0.0.0 to the local host
        ("127.0.0.0/8", "loopback address"),
        ("10.0.0.0/8", "private address"),
        ("172.16.0.0/12", "private address"),
        ("192.168.0.0/16", "private address"),
        ("100.64.0.0/10", "shared (CGNAT) address"),
        ("169.254.0.0/16", "link-local address"),
        ("192.0.0.0/24", "reserved address"),
        ("192.0.2.0/24", "reserved (documentation) address"),
        ("198.18.0.0/15", "reserved (benchmarking) address"),
        ("198.51.100.0/24", "reserved (documentation) address"),
        ("203.0.113.0/24", "reserved (documentation) address"),
        ("224.0.0.0/4", "multicast address"),
        ("240.0.0.0/4", "reserved address"),  # includes 255.255.255.255
        ("fd00:ec2::254/128", _METADATA),  # AWS over IPv6 (also in fc00::/7)
        ("::/128", "unspecified address"),
        ("::1/128", "loopback address"),
        ("::/96", "reserved (IPv4-compatible) address"),
        ("fe80::/10", "link-local address"),
        ("fec0::/10", "private (site-local) address"),
        ("fc00::/7", "private (unique local) address"),
        ("ff00::/8", "multicast address"),
        ("100::/64", "reserved (discard) address"),
        ("64:ff9b:1::/48", "local-use NAT64 address"),  # RFC 8215: translated inside this network
        ("2001:db8::/32", "reserved (documentation) address"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix: judged by the IPv4 inside
_6TO4 = ipaddress.ip_network("2002::/16")
_AT_ON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def parse_host(host: str) -> IpAddress | None:
    """The IP address `host` stands for when it is written as one, else None (a name: DNS decides).

    Reads what the system resolver reads as a number, not only what `ipaddress` accepts: besides
    dotted quads and IPv6 (with or without brackets and a %zone), inet_aton's forms, where a part
    is decimal, octal with a leading 0 or hex with 0x, and the last part fills the remaining
    bytes: `127.1`, `0x7f.1`, `0177.0.0.1` and `2130706433` are all 127.0.0.1. The guard and
    `patchbay check` both judge a host through this one reader.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%")[0])
        except ValueError:
            return None
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_AT_ON_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2] in ("0x", "0X") else int(p, 8 if p.startswith("0") else 10) for p in parts]
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


class BlockedAddress(PatchbayError):
    """A connection refused before it was made: the address is not a public one."""

    def __init__(self, address: str, host: str, reason: str) -> None:
        self.address = address
        self.host = host
        self.reason = reason
        super().__init__(self.explain())

    def explain(self, system: str | None = None) -> str:
        """The message, naming the system whose setting would allow it when it is known."""
        where = f"{self.address}" if _same_host(self.address, self.host) else f"{self.address} ({self.host})"
        on = f"on system {system}" if system else "on the system"
        text = (
            f"connecting to {where} is blocked: {self.reason}; "
            f"set allow_private_network: true {on} if it is an internal system"
        )
        addr = parse_host(self.address)
        if addr is None:
            return text
        return text + f", or allow only this address with allow_networks: [{ipaddress.ip_network(addr)}]"


def _same_host(address: str, host: str) -> bool:
    return address == host.strip("[]").split("%")[0] or address == host


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 one stands for, when it is a translation of one."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    return None


def blocked_reason(address: str | IpAddress, allowed: Iterable[IpNetwork] = ()) -> str | None:
    """Why connecting to `address` is refused, or None when it is a public (or explicitly allowed) address."""
    addr = parse_host(address) if isinstance(address, str) else address
    if addr is None:
        return "not an IP address"
    allowed = tuple(allowed)
    suffix = ""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None and not any(addr in net for net in allowed):
            why = blocked_reason(inner[0], allowed)
            if why is not None:
                return f"{why} ({inner[1]})"
            if inner[1] == "IPv4-mapped":
                addr, suffix = inner[0], ""
    if any(addr in net for net in allowed):
        return None
    for net, why in _BLOCKED:
        if addr.version == net.version and addr in net:
            return why + suffix
    if not addr.is_global:
        return "non-public address"
    return None


class AddressPolicy:
    """Blocks every non-public address except those in `allowed` (a system's `allow_networks`)."""

    __slots__ = ("allowed",)

    def __init__(self, allowed: Iterable[str | IpNetwork] = ()) -> None:
        self.allowed: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in allowed
        )

    def reason(self, address: str) -> str | None:
        return blocked_reason(address, self.allowed)


def _refuse_literal(host: str, policy: AddressPolicy) -> None:
    """BlockedAddress for a host written as a refused IP, in any form, judged before any lookup.
    The addresses a lookup returns are checked again after it (the resolver has the last word)."""
    addr = parse_host(host)
    if addr is not None:
        why = policy.reason(str(addr))
        if why is not None:
            raise BlockedAddress(str(addr), host, why)


async def resolve_allowed(
    host: str, port: int, *, allow_private: bool = False, allow_networks: Iterable[str] = ()
) -> list[str]:
    """The addresses of `host` a system may connect to, or BlockedAddress (the HTTP client, databases,
    brokers, SMTP). Connect to one of these addresses, not to the name again, so
    the address checked is the address connected to (pass the name on for TLS server_hostname)."""
    if not allow_private:
        _refuse_literal(host, AddressPolicy(allow_networks))
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"resolving {host}: {exc.strerror or exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if allow_private:
        return addresses
    policy = AddressPolicy(allow_networks)
    allowed = [a for a in addresses if policy.reason(a) is None]
    if not allowed:
        first = addresses[0] if addresses else host
        raise BlockedAddress(first, host, policy.reason(first) or "no address")
    return allowed


async def connect_first(
    addresses: Sequence[A],
    connect: Callable[[A], Awaitable[T]],
    *,
    next_on: Callable[[BaseException], bool] = lambda exc: isinstance(exc, OSError),
) -> T:
    """`connect(address)` for each checked address in turn until one connects: a name with an IPv6 and
    an IPv4 address still works when the server listens on one of them. `next_on(exc)` says whether
    a failure is the address's (refused, unreachable: try the next one) rather than the server's answer
    (a refused login: raise it at once). The last failure is raised when no address connects."""
    if not addresses:
        raise OSError("no address to connect to")
    for i, address in enumerate(addresses):
        try:
            return await connect(address)
        except Exception as exc:
            if i == len(addresses) - 1 or not next_on(exc):
                raise
    raise AssertionError("unreachable")


async def open_socket(addresses: Sequence[str], port: int, timeout_s: float | None) -> socket.socket:
    """A non-blocking TCP socket connected to the first of `addresses` (checked IPs) that answers, for
    drivers that take a connected socket; `timeout_s` bounds each attempt."""

    async def attempt(address: str) -> socket.socket:
        info = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout_s):
                await asyncio.get_running_loop().sock_connect(sock, info[4])
        except BaseException:
            sock.close()
            raise
        return sock

    return await connect_first(addresses, attempt)


class ServerNameContext(ssl.SSLContext):
    """A client TLS context that always sends and verifies `server_name` (the configured host name).

    For drivers that offer no way to connect to one address and check the certificate against another
    name (paho-mqtt, aiomysql, nats over websockets): they are given the checked IP to connect to, and
    pass that IP on as `server_hostname` when they wrap the socket; this context puts the configured
    name back, so SNI and certificate checks work as if the driver had connected by name.
    """

    server_name: str | None = None

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            self.server_name or server_hostname,
            session,
        )

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name or server_hostname, session)


def tls_client_context(cafile: str | None = None, server_name: str | None = None) -> ssl.SSLContext:
    """What ssl.create_default_context(cafile=...) returns (certificate and host name checked), as a
    ServerNameContext that verifies `server_name` whatever address the driver connected to."""
    ctx = ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    default = ssl.create_default_context()
    ctx.options = default.options
    ctx.verify_flags = default.verify_flags
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.server_name = server_name.strip("[]") if server_name else None
    return ctx


def blocked_cause(exc: BaseException | None) -> BlockedAddress | None:
    """The BlockedAddress `exc` is, or wraps (drivers re-raise what their connect raised as their own,
    `raise DriverError(exc) from exc`); only explicit causes count, not whatever was being handled."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, BlockedAddress):
            return exc
        exc = exc.__cause__
        seen += 1
    return None


class Pool(Protocol):
    """A pool of connections HttpPools keeps for another client (HttpPools.pool)."""

    closed: bool

    def close(self) -> None: ...


P = TypeVar("P", bound=Pool)


class HttpPools:
    """The hub's outbound HTTP connection pools, one per address policy, created on first use.

    Guarded (the default) and unguarded (systems with allow_private_network) never share a
    connection pool, so a keep-alive connection opened for an internal system is never reused
    for a guarded one.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[Any, ...], Pool] = {}
        self.closed = False

    @staticmethod
    def _key(allow_private: bool, allow_networks: Iterable[str]) -> tuple[Any, ...]:
        nets = tuple(sorted({str(ipaddress.ip_network(n, strict=False)) for n in allow_networks}))
        return ("open",) if allow_private else ("guarded", nets)

    def pool(
        self, allow_private: bool, allow_networks: Iterable[str], make: Callable[[bool, tuple[str, ...]], P]
    ) -> P:
        """A client's connections for this address policy (`make(allow_private, networks)`, e.g.
        connectors/http_wire.py's WirePool), one per policy and kind, closed with the others."""
        key = (make, *self._key(allow_private, allow_networks))
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            pool = self._pools[key] = make(allow_private, () if allow_private else key[2])
            self.closed = False
        return cast(P, pool)

    async def close(self) -> None:
        self.closed = True
        pools, self._pools = list(self._pools.values()), {}
        for p in pools:
            p.close()


# ------------------------------------------------------------------------------ check warnings
_LOCAL_NAMES = ("localhost",)


def _is_local(host: str) -> bool:
    name = host.lower().rstrip(".")
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return True
    addr = parse_host(host)
    return addr is not None and addr.is_loopback


def _guard_reason(host: str, nets: Iterable[str]) -> str | None:
    """What the guard will say about a configured host, when that can be told without DNS."""
    addr = parse_host(host)
    if addr is None:
        return "loopback address" if _is_local(host) else None
    return AddressPolicy(nets).reason(str(addr))


def _other_hosts(cfg: Any) -> list[tuple[str, str]]:
    """(setting, host) of the network hosts a database, broker or SMTP system connects to."""
    out: list[tuple[str, str]] = []
    host = getattr(cfg, "host", None)
    if isinstance(host, str) and host and not host.startswith("/"):  # a path: a Unix socket
        out.append(("host", host))
    url = getattr(cfg, "url", None)
    if isinstance(url, str) and urlsplit(url).scheme in ("redis", "rediss"):
        out.append(("url", urlsplit(url).hostname or ""))
    servers = getattr(cfg, "servers", None)
    if isinstance(servers, list):
        out.extend(("servers", urlsplit(u).hostname or "") for u in servers if isinstance(u, str))
    return [(key, h) for key, h in out if h]


def outbound_warnings(project: Project) -> list[Problem]:
    """What `patchbay check` warns about without failing: unencrypted or unverified outbound HTTP,
    and URLs and hosts the address guard will refuse."""
    out: list[Problem] = []
    for name in sorted(project.systems):
        system = project.systems[name]
        cfg = system.config
        if cfg is None:
            continue
        common = system.common
        nets = getattr(common, "allow_networks", None) or ()
        url = getattr(cfg, "url", None)
        if isinstance(url, str) and url and "{{" not in url:
            parts = urlsplit(url)
            host = parts.hostname or ""
            if parts.scheme == "http" and host and not _is_local(host):
                out.append(
                    Problem(
                        system.file,
                        system.line_of("url"),
                        f"system {name!r}: plain http:// to {host} sends data and credentials "
                        "unencrypted; use https://",
                    )
                )
            if parts.scheme in ("http", "https") and not common.allow_private_network:
                why = _guard_reason(host, nets)
                if why is not None:
                    out.append(
                        Problem(
                            system.file,
                            system.line_of("url"),
                            f"system {name!r}: {host} is a {why}, so deliveries will be refused; "
                            "set allow_private_network: true if it is an internal system",
                        )
                    )
        if not common.allow_private_network:
            for key, host in _other_hosts(cfg):
                why = _guard_reason(host, nets)
                if why is not None:
                    out.append(
                        Problem(
                            system.file,
                            system.line_of(key),
                            f"system {name!r}: {host} is a {why}, so connections to it will be refused; "
                            "set allow_private_network: true (or allow_networks) if it is an internal system",
                        )
                    )
        if getattr(cfg, "verify_tls", True) is False:
            out.append(
                Problem(
                    system.file,
                    system.line_of("verify_tls"),
                    f"system {name!r}: verify_tls: false accepts any certificate, so anyone on the "
                    "path can read and change the traffic; trust its CA with ca_bundle instead",
                )
            )
    return out

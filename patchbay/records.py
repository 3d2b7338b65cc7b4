"""Records and the dotted-path helpers every step uses; event ids."""

from __future__ import annotations

import os
import random
import time
from typing import Any

_MISSING: Any = object()
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> two characters
_rng = random.Random(os.urandom(32))
_rng_pid = os.getpid()


def new_id(prefix: str = "evt") -> str:
    """A sortable unique id: 48 bits of milliseconds then 80 random bits (ULID layout, 26 characters).

    Ids identify, they do not authorise: the random part comes from a generator seeded once per process
    from the OS (one `getrandom` call per id cost more than the rest of the webhook path's bookkeeping).
    """
    global _rng, _rng_pid
    if os.getpid() != _rng_pid:  # a forked child must not repeat its parent's sequence
        _rng, _rng_pid = random.Random(os.urandom(32)), os.getpid()
    n = (int(time.time() * 1000) << 80) | _rng.getrandbits(80)
    pairs = _PAIRS
    out = [_B32[n & 31]]  # 130 bits: the lowest 5, then 10 at a time
    n >>= 5
    for _ in range(12):
        out.append(pairs[n & 1023])
        n >>= 10
    out.append(_B32[n & 31])
    return f"{prefix}_{''.join(reversed(out))}"


def dig(data: Any, path: str, default: Any = None) -> Any:
    """Value at a dotted path (`properties.email`, `items.0.sku`), or `default`."""
    if path in ("", "@"):
        return data
    cur = data
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
        elif isinstance(cur, list) and part.lstrip("-").isdigit():
            i = int(part)
            cur = cur[i] if -len(cur) <= i < len(cur) else _MISSING
        else:
            return default
        if cur is _MISSING:
            return default
    return cur


def has_path(data: Any, path: str) -> bool:
    return dig(data, path, _MISSING) is not _MISSING


def put(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a value at a dotted path, creating the objects on the way (nesting)."""
    parts = path.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[parts[-1]] = value


def delete(data: dict[str, Any], path: str) -> None:
    parts = path.split(".")
    cur: Any = data
    for part in parts[:-1]:
        cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None:
            return
    if isinstance(cur, dict):
        cur.pop(parts[-1], None)


def flatten(data: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists are kept as values."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key, sep))
            else:
                out[key] = v
    elif prefix:
        out[prefix] = data
    return out


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, counting stops once past `limit`."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > depth:
                depth = d
                if depth > limit:
                    return depth
            children = v.values() if isinstance(v, dict) else v
            stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return depth

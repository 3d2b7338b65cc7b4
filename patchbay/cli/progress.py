"""A progress line for long work: rows, rate and ETA, redrawn in place on a terminal, a line every few seconds elsewhere."""

from __future__ import annotations

import sys
import time
from typing import IO

from patchbay.engine.batch import Progress


def _eta(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
        if s >= 60
        else f"{s}s"
    )


def render(p: Progress, width: int = 24) -> str:
    """`[#######.......]  31%  310,000 / 1,000,000 rows  82,000 rows/s  ETA 8s` (no bar without a total)."""
    rate = f"{p.rate:,.0f} rows/s"
    if p.total:
        share = min(1.0, p.read / p.total)
        bar = "#" * int(share * width) + "." * (width - int(share * width))
        eta = p.eta_s
        return f"[{bar}] {share:4.0%}  {p.read:,} / {p.total:,} rows  {rate}" + (
            f"  ETA {_eta(eta)}" if eta is not None else ""
        )
    return f"{p.read:,} rows  {rate}  {p.elapsed_s:.0f}s"


class ProgressLine:
    """Callable given to a run: draws at most 10 times a second on a terminal, every `every_s` elsewhere."""

    def __init__(self, out: IO[str] | None = None, *, every_s: float = 5.0) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.every_s = every_s if not self.tty else 0.1
        self._last = float("-inf")
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        line = render(p)
        if self.tty:
            self.out.write("\r\033[K" + line)
            self._drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self._drawn:
            self.out.write("\r\033[K")
            self.out.flush()
            self._drawn = False

#!/usr/bin/env python3
"""Top functions from a py-spy `--format raw` profile (collapsed stacks): self and inclusive share.

hotspots.py profile.txt [--top 15]
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    self_n: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(a.profile):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        if frames[0].startswith(("thread ", "process ")):
            threads[frames[0]] += count
            frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += count
        self_n[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    print(f"{total} samples (busy only)")
    for name, n in threads.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nself time:")
    for name, n in self_n.most_common(a.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive (patchbay, aiohttp, sqlite frames):")
    shown = 0
    for name, n in incl.most_common():
        if any(k in name for k in ("patchbay", "aiohttp", "sqlite", "orjson", "pydantic", "jmespath")):
            print(f"  {100 * n / total:5.1f}%  {name}")
            shown += 1
            if shown >= a.top:
                break


if __name__ == "__main__":
    main()

"""The progress line of long runs: bar, rate and ETA with a total; rows and rate without; throttled."""

from __future__ import annotations

import io

from patchbay.cli.progress import ProgressLine, render
from patchbay.engine.batch import Progress


def test_render_with_and_without_a_total():
    p = Progress(read=310_000, total=1_000_000, written=300_000, elapsed_s=4.0)
    assert render(p, width=10) == "[###.......]  31%  310,000 / 1,000,000 rows  77,500 rows/s  ETA 8s"
    assert (
        render(Progress(read=5_000, total=None, written=5_000, elapsed_s=2.0))
        == "5,000 rows  2,500 rows/s  2s"
    )


def test_a_pipe_gets_whole_lines_at_most_every_few_seconds():
    out = io.StringIO()
    line = ProgressLine(out, every_s=3600)
    line(Progress(1, 10, 1, 1.0))
    line(Progress(2, 10, 2, 1.0))  # within the interval: not drawn
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()

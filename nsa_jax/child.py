"""A child command whose progress bar shows on this terminal.

`run` starts the command with its stderr piped: a tqdm redraw (`is_progress`) is drawn again
on this process's stderr, every other line (and the child's stdout) goes to a log file; it
measures the child's wall time, CPU time and peak memory (its own, from `wait4`). The demo's
training runs use it (`nsa_jax.demo.run_training`, `experiments/budget_split.py`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any


def is_progress(line: str) -> bool:
    """Whether a line of output is a tqdm bar's redraw (`50%|...| 3/6 [..., 2.1s/step]`)."""
    return "%|" in line or any(rate in line for rate in ("it/s", "step/s", "s/step"))


def lines(stream: io.TextIOBase) -> Iterator[str]:
    """Lines of a stream split at both `\\n` and `\\r` (tqdm redraws with `\\r`)."""
    buf = ""
    while True:
        ch = stream.read(1)
        if not ch:
            if buf:
                yield buf
            return
        buf += ch
        if ch in "\r\n":
            yield buf
            buf = ""


def tail(path: str, n: int = 20) -> str:
    """The last `n` lines of the file `path`."""
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def run(cmd: Sequence[str], log_path: str) -> dict[str, Any]:
    """Runs `cmd` to its end; returns its exit `status` (as `subprocess` gives it: -N for a
    signal), `wall_s`, `cpu_s` and `peak_rss_bytes`."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        for line in lines(proc.stderr):
            if is_progress(line):
                sys.stderr.write("\r" + line.rstrip("\r\n"))
                sys.stderr.flush()
            else:
                log.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
    sys.stderr.write("\n")
    return {
        "status": os.waitstatus_to_exitcode(status),
        "wall_s": time.perf_counter() - t0,
        # CPU time says what a quiet machine would take where other jobs share this one
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
    }  # Linux reports KiB

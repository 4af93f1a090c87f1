"""Stopping a run on SIGTERM or SIGINT at a step boundary, with a checkpoint, on every host.

A scheduler preempting a job sends SIGTERM (Kubernetes, SLURM, Cloud TPU maintenance, a spot
VM's shutdown); a person stops a run with Ctrl-C (SIGINT). While `StopSignals` is entered, the
first of either only raises a flag: the step in flight finishes, the loop agrees with every
host that one of them was signalled (`signalled_on_any_host`, one all-gather a step), all save
the same step, and the run ends with `Preempted`; the command prints one line and exits with
`exit_status(signum)` (128 + the signal's number, as a shell reports a process the signal
ended: 143 for SIGTERM, 130 for SIGINT). The same command resumes from that step exactly.
A second signal restores the previous handlers and delivers itself again: Ctrl-C twice
interrupts at once (the last periodic checkpoint stays the latest).

Why not JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`, which
orbax's `CheckpointManager.reached_preemption` and MaxText use): it exists only under
`jax.distributed` and listens for SIGTERM alone; the flag here covers one process and SIGINT
too, and the hosts agree through the all-gather the loop makes each step anyway.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from nsa_jax.train import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal `signum` (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + signum


class Preempted(Exception):  # noqa: N818 - an outcome, not an error
    """The run saved step `step` in `directory` and stopped on signal `signum`."""

    def __init__(self, signum: int, step: int, directory: str) -> None:
        self.signum, self.step, self.directory = signum, step, directory
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}, saved in "
            f"{directory}/{step}; the same command resumes from there"
        )


class StopSignals:
    """Context manager: SIGTERM and SIGINT set `signum` instead of ending the process.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python (JAX's preemption notifier under
            # jax.distributed), which Python cannot reinstall: the default then
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum


def signalled_on_any_host(stops: StopSignals) -> int:
    """The signal some host received (the largest number if several did), or 0: the same on
    every host, which then all stop after the same step."""
    return max(distributed.every_host(stops.signum))

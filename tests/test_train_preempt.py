"""`nsa_jax.train.preempt` in this process: the first SIGTERM or SIGINT only raises the flag,
a second one acts as if no handler were there, and the handlers are put back on exit (the
command end to end: `test_train_resume.py`)."""

from __future__ import annotations

import os
import signal

import pytest

from nsa_jax.train.preempt import (
    Preempted,
    StopSignals,
    exit_status,
    signalled_on_any_host,
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_raises_the_flag_and_a_second_acts_at_once(signum) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen = []
    # stands for the default action of a second SIGTERM (ending pytest): the handler that
    # StopSignals found is the one the second signal reaches
    signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with StopSignals() as stops:
            assert stops.signum == 0 and signalled_on_any_host(stops) == 0
            os.kill(os.getpid(), signum)
            assert stops.signum == signum and signalled_on_any_host(stops) == signum
            if signum == signal.SIGINT:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signum)
            else:
                os.kill(os.getpid(), signum)
                assert seen == [signal.SIGTERM]
            assert stops.signum == signum  # the first signal's
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])


def test_the_handlers_are_put_back_without_a_signal() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals():
        assert all(signal.getsignal(s) is not h for s, h in before.items())
    assert {s: signal.getsignal(s) for s in before} == before


def test_exit_status_and_the_line() -> None:
    assert (exit_status(signal.SIGTERM), exit_status(signal.SIGINT)) == (143, 130)
    assert str(Preempted(signal.SIGTERM, 7, "/runs/a/checkpoints")) == (
        "stopped by SIGTERM after step 7, saved in /runs/a/checkpoints/7; the same command "
        "resumes from there"
    )

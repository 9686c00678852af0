"""Ctrl-C: the first one stops at the next step with a checkpoint, a second one stops at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from transferkit.runtime import stop_on_signals


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode


def test_a_second_ctrl_c_soon_after_the_first_stops_at_once():
    with stop_on_signals() as stop:
        _deliver(signal.SIGINT)
        assert stop.requested  # the first one asks the loop to finish its step and save
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)  # well within 2 s: a person pressing it again means it


def test_under_torchrun_the_same_stop_delivered_twice_is_one_stop():
    # A terminal's Ctrl-C reaches a torchrun worker from the terminal and again from torchrun.
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN in a background job
    with stop_on_signals(repeat_window=2.0) as stop:
        _deliver(signal.SIGINT)
        _deliver(signal.SIGTERM)
        assert stop.requested
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the handlers are put back

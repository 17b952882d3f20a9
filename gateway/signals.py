"""Signals a stopping process takes quietly.

A part of ``gateway serve`` stops at its first SIGTERM or SIGINT. More may follow while it stops: a Ctrl-C on a
foreground gateway reaches every process of its group and the supervisor's SIGTERM comes after it, and signals sent
to the whole group reach every part. Those must neither kill the part half-way nor print a traceback.
"""
from __future__ import annotations

import atexit
import signal
from typing import Any

__all__ = ["ignore_later_signals"]

_ignored_at_exit = False


def _nothing(signum: int, frame: Any) -> None:
    """A signal that comes while the process stops: nothing to do."""


def ignore_later_signals(*signums: int) -> None:
    """Take these signals quietly from now on, while the process stops (from a signal handler, in the main thread).

    A handler that does nothing, not ``SIG_IGN``: a signal that arrived with the one being handled (a Ctrl-C's
    SIGINT and the supervisor's SIGTERM) would find ``SIG_IGN`` in place and raise "Signal 15 ignored due to race
    condition" where the process stands. At exit they become ``SIG_IGN`` (the interpreter puts the default action,
    which ends the process, back in place of a Python handler as it shuts down).
    """
    global _ignored_at_exit
    for signum in signums:
        signal.signal(signum, _nothing)
    if not _ignored_at_exit:
        _ignored_at_exit = True
        atexit.register(_ignore_at_exit)


def _ignore_at_exit() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        for _ in range(3):
            try:
                if signal.getsignal(signum) is _nothing:
                    signal.signal(signum, signal.SIG_IGN)
                break
            except OSError:
                # "Signal 15 ignored due to race condition": a signal that came while the one before was set to
                # SIG_IGN, found pending with SIG_IGN in place when the next is set. Ignoring it is what was meant.
                continue

"""Child processes of a worker that end when the worker does, however it ends.

A worker killed by SIGKILL, the OOM killer or a crash runs no clean-up, so
its children (the handler process, RQ's scheduler) must notice by themselves:
on Linux the kernel signals them (``PR_SET_PDEATHSIG``); everywhere, they see
their parent's pid change (:func:`orphaned`) when they next look.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux; elsewhere nothing).

    The signal goes when the parent *thread* that forked this process ends: fork
    from the worker's main thread. Call :func:`orphaned` right after, in case the
    parent died before this call.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # an unusual libc: the pid check of orphaned() still ends the child


def orphaned(parent_pid: int) -> bool:
    """True once the process that forked this one (``parent_pid``) is gone: this one was re-parented."""
    return os.getppid() != parent_pid

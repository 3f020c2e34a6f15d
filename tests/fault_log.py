"""One line per handler run in the file ``FAULT_LOG`` (not Redis): what the crash and batch tests read back."""

from __future__ import annotations

import os

from signal_queue import current_event


def log(what: str, *extra: object) -> None:
    """Append ``what``, the event's id and attempt, this process's pid and ``extra``, in one write."""
    line = " ".join(map(str, (what, current_event.id, current_event.attempt, os.getpid(), *extra)))
    fd = os.open(os.environ["FAULT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)

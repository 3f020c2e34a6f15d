"""Counts that outlive the process: events spooled, lost and dropped on this host, in a small file by the spool.

Why a file of its own, and not a table in the spool or a Redis hash: these
counts matter exactly when Redis is down (so they cannot go there first), and
when the spool cannot be written (disk full) or is corrupt (so they cannot live
in it). The file has a fixed size, written once when it is made; an update
overwrites bytes already on disk, which a full disk still allows. Every process
of the host updates it under an fcntl lock, so its counts add up across
processes and survive each of them. When Redis answers again they are added
into the shared ``sq:stats`` hash (see :meth:`Dispatcher.publish_counts`),
once: the file remembers how much of each count Redis already has.

The file also carries the spool's cross-process locks, as fcntl byte ranges
past its end (:data:`IDENTITY`, :data:`REPLAY`): the spool file itself cannot
carry them, because closing any descriptor of a file drops every fcntl lock the
process holds on it, SQLite's included.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

logger = logging.getLogger("signal_queue")

_MAGIC = b"SQLEDG01"
#: What the file counts, in this order after the magic and the file's id.
FIELDS = (
    "spooled",  # events written to the spool, by every process of the host
    "lost",  # events neither sent nor spooled, or gone with a corrupt spool
    "dropped",  # events dropped from a full outbox (SIGNAL_QUEUE_MAX_PENDING)
    "spool_events",  # events in the spool now, as the writes and deletes add up
    "published_spooled",  # how much of each count Redis's sq:stats already has
    "published_lost",
    "published_dropped",
)
#: The counts that are totals (spool_events is a level, not a total).
TOTALS = ("spooled", "lost", "dropped")
_FORMAT = struct.Struct("<8s16s" + "q" * len(FIELDS))
SIZE = 4096  # one page: written once at creation, overwritten in place afterwards

#: Lock byte: held shared by each spool operation, exclusively while a corrupt spool is moved aside.
IDENTITY = SIZE * 2
#: Lock byte: held while the counts are read and written back.
COUNTS = IDENTITY + 1
#: Lock byte: held by the one process of the host that replays the spool.
REPLAY = IDENTITY + 2


class Ledger:
    """The count file ``path``: one object per path in a process (see :func:`ledger_at`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._id = ""
        self._open_lock = threading.Lock()
        self._new_mutexes()
        self._error_logged = False

    # -- the file ---------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return self._fd is not None or os.path.exists(self.path)

    def _descriptor(self, create: bool) -> int | None:
        """The open file, made if ``create``; None if it does not exist (or cannot be made: logged once)."""
        if self._fd is not None:
            return self._fd
        with self._open_lock:
            if self._fd is not None:
                return self._fd
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    fd = self._create()
                except OSError as exc:
                    if not self._error_logged:
                        self._error_logged = True
                        logger.error(
                            "signal_queue: cannot make the count file %s (%s: %s); counts of spooled and lost "
                            "events are kept in this process only", self.path, type(exc).__name__, exc,
                        )
                    return None
            except OSError as exc:
                if not self._error_logged:
                    self._error_logged = True
                    logger.error("signal_queue: cannot open the count file %s (%s: %s)", self.path,
                                 type(exc).__name__, exc)
                return None
            # Closed when the ledger is collected, not at exit: the spool's last words need it then.
            weakref.finalize(self, os.close, fd).atexit = False
            self._fd = fd
            self._check()
            return fd

    def _create(self) -> int:
        """Make the file whole under a temporary name, then link it in: no process sees half a file."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, _fresh())
            os.fsync(fd)
            with suppress(FileExistsError):  # another process made it first: use that one
                os.link(temporary, self.path)
        finally:
            os.close(fd)
            os.unlink(temporary)
        return os.open(self.path, os.O_RDWR)

    def _check(self) -> None:
        """A file that is not a count file is kept aside (copied) and started again, in place."""
        assert self._fd is not None
        with self._counts_locked():
            data = os.pread(self._fd, SIZE, 0)
            if len(data) >= _FORMAT.size and data.startswith(_MAGIC):
                self._id = data[8:24].decode("ascii", "replace")
                return
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            try:
                with open(aside, "wb") as copy:
                    copy.write(data)
            except OSError:
                aside = "(could not be copied)"
            fresh = _fresh()
            os.pwrite(self._fd, fresh, 0)
            self._id = fresh[8:24].decode()
        logger.error(
            "signal_queue: the count file %s was not readable; its old content is in %s, and counting starts "
            "again from 0", self.path, aside,
        )

    @property
    def id(self) -> str:
        """The file's random id: Redis remembers per id how much of its counts it has."""
        return self._id

    # -- locks --------------------------------------------------------------------------------

    @contextmanager
    def _counts_locked(self) -> Iterator[None]:
        assert self._fd is not None
        with self._counts_mutex:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, COUNTS)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, COUNTS)

    @contextmanager
    def identity(self, create: bool = True) -> Iterator[None]:
        """Held (shared) around each spool operation, so no process moves the spool aside meanwhile."""
        fd = self._descriptor(create)
        if fd is None:
            yield  # without a count file there is no lock: one process's view is all there is
            return
        with self._identity_mutex:
            fcntl.lockf(fd, fcntl.LOCK_SH, 1, IDENTITY)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, IDENTITY)

    @contextmanager
    def exclusive_identity(self) -> Iterator[None]:
        """Inside :meth:`identity`: every other process's spool operation has ended, none starts."""
        fd = self._descriptor(True)
        if fd is None:
            yield
            return
        with self._identity_mutex:
            # Let go of the shared lock first: two processes upgrading at once would deadlock.
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, IDENTITY)
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX, 1, IDENTITY)
                    break
                except OSError as exc:
                    if exc.errno != errno.EDEADLK:
                        raise
                    time.sleep(0.01)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_SH, 1, IDENTITY)  # back to what the caller holds

    @contextmanager
    def replaying(self) -> Iterator[bool]:
        """True if this process may replay now: one replayer per host, so rows that cannot be
        claimed (a full disk) are never sent by two processes at once."""
        fd = self._descriptor(True)
        if fd is None:
            yield True
            return
        if not self._replay_mutex.acquire(blocking=False):
            yield False
            return
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, REPLAY)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                yield False
                return
            try:
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, REPLAY)
        finally:
            self._replay_mutex.release()

    # -- counts -------------------------------------------------------------------------------

    def read(self) -> dict[str, int]:
        """The counts (all 0 when there is no file yet)."""
        fd = self._descriptor(False)
        if fd is None:
            return dict.fromkeys(FIELDS, 0)
        try:
            with self._counts_locked():
                return _counts(os.pread(fd, _FORMAT.size, 0))
        except OSError as exc:
            if not self._error_logged:
                self._error_logged = True
                logger.error("signal_queue: cannot read the count file %s (%s: %s)", self.path,
                             type(exc).__name__, exc)
            return dict.fromkeys(FIELDS, 0)

    def add(self, **deltas: int) -> bool:
        """Add to counts (a negative delta subtracts); False if they could not be written (logged once).

        Never raises: it is called where events are lost, on request threads too.
        """
        fd = self._descriptor(True)
        if fd is None:
            return False
        try:
            with self._counts_locked():
                counts = _counts(os.pread(fd, _FORMAT.size, 0))
                for name, delta in deltas.items():
                    counts[name] = max(0, counts[name] + delta)
                self._write(fd, counts)
        except OSError as exc:
            if not self._error_logged:
                self._error_logged = True
                logger.error("signal_queue: cannot write the count file %s (%s: %s)", self.path,
                             type(exc).__name__, exc)
            return False
        return True

    def mark_published(self, totals: dict[str, int]) -> None:
        """Note that Redis's ``sq:stats`` now holds ``totals`` (a later, larger mark is kept)."""
        fd = self._descriptor(False)
        if fd is None:
            return
        with self._counts_locked():
            counts = _counts(os.pread(fd, _FORMAT.size, 0))
            for name in TOTALS:
                counts[f"published_{name}"] = max(counts[f"published_{name}"], totals.get(name, 0))
            self._write(fd, counts)

    def unpublished(self) -> dict[str, int]:
        """How much of each total Redis does not have yet."""
        counts = self.read()
        return {name: max(0, counts[name] - counts[f"published_{name}"]) for name in TOTALS}

    def _write(self, fd: int, counts: dict[str, int]) -> None:
        os.pwrite(fd, _FORMAT.pack(_MAGIC, self._id.encode("ascii"), *(counts[f] for f in FIELDS)), 0)

    def _new_mutexes(self) -> None:
        # fcntl locks belong to the process: these keep two threads of it from sharing one by accident.
        self._identity_mutex = threading.RLock()
        self._counts_mutex = threading.Lock()
        self._replay_mutex = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child: the parent's threads are gone, and so must their locks be."""
        self._open_lock = threading.Lock()
        self._new_mutexes()


def _fresh() -> bytes:
    return _FORMAT.pack(_MAGIC, secrets.token_hex(8).encode(), *([0] * len(FIELDS))).ljust(SIZE, b"\0")


def _counts(data: bytes) -> dict[str, int]:
    if len(data) < _FORMAT.size or not data.startswith(_MAGIC):
        return dict.fromkeys(FIELDS, 0)
    return dict(zip(FIELDS, _FORMAT.unpack(data[: _FORMAT.size])[2:], strict=True))


_ledgers: weakref.WeakValueDictionary[str, Ledger] = weakref.WeakValueDictionary()
_ledgers_lock = threading.Lock()


def ledger_at(path: str) -> Ledger:
    """The process's one :class:`Ledger` for ``path``: fcntl locks belong to the process, so two
    objects on one file would release each other's locks."""
    key = os.path.abspath(path)
    with _ledgers_lock:
        ledger = _ledgers.get(key)
        if ledger is None:
            ledger = _ledgers[key] = Ledger(path)
        return ledger


def _after_fork_in_child() -> None:
    global _ledgers_lock
    _ledgers_lock = threading.Lock()
    for ledger in list(_ledgers.values()):
        ledger.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

"""The outage spool: batches that could not reach Redis, kept on the app's disk until they can.

SQLite in WAL mode with ``synchronous=FULL``: each write is one transaction,
fsync'd before it returns, so a spooled batch survives the process and the
machine (short of the disk itself). SQLite's locking lets every thread and
every process of a gunicorn app write the same file at once, and lets one
replayer claim rows so two never send the same row at the same time. The file
is opened only when something must be spooled or replayed: while Redis
answers, emits cost no disk I/O.

A row is a prepared RQ batch job (its job id, queue, arguments and options),
so a replay enqueues exactly the job that failed to go out, under the same id.

A spool that SQLite finds corrupt (or that is not SQLite at all) is moved
aside for inspection, whatever rows can still be read from it go into a fresh
spool, and the events it held beyond those are counted as lost (the count file,
:mod:`.ledger`, knows how many it held). One process does it, once, with the
other processes' spool operations held off (:meth:`Ledger.exclusive_identity`);
each of them notices the new file before its next operation.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from ..wire.rq_jobs import json_bytes
from .ledger import Ledger, ledger_at

logger = logging.getLogger("signal_queue")
T = TypeVar("T")

#: Seconds after which a row claimed by a replayer that died is claimable again.
CLAIM_TIMEOUT = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    job TEXT NOT NULL,
    events INTEGER NOT NULL,
    created REAL NOT NULL,
    claimed_by TEXT,
    claimed_at REAL
)
"""


def sqlite_cause(exc: BaseException) -> str:
    """SQLite's name for an error (``SQLITE_FULL``), else the exception's type: what a log line is keyed by."""
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name:
        return str(name)
    text = str(exc)
    for fragment, name in (
        ("malformed", "SQLITE_CORRUPT"), ("not a database", "SQLITE_NOTADB"), ("disk is full", "SQLITE_FULL"),
        ("readonly", "SQLITE_READONLY"), ("disk I/O error", "SQLITE_IOERR"), ("locked", "SQLITE_BUSY"),
    ):
        if fragment in text:
            return name
    return type(exc).__name__


def is_corrupt(exc: BaseException) -> bool:
    """The file is not a SQLite database, or its pages do not add up: no retry will read it."""
    return isinstance(exc, sqlite3.DatabaseError) and sqlite_cause(exc).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def is_write_failure(exc: BaseException) -> bool:
    """The spool cannot be written (disk full, read-only, I/O error) though it may still be read."""
    return sqlite_cause(exc).startswith(("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR")) or isinstance(
        exc, OSError
    )


@dataclass(frozen=True)
class SpooledBatch:
    """One prepared batch job: what :meth:`Dispatcher.send` would have enqueued."""

    job_id: str
    queue: str
    args: bytes  # the JSON text of the job's arguments (its events and their requests' snapshots)
    job: dict[str, Any]  # timeout, result_ttl, failure_ttl, description
    events: int
    row: int | None = None

    def stored(self) -> str:
        """The row's ``job`` column: the job as one JSON object, its ``args`` among its keys."""
        rest = json.dumps(self.job)
        return '{"args": ' + self.args.decode("utf-8") + (", " + rest[1:] if rest != "{}" else "}")

    @classmethod
    def from_row(cls, job_id: str, queue: str, stored: str, events: int, row: int | None = None) -> SpooledBatch:
        """The batch a row holds (rows written by earlier versions read the same)."""
        job = json.loads(stored)
        return cls(job_id, queue, json_bytes(job.pop("args")), job, events, row=row)


class Spool:
    """A SQLite file of batches waiting for Redis; safe across threads and processes."""

    def __init__(self, path: str, ledger: Ledger | None = None) -> None:
        self.path = path
        #: Counts of this host's spooled, lost and dropped events, next to the spool.
        self.ledger = ledger or ledger_at(path + ".counts")
        #: Told how many events a corrupt spool took with it (and why), so they are counted as lost.
        self.on_lost: Callable[[int, str], None] | None = None
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the file _conn has open
        self._pid = os.getpid()
        self._owner = f"{os.getpid()}-{id(self)}"
        _spools.add(self)

    # -- the connection --------------------------------------------------------------------------

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _connection(self) -> sqlite3.Connection:
        """The open connection, reopened if the file at ``path`` is no longer the one it has open."""
        current = self._identity()
        if self._conn is not None and (current != self._file or self._pid != os.getpid()):
            # Another process moved a corrupt spool aside. Never close a connection to a moved
            # file: SQLite deletes the write-ahead log by name, which is the new spool's now.
            _abandoned.append(self._conn)
            self._conn = None
        if self._conn is None:
            self._pid = os.getpid()
            self._owner = f"{os.getpid()}-{id(self)}"
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._conn, self._file = conn, self._identity()
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(_SCHEMA)
            except sqlite3.Error as exc:
                if not is_corrupt(exc):  # a corrupt file's connection is _replace_corrupt's to abandon
                    self._conn = None
                    conn.close()  # half set up: the next operation opens it again
                raise
        return self._conn

    def _run(self, operation: Callable[[sqlite3.Connection], T], *, again: bool = True) -> T:
        """Run ``operation`` on the spool; a corrupt spool is replaced first, then tried once more.

        The shared identity lock is held throughout, so the count file's level
        of spooled events changes with the file it describes.
        """
        with self._lock, self.ledger.identity():
            try:
                return operation(self._connection())
            except sqlite3.DatabaseError as exc:
                if not is_corrupt(exc):
                    raise
                self._replace_corrupt(exc)
                if not again:
                    raise
            return operation(self._connection())

    @staticmethod
    @contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on an error, the error itself, not a failed ROLLBACK's.

        SQLite rolls some failed transactions back itself (``database or disk is
        full``); a ROLLBACK then would raise ``cannot rollback - no transaction is
        active`` and hide the cause.
        """
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):  # the error being raised is the one that matters
                    db.execute("ROLLBACK")
            raise

    # -- operations --------------------------------------------------------------------------------

    def put(self, batches: Sequence[SpooledBatch]) -> None:
        """Write ``batches`` in one fsync'd transaction; raise ``sqlite3.Error``/``OSError`` if it cannot."""
        rows = [(b.job_id, b.queue, b.stored(), b.events, time.time()) for b in batches]

        events = sum(b.events for b in batches)

        def insert(db: sqlite3.Connection) -> None:
            with self._transaction(db):
                db.executemany(
                    "INSERT OR IGNORE INTO batches (job_id, queue, job, events, created) VALUES (?, ?, ?, ?, ?)", rows
                )
            self.ledger.add(spooled=events, spool_events=events)

        self._run(insert)

    def claim(self, limit: int) -> list[SpooledBatch]:
        """Take up to ``limit`` rows for replay (oldest first); others cannot take them meanwhile."""
        now = time.time()

        def take(db: sqlite3.Connection) -> list[Any]:
            with self._transaction(db):
                rows = db.execute(
                    "SELECT id, job_id, queue, job, events FROM batches "
                    "WHERE claimed_by IS NULL OR claimed_at < ? ORDER BY id LIMIT ?",
                    (now - CLAIM_TIMEOUT, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE batches SET claimed_by = ?, claimed_at = ? WHERE id = ?",
                    [(self._owner, now, row[0]) for row in rows],
                )
            return rows

        return [SpooledBatch.from_row(r[1], r[2], r[3], r[4], row=r[0]) for r in self._run(take)]

    def read(self, after: int, limit: int) -> list[SpooledBatch]:
        """Up to ``limit`` rows past row ``after``, claimed or not, without writing anything.

        For a replay when the spool cannot be written (a full disk): the rows
        stay, and the sent-markers in Redis keep them from being sent twice.
        """

        def select(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                "SELECT id, job_id, queue, job, events FROM batches WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()

        return [SpooledBatch.from_row(r[1], r[2], r[3], r[4], row=r[0]) for r in self._run(select)]

    def delete(self, batches: Sequence[SpooledBatch]) -> None:
        """Remove replayed rows."""

        def remove(db: sqlite3.Connection) -> None:
            events = 0
            with self._transaction(db):
                for b in batches:
                    # By id and job id: a row read back into a fresh spool has a new id.
                    if db.execute("DELETE FROM batches WHERE id = ? AND job_id = ?", (b.row, b.job_id)).rowcount:
                        events += b.events
            if events:
                self.ledger.add(spool_events=-events)

        try:
            self._run(remove, again=False)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            # the rows went with the corrupt file, which is counted already

    def release(self, batches: Sequence[SpooledBatch]) -> None:
        """Give claimed rows back (the replay failed; Redis went away again)."""

        def unclaim(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE batches SET claimed_by = NULL WHERE id = ? AND job_id = ?", [(b.row, b.job_id) for b in batches]
            )

        try:
            self._run(unclaim, again=False)
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise

    def depth(self) -> tuple[int, int]:
        """(batches, events) waiting; (0, 0) when the file does not exist."""
        if not os.path.exists(self.path):
            return 0, 0

        def count(db: sqlite3.Connection) -> tuple[int, int]:
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(events), 0) FROM batches").fetchone()
            return int(row[0]), int(row[1])

        return self._run(count)

    def purge(self) -> None:
        """Delete every batch (an operator's decision, after a confirmation)."""
        if not os.path.exists(self.path):
            return

        def empty(db: sqlite3.Connection) -> None:
            with self._transaction(db):
                events = int(db.execute("SELECT COALESCE(SUM(events), 0) FROM batches").fetchone()[0])
                db.execute("DELETE FROM batches")
            self.ledger.add(spool_events=-events)

        self._run(empty)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                if self._identity() == self._file:
                    self._conn.close()
                else:
                    _abandoned.append(self._conn)  # moved aside: see _connection
                self._conn = None

    # -- a corrupt spool -------------------------------------------------------------------------

    def _replace_corrupt(self, error: sqlite3.DatabaseError) -> None:
        """Move the corrupt file aside, keep what can be read of it, count the rest as lost.

        Called with this process's spool lock and shared identity lock held; takes
        the identity lock exclusively, so exactly one process moves a given file.
        """
        bad = self._file
        if self._conn is not None:
            _abandoned.append(self._conn)  # closing it could checkpoint into, or delete, what we keep
            self._conn = None
        with self.ledger.exclusive_identity():
            if bad is None or self._identity() != bad:
                return  # another process moved it already; the next operation opens the new file
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            os.rename(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with suppress(FileNotFoundError):
                    os.rename(self.path + suffix, aside + suffix)
            rows = _salvage(aside)
            kept = 0
            if rows:
                try:
                    db = self._connection()
                    with self._transaction(db):
                        db.executemany(
                            "INSERT OR IGNORE INTO batches (job_id, queue, job, events, created) "
                            "VALUES (?, ?, ?, ?, ?)", rows,
                        )
                    kept = sum(int(r[3]) for r in rows)
                except (sqlite3.Error, OSError) as exc:
                    logger.error("signal_queue: cannot write the rows read back from %s into a fresh spool: %s",
                                 aside, exc)
            held = self.ledger.read()["spool_events"]
            lost = max(0, held - kept)
            self.ledger.add(lost=lost, spool_events=kept - held)
        reason = f"{sqlite_cause(error)}: {error}"
        logger.error(
            "signal_queue: the spool %s cannot be read (%s); it is moved aside to %s (kept for inspection) and a "
            "fresh spool is used; %d event(s) read back from it; %d more it held (by the count file %s) are LOST",
            self.path, reason, aside, kept, lost, self.ledger.path,
        )
        if lost and self.on_lost is not None:
            self.on_lost(lost, f"went with the corrupt spool {aside} ({reason})")

    def after_fork(self) -> None:
        """In a forked child: a lock the parent's sender held would never be released here."""
        self._lock = threading.Lock()
        if self._conn is not None:
            # SQLite forbids using a connection across fork(); closing it counts as using it.
            _abandoned.append(self._conn)
            self._conn = None
        self._pid = os.getpid()
        self._owner = f"{os.getpid()}-{id(self)}"


def _salvage(path: str) -> list[tuple[Any, ...]]:
    """The rows of a corrupt spool that can still be read, read-only, until the first unreadable page."""
    rows: list[tuple[Any, ...]] = []
    try:
        db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return rows
    try:
        for row in db.execute("SELECT job_id, queue, job, events, created FROM batches ORDER BY id"):
            json.loads(row[2])
            rows.append(tuple(row))
    except (sqlite3.Error, ValueError):
        pass  # what was read so far is kept
    finally:
        db.close()  # read-only: it neither checkpoints nor deletes the log it read
    return rows


#: Connections that must never be closed (see Spool._connection); kept so they are not collected.
_abandoned: list[sqlite3.Connection] = []
_spools: weakref.WeakSet[Spool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for spool in list(_spools):
        spool.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

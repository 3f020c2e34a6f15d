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
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class SpooledBatch:
    """One prepared batch job: what :meth:`Dispatcher.send` would have enqueued."""

    job_id: str
    queue: str
    job: dict[str, Any]  # func, args, timeout, result_ttl, failure_ttl, description
    events: int
    row: int | None = None


class Spool:
    """A SQLite file of batches waiting for Redis; safe across threads and processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._owner = f"{os.getpid()}-{id(self)}"

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._owner = f"{os.getpid()}-{id(self)}"
                directory = os.path.dirname(self.path)
                if directory:
                    os.makedirs(directory, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(_SCHEMA)
                self._conn = conn
            yield self._conn

    def put(self, batches: Sequence[SpooledBatch]) -> None:
        """Write ``batches`` in one fsync'd transaction; raise ``sqlite3.Error``/``OSError`` if it cannot."""
        rows = [(b.job_id, b.queue, json.dumps(b.job), b.events, time.time()) for b in batches]
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT OR IGNORE INTO batches (job_id, queue, job, events, created) VALUES (?, ?, ?, ?, ?)", rows
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def claim(self, limit: int) -> list[SpooledBatch]:
        """Take up to ``limit`` rows for replay (oldest first); others cannot take them meanwhile."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "SELECT id, job_id, queue, job, events FROM batches "
                    "WHERE claimed_by IS NULL OR claimed_at < ? ORDER BY id LIMIT ?",
                    (now - CLAIM_TIMEOUT, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE batches SET claimed_by = ?, claimed_at = ? WHERE id = ?",
                    [(self._owner, now, row[0]) for row in rows],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [SpooledBatch(r[1], r[2], json.loads(r[3]), r[4], row=r[0]) for r in rows]

    def delete(self, batches: Sequence[SpooledBatch]) -> None:
        """Remove replayed rows."""
        with self._db() as db:
            db.executemany("DELETE FROM batches WHERE id = ?", [(b.row,) for b in batches])

    def release(self, batches: Sequence[SpooledBatch]) -> None:
        """Give claimed rows back (the replay failed; Redis went away again)."""
        with self._db() as db:
            db.executemany("UPDATE batches SET claimed_by = NULL WHERE id = ?", [(b.row,) for b in batches])

    def depth(self) -> tuple[int, int]:
        """(batches, events) waiting; (0, 0) when the file does not exist."""
        if not os.path.exists(self.path):
            return 0, 0
        with self._db() as db:
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(events), 0) FROM batches").fetchone()
        return int(row[0]), int(row[1])

    def purge(self) -> None:
        """Delete every batch (an operator's decision, after a confirmation)."""
        if os.path.exists(self.path):
            with self._db() as db:
                db.execute("DELETE FROM batches")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

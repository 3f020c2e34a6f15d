"""Redis refusing the worker for a while (full, read-only, loading, busy) or coming back empty. Real faults.

Each test runs a real worker process against a private redis-server and makes
the fault happen for real: ``CONFIG SET maxmemory`` with ``noeviction``, a
replica made with ``REPLICAOF``, a restart that reloads a dataset, a Lua script
that keeps Redis busy, an ACL change, a SIGKILL and a restart without
persistence. The handlers write what they ran to a file (tests/fault_app.py),
so counts survive Redis: events lost, run twice, time to recover.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from rq import Worker
from rq.registry import StartedJobRegistry

from devtools.redis_process import RedisProcess
from tests.conftest import drain
from tests.conftest import wait_until as wait_for
from tests.test_faults import fault_env, handled, start_worker, stop

#: The line a worker writes when Redis takes writes again after it waited in its loop.
RECOVERED = "takes writes again"


def worker_log(log: Path) -> str:
    path = Path(str(log) + ".worker")
    return path.read_text(errors="replace") if path.exists() else ""


def lines_with(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def sq_lines(text: str) -> str:
    """signal_queue's own lines, without the one per event: what to show when an assertion fails."""
    return "\n".join(line for line in text.splitlines() if "signal_queue" in line and "signal_queue.events" not in line)


def error_count(conn: redis.Redis, code: str) -> int:
    """How many replies Redis has answered with error ``code`` (INFO errorstats): the worker's tries."""
    entry = conn.info("errorstats").get(f"errorstat_{code}")
    if isinstance(entry, str):  # redis-py 5 leaves "count=4,..." unparsed
        entry = dict(item.split("=", 1) for item in entry.split(","))
    return int(entry["count"]) if isinstance(entry, dict) else 0


def once_each(rows: list[list[str]], expected: set[str]) -> tuple[int, int]:
    """(events lost, events run twice) among ``expected`` (the ``n`` of each event)."""
    by_n = collections.Counter(r[0] for r in rows)
    return len(expected - set(by_n)), sum(c - 1 for n, c in by_n.items() if n in expected and c > 1)


@pytest.fixture
def client() -> Iterator[Callable[..., redis.Redis]]:
    """Redis clients for a test, closed at its end (an unclosed socket is a ResourceWarning, an error here)."""
    made: list[redis.Redis] = []

    def make(url: str, **options: object) -> redis.Redis:
        made.append(redis.Redis.from_url(url, **options))
        return made[-1]

    yield make
    for conn in made:
        conn.close()


class Recorded(logging.Handler):
    """Keeps the records it is given (the app's log lines, in this process)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def idle(conn: redis.Redis) -> bool:
    """True if Redis shows one worker, idle, and no job started (the last job's success recorded)."""
    workers = Worker.all(connection=conn)
    return (len(workers) == 1 and workers[0].get_state() == "idle"
            and StartedJobRegistry("signals", connection=conn).count == 0)


def listed(conn: redis.Redis) -> bool:
    """True if ``rq info`` would list a worker (RQ's ``Worker.all``); False while Redis is away."""
    try:
        return bool(Worker.all(connection=conn))
    except redis.ConnectionError:
        return False


def emit_backlog(app: Flask, numbers: range) -> None:
    """One event per number (``fault`` signal, k=0), all in Redis when this returns."""
    from tests.fault_app import fault

    with app.test_request_context("/emit/0"):
        for n in numbers:
            fault.send("loop", n=n, k=0)
    drain(app)


def test_worker_waits_while_redis_is_full_and_resumes_by_itself(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis]
) -> None:
    """maxmemory with noeviction under a backlog: the worker never exits, logs OOM once, resumes when it is lifted."""
    server = RedisProcess()
    server.start()
    conn = client(server.url)
    log = tmp_path / "handled.log"
    total = 12_000
    emit_backlog(app_on(server.url), range(total))
    worker = start_worker(fault_env(server.url, log, tmp_path / "worker.sqlite3"))
    try:
        wait_for("the worker to be under way", lambda: len(handled(log)) >= 3000, 60, worker)
        conn.config_set("maxmemory-policy", "noeviction")
        conn.config_set("maxmemory", max(1, int(conn.info("memory")["used_memory"]) // 2))
        # The worker waits where Redis refused it: saving a job's done marks, or its own loop.
        wait_for("the worker to wait on a full Redis", lambda: bool(lines_with(worker_log(log), "(OOM)")), 60, worker)
        refused = error_count(conn, "OOM")
        # Redis stays full while it refuses four more writes (the worker's backoff: a few seconds).
        wait_for("the worker to retry on a full Redis", lambda: error_count(conn, "OOM") >= refused + 4, 60, worker)
        at_fill = len(handled(log))
        conn.config_set("maxmemory", 0)  # memory freed: the limit is lifted
        freed = time.monotonic()
        resumed = wait_for("the first event after memory was freed", lambda: len(handled(log)) > at_fill, 30, worker)
        wait_for("every event", lambda: len(handled(log)) >= total, 120, worker)
        drained = time.monotonic() - freed
        text = worker_log(log)
        lost, twice = once_each(handled(log), {str(n) for n in range(total)})
        print(f"\nOOM: {total} events, {at_fill} handled when freed, lost {lost}, run twice {twice}, "
              f"resumed {resumed:.1f}s and drained {drained:.1f}s after memory was freed; "
              f"worker {'alive' if worker.poll() is None else 'exited'}; OOM lines {len(lines_with(text, '(OOM)'))}")
        assert worker.poll() is None, "the worker never exited"
        assert (lost, twice) == (0, 0)
        # One line per cause where the worker waits (done marks, job heartbeat, its loop), not one per try.
        assert 1 <= len(lines_with(text, "(OOM)")) <= 3, sq_lines(text)
        assert "answers again" not in text and "unhandled exception" not in text, sq_lines(text)
        assert resumed < 10
    finally:
        stop(worker)
        server.kill()


def test_worker_on_a_read_only_replica_waits_until_it_is_promoted(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis]
) -> None:
    """A worker pointed at a replica logs READONLY once, waits, and drains the backlog once REPLICAOF NO ONE."""
    primary, replica = RedisProcess(), RedisProcess()
    primary.start()
    replica.start()
    log = tmp_path / "handled.log"
    total = 2000
    emit_backlog(app_on(primary.url), range(total))
    on_primary = client(primary.url)
    on_replica = client(replica.url)
    on_replica.replicaof("127.0.0.1", primary.port)
    wait_for("the replica to hold the backlog", lambda: on_replica.info("replication")["master_link_status"] == "up"
             and on_replica.dbsize() == on_primary.dbsize(), 30)
    worker = start_worker(fault_env(replica.url, log, tmp_path / "worker.sqlite3"))
    try:
        wait_for("the READONLY line", lambda: bool(lines_with(worker_log(log), "(READONLY)")), 30, worker)
        refused = error_count(on_replica, "READONLY")
        wait_for("the worker to retry on the replica", lambda: error_count(on_replica, "READONLY") >= refused + 3, 60,
                 worker)
        assert handled(log) == [] and worker.poll() is None
        on_replica.replicaof("NO", "ONE")
        promoted = time.monotonic()
        resumed = wait_for("the first event after the promotion", lambda: len(handled(log)) > 0, 30, worker)
        wait_for("every event", lambda: len(handled(log)) >= total, 60, worker)
        drained = time.monotonic() - promoted
        text = worker_log(log)
        lost, twice = once_each(handled(log), {str(n) for n in range(total)})
        print(f"\nREADONLY: {total} events, lost {lost}, run twice {twice}, resumed {resumed:.1f}s and drained "
              f"{drained:.1f}s after REPLICAOF NO ONE; READONLY lines {len(lines_with(text, '(READONLY)'))}")
        assert worker.poll() is None
        assert (lost, twice) == (0, 0)
        assert len(lines_with(text, "(READONLY)")) == 1, sq_lines(text)
        assert len(lines_with(text, RECOVERED)) == 1, sq_lines(text)
        assert resumed < 10
    finally:
        stop(worker)
        replica.kill()
        primary.kill()


def test_worker_waits_while_restarted_redis_loads_its_data(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis]
) -> None:
    """Persistent Redis SIGKILLed under a backlog, restarted with a dataset that takes seconds to load:
    the worker logs LOADING once, waits, and handles every event exactly once."""
    # An fsync'd AOF whose base is an RDB of 60,000 filler keys, each read back 50 us slower than
    # usual: the load a large dataset takes, on a small one. LOADING is Redis's own reply meanwhile.
    server = RedisProcess(persistent=True, args=("--key-load-delay", "50",
                                                 "--loading-process-events-interval-bytes", "1024"))
    server.start()
    conn = client(server.url)
    for first in range(0, 60_000, 10_000):
        conn.mset({f"filler:{i}": "x" for i in range(first, first + 10_000)})
    conn.bgrewriteaof()
    wait_for("the AOF rewrite", lambda: not conn.info("persistence")["aof_rewrite_in_progress"]
             and not conn.info("persistence")["aof_rewrite_scheduled"], 30)
    log = tmp_path / "handled.log"
    total = 10_000
    emit_backlog(app_on(server.url), range(total))
    worker = start_worker(fault_env(server.url, log, tmp_path / "worker.sqlite3"))
    try:
        wait_for("the worker to be under way", lambda: len(handled(log)) >= 2000, 60, worker)
        server.kill()
        server.start(until_loaded=False)
        restarted = time.monotonic()
        probe = client(server.url, retry=None)
        loaded = wait_for("the dataset to load", lambda: _writable(probe), 60, worker)
        wait_for("every event", lambda: len(handled(log)) >= total, 120, worker)
        drained = time.monotonic() - restarted
        text = worker_log(log)
        lost, twice = once_each(handled(log), {str(n) for n in range(total)})
        print(f"\nLOADING: {total} events, lost {lost}, run twice {twice}; loading took {loaded:.1f}s, all handled "
              f"{drained:.1f}s after the restart; LOADING lines {len(lines_with(text, '(LOADING)'))}")
        assert worker.poll() is None
        assert (lost, twice) == (0, 0)
        assert loaded > 5, "the load lasted longer than redis-py's own retries"
        # One line per cause where the worker waits (done marks, job heartbeat, its loop), not one per try.
        assert 1 <= len(lines_with(text, "(LOADING)")) <= 3, sq_lines(text)
        assert "answers again" not in text and "unhandled exception" not in text, sq_lines(text)
    finally:
        stop(worker)
        server.kill()


def _writable(conn: redis.Redis) -> bool:
    try:
        conn.set("sq:test:probe", 1, px=1000)
        return True
    except redis.BusyLoadingError:
        return False


def test_worker_waits_while_a_script_keeps_redis_busy(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis]
) -> None:
    """A Lua script past busy-reply-threshold: the worker logs BUSY once and resumes after SCRIPT KILL."""
    server = RedisProcess()
    server.start()
    conn = client(server.url)
    conn.config_set("busy-reply-threshold", 100)
    log = tmp_path / "handled.log"
    total = 12_000
    emit_backlog(app_on(server.url), range(total))
    worker = start_worker(fault_env(server.url, log, tmp_path / "worker.sqlite3"))
    script = threading.Thread(target=_spin, args=(server.url,), daemon=True)
    try:
        wait_for("the worker to be under way", lambda: len(handled(log)) >= 3000, 60, worker)
        script.start()
        wait_for("the BUSY line", lambda: bool(lines_with(worker_log(log), "(BUSY)")), 30, worker)
        client(server.url, retry=None).script_kill()
        killed = time.monotonic()
        script.join(10)
        wait_for("every event", lambda: len(handled(log)) >= total, 120, worker)
        drained = time.monotonic() - killed
        text = worker_log(log)
        lost, twice = once_each(handled(log), {str(n) for n in range(total)})
        print(f"\nBUSY: {total} events, lost {lost}, run twice {twice}, all handled {drained:.1f}s after SCRIPT KILL; "
              f"BUSY lines {len(lines_with(text, '(BUSY)'))}")
        assert worker.poll() is None
        assert (lost, twice) == (0, 0)
        # One line per cause where the worker waits (done marks, job heartbeat, its loop), not one per try.
        assert 1 <= len(lines_with(text, "(BUSY)")) <= 3, sq_lines(text)
    finally:
        stop(worker)
        server.kill()


def _spin(url: str) -> None:
    """Keep Redis busy in a Lua loop until SCRIPT KILL ends it."""
    # "Script killed by user with SCRIPT KILL"; or the server went away (the test failed)
    with contextlib.suppress(redis.ResponseError, redis.ConnectionError), redis.Redis.from_url(url, retry=None) as conn:
        conn.eval("while true do end", 0)


def test_worker_denied_by_an_acl_exits_2_at_once(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis]
) -> None:
    """An ACL change that denies the worker's commands mid-run is not waited out: exit 2, one line naming NOPERM."""
    server = RedisProcess()
    server.start()
    conn = client(server.url)
    conn.acl_setuser("worker", enabled=True, passwords=["+s3cret-pw"], keys=["*"], channels=["*"], commands=["+@all"])
    url = f"redis://worker:s3cret-pw@127.0.0.1:{server.port}/0"
    log = tmp_path / "handled.log"
    worker = start_worker(fault_env(url, log, tmp_path / "worker.sqlite3"))
    try:
        wait_for("the worker to register", lambda: listed(conn), 30, worker)
        conn.acl_setuser("worker", enabled=True, passwords=["+s3cret-pw"], keys=["*"], channels=["*"],
                         commands=["+@all", "-hset", "-blpop", "-blmove", "-lmove", "-lpop"], reset=True)
        denied = time.monotonic()
        status = worker.wait(timeout=60)
        exited = time.monotonic() - denied
        text = worker_log(log)
        print(f"\nNOPERM: the worker exited {status} {exited:.1f}s after the ACL denied it")
        assert status == 2, sq_lines(text)
        assert exited < 15
        assert len(lines_with(text, "refused the worker: an ACL denies a command or key it needs (NOPERM)")) == 1, (
            sq_lines(text))
        assert "s3cret-pw" not in text and "worker:***@" in text
    finally:
        stop(worker)
        server.kill()


@pytest.mark.parametrize("down", [0, 7], ids=["restarted-at-once", "down-7s"])
def test_redis_restarted_empty_is_reported_and_the_worker_registers_again(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis], down: float
) -> None:
    """Redis without persistence SIGKILLed and restarted under a backlog: worker and app each log one WARNING
    naming the restart, the worker is listed again (rq info), and events emitted after it are all handled.

    Restarted at once, redis-py reconnects by itself and nothing fails (the worker's heartbeat finds it
    unlisted); down for 7 s, past redis-py's retries, the worker's loop ends and it waits for Redis."""
    server = RedisProcess()
    server.start()
    conn = client(server.url)
    log = tmp_path / "handled.log"
    handler = Recorded(logging.WARNING)
    records = handler.records
    logging.getLogger("signal_queue").addHandler(handler)
    app = app_on(server.url)
    before, after = 10_000, 500
    emit_backlog(app, range(before))
    worker = start_worker(fault_env(server.url, log, tmp_path / "worker.sqlite3"))
    try:
        wait_for("the worker to be under way", lambda: len(handled(log)) >= 2000 and listed(conn), 60, worker)
        server.kill()
        if down:
            killed = time.monotonic()
            wait_for(f"Redis to stay down {down} s", lambda: time.monotonic() - killed >= down, down + 1, worker)
        server.start()
        at_restart = len(handled(log))
        registered = wait_for("the worker to register again", lambda: listed(conn), 30, worker)
        warned = wait_for("the worker's WARNING",
                          lambda: bool(lines_with(worker_log(log), "restarted without its data")), 30, worker)
        emit_backlog(app, range(before, before + after))
        wait_for("the events emitted after the restart",
                 lambda: {r[0] for r in handled(log)} >= {str(n) for n in range(before, before + after)}, 60, worker)
        text = worker_log(log)
        rows = handled(log)
        lost, twice = once_each(rows, {str(n) for n in range(before)})
        lost_after, twice_after = once_each(rows, {str(n) for n in range(before, before + after)})
        app_warnings = [r.getMessage() for r in records if "restarted without its data" in r.getMessage()]
        print(f"\nrestart empty (down {down} s): backlog {before}, {at_restart} handled at the restart, "
              f"lost {lost} (vanished with Redis), run twice {twice}; worker registered again {registered:.1f}s "
              f"and warned {warned:.1f}s after the restart; {after} emitted after: lost {lost_after}, "
              f"run twice {twice_after}; app warnings {len(app_warnings)}")
        worker_warnings = lines_with(text, "WARNING", "restarted without its data")
        assert len(worker_warnings) == 1, sq_lines(text)
        assert "run id " in worker_warnings[0] and "appendonly" in worker_warnings[0]
        assert "may have been lost" in worker_warnings[0]
        assert len(app_warnings) == 1, app_warnings
        assert "run id " in app_warnings[0] and "appendonly" in app_warnings[0]
        assert at_restart < before, "a backlog was waiting at the restart"
        assert registered < 15
        assert (lost_after, twice_after) == (0, 0) and twice == 0
        assert worker.poll() is None
    finally:
        logging.getLogger("signal_queue").removeHandler(handler)
        stop(worker)
        server.kill()


def test_idle_worker_waits_for_redis_with_one_line_and_registers_again(
    tmp_path: Path, app_on: Callable[[str], Flask], client: Callable[..., redis.Redis]
) -> None:
    """An idle worker whose Redis is down 7 s (past redis-py's own retries) and back empty: one line while it
    waits, one when Redis takes writes, one WARNING naming the restart; it is listed again and runs new events."""
    server = RedisProcess()
    server.start()
    conn = client(server.url)
    log = tmp_path / "handled.log"
    app = app_on(server.url)
    worker = start_worker(fault_env(server.url, log, tmp_path / "worker.sqlite3"))
    try:
        emit_backlog(app, range(10))
        # Idle as Redis sees it: its handlers logged the events before the worker recorded the job's success.
        wait_for("the worker to be idle", lambda: len(handled(log)) == 10 and idle(conn), 60, worker)
        server.kill()
        killed = time.monotonic()
        wait_for("Redis to stay down 7 s", lambda: time.monotonic() - killed >= 7, 8, worker)
        server.start()
        registered = wait_for("the worker to register again", lambda: listed(conn), 30, worker)
        emit_backlog(app, range(10, 20))
        wait_for("the events emitted after the restart", lambda: len(handled(log)) == 20, 30, worker)
        text = worker_log(log)
        print(f"\nidle, down 7 s: registered again {registered:.1f}s after the restart; "
              f"lines while down {len(lines_with(text, 'cannot be reached'))}, "
              f"RQ's per-try lines {len(lines_with(text, 'could not connect'))}")
        assert registered < 10
        assert len(lines_with(text, "WARNING", "restarted without its data")) == 1, sq_lines(text)
        assert len(lines_with(text, "cannot be reached")) == 1, sq_lines(text)
        assert len(lines_with(text, "could not connect")) <= 1, sq_lines(text)
        assert len(lines_with(text, RECOVERED, "starting a new worker")) == 1, sq_lines(text)
        assert sorted(int(r[0]) for r in handled(log)) == list(range(20))
    finally:
        stop(worker)
        server.kill()

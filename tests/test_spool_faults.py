"""The app and its spool under real faults: a garbage spool, one corrupted under load, a full disk, forks.

Real processes throughout: gunicorn serving tests/fault_app.py, ``python worker.py``,
``flask signal-queue`` commands, a private redis-server that is down when the test
says so. Each test prints its figures (events lost, run twice, time to recover).
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.redis_process import RedisProcess, free_port
from signal_queue.producer.ledger import Ledger
from tests.conftest import ROOT, wait_until
from tests.test_faults import FAULT_APP, fault_env, handled, start_worker, stop

K = 3  # events per request in tests/fault_app.py


class Gunicorn:
    """tests/fault_app.py under gunicorn (gthread): ``workers`` processes x 4 threads, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, *extra: str, workers: int = 2) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
                 "--threads", "4", "--worker-class", "gthread", "--log-level", "warning", *extra, FAULT_APP],
                cwd=ROOT, env=env, stdout=out, stderr=out,
            )
        self.sent = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.children: set[int] = set()

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def up(self) -> bool:
        try:
            return self.get("/stats", timeout=2)[0] == 200
        except OSError:
            return False

    def load(self, seconds: float, most: int = 100_000) -> None:
        """Requests one after another for ``seconds``; each emits K events."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.sent < most:
            self.statuses[self.get(f"/emit/{self.sent}")[0]] += 1
            self.sent += 1

    def stats(self, processes: int, timeout: float = 20) -> dict[int, dict[str, Any]]:
        """The counters of each worker process, asked until ``processes`` different ones answered."""
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < processes and time.monotonic() < deadline:
            body = json.loads(self.get("/stats")[1])
            seen[body["pid"]] = body
        self.children |= set(seen)
        return seen

    def stop(self, *others: subprocess.Popen[bytes]) -> None:
        """Stop gunicorn (and ``others``); a worker process that hangs is killed, not left behind."""
        stop(self.process, *others)
        for pid in self.children:
            with contextlib.suppress(OSError):
                if f"127.0.0.1:{self.port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def flask_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", FAULT_APP, "signal-queue", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def spool_while_down(env: dict[str, str], first: int, requests: int) -> None:
    """A process whose Redis is down serves ``requests`` requests and exits: its events stay in the spool."""
    down = dict(env, SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    script = (
        "from tests.fault_app import create_app\n"
        "client = create_app().test_client()\n"
        f"for n in range({first}, {first + requests}):\n"
        "    assert client.get(f'/emit/{n}').status_code == 200\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=down, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def overwrite_in_place(path: Path) -> bytes:
    """Garbage over every byte of the file, as a bad disk or a stray write would leave it (same inode)."""
    garbage = os.urandom(max(path.stat().st_size, 8192))
    with open(path, "r+b") as f:
        f.write(garbage)
    return garbage


def handled_keys(log: Path) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((r[0], r[1]) for r in handled(log))


def sq_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "signal_queue:" in line]


def info_json(env: dict[str, str]) -> dict[str, Any]:
    out = flask_cli(env, "info", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_garbage_spool_at_start_is_moved_aside_and_app_worker_and_cli_start(tmp_path: Path) -> None:
    """A spool that is not SQLite: gunicorn, the worker and `info` start at once; one ERROR line names
    the file it was moved to; what the count file says it held is counted as lost."""
    server = RedisProcess()
    server.start()
    log, spool = tmp_path / "handled.log", tmp_path / "spool.sqlite3"
    env = fault_env(server.url, log, spool)
    spool_while_down(env, 10_000, 10)  # 30 events in the spool...
    garbage = overwrite_in_place(spool)  # ...which is garbage now
    started = time.monotonic()
    app = Gunicorn(env, tmp_path / "gunicorn.log")
    worker = start_worker(env)
    info = flask_cli(env, "info", "--json")
    booted_in = None
    try:
        with contextlib.suppress(AssertionError):
            wait_until("gunicorn to serve", app.up, 30)
            booted_in = time.monotonic() - started
        if booted_in is not None:
            app.load(2.0, most=20)
        expected = {(str(n), str(k)) for n in range(app.sent) for k in range(K)}
        with contextlib.suppress(AssertionError):
            wait_until("the worker to handle them", lambda: set(handled_keys(log)) >= expected, 30)
        later = flask_cli(env, "info", "--json")
        logs = app.text() + Path(str(log) + ".worker").read_text(errors="replace") + info.stderr + later.stderr
        moved = [line for line in sq_lines(logs) if "moved aside to" in line]
        asides = sorted(tmp_path.glob("spool.sqlite3.corrupt-*"))
        print(
            f"\ngarbage spool: gunicorn served {booted_in is not None} (up {booted_in and round(booted_in, 1)}s after "
            f"start), statuses "
            f"{dict(app.statuses)}, worker alive {worker.poll() is None}, info exit {info.returncode} then "
            f"{later.returncode}, ERROR lines naming the moved file {len(moved)}, files moved aside "
            f"{[p.name for p in asides]}, handled {sum(handled_keys(log).values())} of {len(expected)}"
        )
        assert booted_in is not None, app.text()[-3000:]
        assert set(app.statuses) == {200} and app.sent == 20
        assert info.returncode == 0 and later.returncode == 0, info.stderr + later.stderr
        assert worker.poll() is None, "the worker runs"
        assert set(handled_keys(log)) == expected
        [line] = moved
        [aside] = [p for p in asides if not p.name.endswith(("-wal", "-shm"))]
        assert str(aside) in line and "SQLITE_NOTADB" in line and "30 more it held" in line
        assert aside.read_bytes() == garbage, "kept for inspection, as it was"
        counts = json.loads(later.stdout)
        assert counts["spool"]["host_counts"]["lost"] == 30
        assert counts["counters"]["lost"] == 30, "Redis is up: the host's losses are in the shared totals"
        assert counts["spool"]["events"] == 0 and counts["spool"]["error"] is None
    finally:
        app.stop(worker)
        server.kill()


def test_spool_corrupted_under_load_counts_what_it_took_and_stays_quiet(tmp_path: Path) -> None:
    """Redis down, gunicorn spooling; the spool is overwritten with garbage. Every event is either
    handled (once) or counted as lost, and the log says so in a few lines, not one per try."""
    server = RedisProcess(persistent=True)  # down until the test starts it
    log, spool = tmp_path / "handled.log", tmp_path / "spool.sqlite3"
    env = fault_env(server.url, log, spool)
    app = Gunicorn(env, tmp_path / "gunicorn.log")
    worker = None
    try:
        wait_until("gunicorn to serve", app.up, 30)
        app.load(3.0)
        wait_until("both processes to spool",
                   lambda: all(s["counters"].get("spooled") for s in app.stats(2).values()), 20)
        overwrite_in_place(spool)
        corrupted_at = app.sent
        app.load(3.0)
        server.start()
        restarted = time.monotonic()
        worker = start_worker(env)
        emitted = app.sent * K
        ledger = Ledger(str(spool) + ".counts")

        def accounted() -> bool:
            return len(handled_keys(log)) + ledger.read()["lost"] >= emitted

        with contextlib.suppress(AssertionError):
            wait_until("every event handled or counted as lost", accounted, 90)
        recovered_in = time.monotonic() - restarted
        keys = handled_keys(log)
        lost = ledger.read()["lost"]
        twice = sum(c - 1 for c in keys.values() if c > 1)
        # the app's processes and the worker's (which loads the app, and may be the one to find the garbage)
        lines = sq_lines(app.text() + Path(str(log) + ".worker").read_text(errors="replace"))
        moved = [line for line in lines if "moved aside to" in line]
        print(
            f"\ncorrupted under load: requests {app.sent} ({corrupted_at} before the garbage), emitted {emitted}, "
            f"handled {len(keys)}, run twice {twice}, counted lost {lost}, unaccounted "
            f"{emitted - len(keys) - lost}, recovered {recovered_in:.1f}s after Redis started; signal_queue log "
            f"lines {len(lines)} (moved aside: {len(moved)}), statuses {dict(app.statuses)}"
        )
        assert set(app.statuses) == {200}
        assert len(keys) + lost == emitted, "every event handled or counted as lost"
        assert twice == 0
        assert lost > 0, "the garbage took events with it"
        assert len(moved) == 1, moved
        assert len(lines) <= 30, "\n".join(lines[:40])
        info = info_json(env)
        assert info["counters"]["lost"] == lost and info["spool"]["events"] == 0
    finally:
        app.stop(*([worker] if worker is not None else []))
        server.kill()


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``: a disk that really fills up."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk test needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_spool_disk_says_so_replays_what_got_in_and_sums_up(tmp_path: Path) -> None:
    """Redis down and the spool's disk full: the real cause is logged once per interval, what got in
    is replayed from the still-full disk when Redis is back, each process sums the outage up in one
    line, and `info`/`metrics` show the counts of both processes while Redis is down."""
    server = RedisProcess(persistent=True)  # down until the test starts it
    log = tmp_path / "handled.log"
    with small_disk(tmp_path / "disk", "512k") as disk:
        spool = disk / "spool.sqlite3"
        env = fault_env(server.url, log, spool)
        app = Gunicorn(env, tmp_path / "gunicorn.log")
        worker = None
        try:
            wait_until("gunicorn to serve", app.up, 30)
            ledger = Ledger(str(spool) + ".counts")
            full_at = time.monotonic() + 60
            while "disk is full" not in app.text() and time.monotonic() < full_at:
                app.load(0.5)
            full_since = time.monotonic()
            app.load(12.0)  # more than one LOSS_LOG_INTERVAL with the disk full
            full_for = time.monotonic() - full_since
            stats = app.stats(2)
            info_down = flask_cli(env, "info", "--json")
            text_down = flask_cli(env, "info")
            metrics_down = flask_cli(env, "metrics")
            lines = sq_lines(app.text())
            full_lines = [line for line in lines if "disk is full" in line]

            server.start()
            restarted = time.monotonic()
            worker = start_worker(env)
            emitted = app.sent * K

            def accounted() -> bool:
                return len(handled_keys(log)) + ledger.read()["lost"] >= emitted

            with contextlib.suppress(AssertionError):
                wait_until("every event handled or counted as lost", accounted, 60)
            recovered_in = time.monotonic() - restarted
            with contextlib.suppress(AssertionError):
                wait_until("each process to sum its outage up",
                           lambda: len(re.findall(r"outage over \(pid", app.text())) >= 2, 20)
            keys = handled_keys(log)
            counts = ledger.read()
            twice = sum(c - 1 for c in keys.values() if c > 1)
            every_line = sq_lines(app.text())
            summaries = [line for line in every_line if "outage over (pid" in line]
            disk_free = os.statvfs(disk).f_bavail
            # each cause (a kind of line: its words, not its numbers) at most once per 10 s in each process
            per_cause = collections.Counter(re.sub(r"[\d.]+|e\.g\. .*|\(.*?\)", "", line) for line in full_lines)
            print(
                f"\nfull disk: requests {app.sent}, emitted {emitted}, spooled {counts['spooled']}, counted lost "
                f"{counts['lost']}, handled {len(keys)}, run twice {twice}, unaccounted "
                f"{emitted - len(keys) - counts['lost']}, recovered {recovered_in:.1f}s after Redis started "
                f"(disk still full: {disk_free} blocks free); 'disk is full' lines {len(full_lines)} in "
                f"{full_for:.0f}s of a full disk ({len(per_cause)} causes), signal_queue lines before Redis came back "
                f"{len(lines)}, in all {len(every_line)}, "
                f"'cannot rollback' {app.text().count('cannot rollback')}, info while down exit "
                f"{info_down.returncode}, metrics exit {metrics_down.returncode}, summaries {len(summaries)}"
            )
            assert set(app.statuses) == {200}
            assert "cannot rollback" not in app.text()
            assert full_lines and all("database or disk is full" in line for line in full_lines)
            assert max(per_cause.values()) <= 2 * (int(full_for // 10) + 2), "\n".join(full_lines)
            assert len(every_line) <= 30, "\n".join(every_line[:40])
            assert counts["spooled"] > 0 and counts["lost"] > 0
            assert counts["spooled"] == sum(s["counters"].get("spooled", 0) for s in stats.values())
            assert len(keys) + counts["lost"] == emitted and twice == 0, "what got in was replayed, once"
            assert len(keys) == counts["spooled"], "Redis was down throughout: all that was handled was spooled"

            assert info_down.returncode == 0 and text_down.returncode == 0, info_down.stderr + text_down.stderr
            assert f"redis {server.url}: UNREACHABLE (ConnectionError" in text_down.stdout
            assert re.search(r"\nspool \d+ event\(s\) in \d+ batch\(es\): ", text_down.stdout), text_down.stdout
            down = json.loads(info_down.stdout)
            assert down["redis_error"].startswith("ConnectionError") and down["counters"] is None
            host = down["spool"]["host_counts"]
            assert host["spooled"] > 0 and host["lost"] > 0 and down["spool"]["events"] > 0
            assert metrics_down.returncode == 0, metrics_down.stderr
            assert "\nsignal_queue_redis_up 0\n" in "\n" + metrics_down.stdout
            assert f"\nsignal_queue_host_lost_total {host['lost']}\n" in metrics_down.stdout

            assert len(summaries) == 2, summaries
            numbers = [re.search(r"spooled (\d+) event\(s\), replayed (\d+) .*lost (\d+)", s) for s in summaries]
            assert all(numbers)
            assert sum(int(m[1]) for m in numbers if m) == counts["spooled"]
            assert sum(int(m[3]) for m in numbers if m) == counts["lost"]
            up = info_json(env)
            assert up["counters"]["spooled"] == counts["spooled"] and up["counters"]["lost"] == counts["lost"]
            shared = redis.Redis.from_url(server.url)
            wait_until("the host's counts to be added into Redis's totals", lambda: shared.hmget(
                "sq:stats", "spooled", "lost") == [str(counts["spooled"]).encode(), str(counts["lost"]).encode()], 10)
        finally:
            app.stop(*([worker] if worker is not None else []))
            server.kill()


def test_preload_with_a_spool_left_behind_forks_children_that_spool_and_replay(tmp_path: Path) -> None:
    """gunicorn --preload, 2 workers, a non-empty spool at start whose lock another process holds
    while the master forks: the master runs no sender thread, no child hangs, every event is handled once."""
    server = RedisProcess(persistent=True)  # down until the test starts it
    log, spool = tmp_path / "handled.log", tmp_path / "spool.sqlite3"
    env = fault_env(server.url, log, spool)
    spool_while_down(env, 10_000, 10)  # 30 events left behind by a process that is gone
    holder = sqlite3.connect(spool, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # e.g. `flask signal-queue replay` busy on it
    threads_at_fork = tmp_path / "threads-at-fork"
    hooks = tmp_path / "gunicorn_hooks.py"  # pre_fork runs in the master, just before each fork
    hooks.write_text(
        "import threading\n"
        "def pre_fork(server, worker):\n"
        f"    with open({str(threads_at_fork)!r}, 'a') as f:\n"
        "        f.write(','.join(sorted(t.name for t in threading.enumerate())) + '\\n')\n"
    )
    app = Gunicorn(env, tmp_path / "gunicorn.log", "--preload", "-c", str(hooks))
    worker = None
    try:
        wait_until("gunicorn to serve", app.up, 30)
        children = app.stats(2)
        at_fork = threads_at_fork.read_text().splitlines()
        holder.execute("ROLLBACK")
        holder.close()
        app.load(2.0)
        spooled: dict[int, int] = {}

        def every_child_spooled() -> bool:
            for pid, body in app.stats(2, timeout=5).items():
                spooled[pid] = body["counters"].get("spooled", 0)
            return len(spooled) == 2 and all(spooled.values())

        with contextlib.suppress(AssertionError):
            wait_until("each child to spool its events", every_child_spooled, 20)
        server.start()
        restarted = time.monotonic()
        worker = start_worker(env)
        expected = {(str(n), str(k)) for n in [*range(app.sent), *range(10_000, 10_010)] for k in range(K)}
        with contextlib.suppress(AssertionError):
            wait_until("every event handled", lambda: set(handled_keys(log)) >= expected, 60)
        recovered_in = time.monotonic() - restarted
        keys = handled_keys(log)
        twice = sum(c - 1 for c in keys.values() if c > 1)
        print(
            f"\npreload: children {sorted(children)}, master's threads at each fork {at_fork}, spooled per child "
            f"{spooled}, "
            f"expected {len(expected)} (30 left behind), handled {len(set(keys) & expected)}, lost "
            f"{len(expected - set(keys))}, run twice {twice}, recovered {recovered_in:.1f}s after Redis started"
        )
        assert len(children) == 2
        assert len(at_fork) == 2, at_fork
        assert not any("signal_queue-sender" in line for line in at_fork), "the master runs no sender thread"
        assert len(spooled) == 2 and all(spooled.values()), f"a child hangs: spooled {spooled}"
        assert set(keys) == expected and twice == 0
    finally:
        with contextlib.suppress(sqlite3.Error):
            holder.close()
        app.stop(*([worker] if worker is not None else []))
        server.kill()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_while_the_spool_is_busy_can_write_it(tmp_path: Path) -> None:
    """os.fork() while another thread holds the spool's and the count file's locks: the child spools."""
    from tests.misc_app import create_app, misc

    app = create_app(
        SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "s.db")
    )
    state = app.extensions["signal_queue"]
    with app.app_context():
        misc.send("parent", value=0)
    state.outbox.flush()  # the spool and its count file exist
    spool = state.dispatcher.spool
    busy, done = threading.Event(), threading.Event()

    def hold() -> None:
        ledger = getattr(spool, "ledger", None)  # (main has none: the test must still show its hang)
        with contextlib.ExitStack() as held:
            for lock in (spool._lock, getattr(ledger, "_counts_mutex", None), getattr(ledger, "_identity_mutex", None)):
                if lock is not None:
                    held.enter_context(lock)
            busy.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    busy.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 if it spooled its event within 10 s
        code = 1
        try:
            before = state.dispatcher.counters["spooled"]
            with app.app_context():
                misc.send("child", value=1)
            with contextlib.suppress(AssertionError):
                wait_until("the child to spool", lambda: state.dispatcher.counters["spooled"] > before, 10)
            code = 0 if state.dispatcher.counters["spooled"] > before else 1
        finally:
            os._exit(code)
    done.set()
    holder.join()
    statuses: list[int] = []

    def reaped() -> bool:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            statuses.append(status)
        return bool(finished)

    try:
        wait_until("the forked child to exit", reaped, 20)
    except AssertionError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    status = statuses[0] if statuses else None
    print(f"\nfork: child exit status {status} (0: it spooled; 256: it did not within 10 s; None: killed)")
    assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert spool.depth() == (2, 2), "the parent's event and the child's"


def test_replay_does_not_forget_a_batch_spooled_while_it_looked(tmp_path: Path, redis_url: str) -> None:
    """A batch spooled by another thread just after the replay found the spool empty is still replayed."""
    from tests.misc_app import create_app, misc

    app = create_app(SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "s.db"))
    state = app.extensions["signal_queue"]
    dispatcher = state.dispatcher
    with app.app_context():
        misc.send("x", value="late")
    events = list(state.outbox._pending)
    state.outbox._pending.clear()
    claim = dispatcher.spool.claim

    def claim_then_another_thread_spools(limit: int) -> Any:
        rows = claim(limit)
        if not rows:
            other = threading.Thread(
                target=dispatcher.spool_batches, args=(dispatcher.prepare(events), events, "Redis failed")
            )
            other.start()
            other.join()
        return rows

    dispatcher.spool.claim = claim_then_another_thread_spools  # type: ignore[method-assign]
    dispatcher.replay()
    dispatcher.spool.claim = claim  # type: ignore[method-assign]
    print(f"\nrace: spool depth {dispatcher.spool.depth()}, spool_dirty {dispatcher.spool_dirty}")
    assert dispatcher.spool.depth() == (1, 1)
    assert dispatcher.spool_dirty, "the sender will replay it"
    dispatcher.replay()
    assert dispatcher.spool.depth() == (0, 0) and redis.Redis.from_url(redis_url).llen("rq:queue:signals") == 1


def test_a_process_writing_a_spool_another_moved_aside_writes_the_fresh_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Process A has the spool open; it turns to garbage; process B finds it, moves it aside and counts
    A's batch as lost; A's next batch goes into the fresh spool, not into the file moved aside."""
    from signal_queue.producer.spool import Spool

    path = tmp_path / "spool.sqlite3"
    script = (
        "import sys\n"
        "from signal_queue.producer.spool import Spool, SpooledBatch\n"
        f"spool = Spool({str(path)!r})\n"
        "for n in (1, 2):\n"
        "    spool.put([SpooledBatch(f'job{n}', 'signals', b'[]', {}, 7 * n)])\n"
        "    spool._run(lambda db: db.execute('PRAGMA wal_checkpoint(TRUNCATE)'))  # as SQLite does every 1000 pages\n"
        "    print('put', n, flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert writer.stdout is not None and writer.stdin is not None
    try:
        assert writer.stdout.readline() == "put 1\n"  # 7 events, in a spool A keeps open
        overwrite_in_place(path)
        finder = Spool(str(path))
        with caplog.at_level(logging.ERROR, logger="signal_queue"):
            found = finder.depth()
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "put 2\n"  # 14 events
        after = finder.depth()
        counts = finder.ledger.read()
        asides = [p.name for p in tmp_path.glob("spool.sqlite3.corrupt-*")]
        print(f"\nmoved aside: depth seen by B {found}, then {after}; lost {counts['lost']}, files {asides}")
        assert found == (0, 0)
        assert after == (1, 14), "A wrote its next batch into the fresh spool"
        assert counts["lost"] == 7 and counts["spooled"] == 21 and counts["spool_events"] == 14
        assert len([r for r in caplog.records if "moved aside to" in r.getMessage()]) == 1
        assert str(path) + ".corrupt-" in caplog.text and "7 more it held" in caplog.text
        finder.close()
    finally:
        writer.stdin.close()
        writer.wait(10)
        writer.stdout.close()


def test_a_partly_corrupt_spool_keeps_the_rows_it_can_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage over the spool's last pages: the rows still readable go into the fresh spool (and are
    replayed); only the events of the unreadable ones are counted as lost."""
    from signal_queue.producer.spool import Spool, SpooledBatch

    path = tmp_path / "spool.sqlite3"
    spool = Spool(str(path))
    for n in range(10):  # a row of ~3 KB per 4 KB page
        spool.put([SpooledBatch(f"job{n}", "signals", b'["' + b"x" * 3000 + b'"]', {}, 10)])
    spool._run(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))  # as SQLite does every 1000 pages
    spool.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 3 * 4096)
        f.write(os.urandom(3 * 4096))
    with caplog.at_level(logging.ERROR, logger="signal_queue"):
        depth = Spool(str(path)).depth()
    counts = spool.ledger.read()
    print(f"\npartly corrupt: kept {depth}, lost {counts['lost']} of 100 events")
    assert depth[1] + counts["lost"] == 100 and depth[1] >= 50 and counts["lost"] > 0
    assert f"{depth[1]} event(s) read back from it; {counts['lost']} more it held" in caplog.text
    assert counts["spool_events"] == depth[1]
    claimed = Spool(str(path)).claim(100)
    assert {b.job_id for b in claimed} <= {f"job{n}" for n in range(10)} and len(claimed) == depth[0]


@pytest.mark.parametrize("mode", ["background", "after_response", "immediate"])
def test_a_spool_left_behind_is_replayed_after_the_first_event(tmp_path: Path, redis_url: str, mode: str) -> None:
    """No sender thread at start (a preloading master must not run one); the first event starts it,
    and it replays what an earlier process left, in every delivery mode."""
    from tests.conftest import queued_events
    from tests.misc_app import create_app

    spool = str(tmp_path / "spool.sqlite3")
    down = create_app(SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SIGNAL_QUEUE_SPOOL_PATH=spool)
    for n in range(3):
        down.test_client().get(f"/emit/left{n}")
    down.extensions["signal_queue"].close()
    app = create_app(SIGNAL_QUEUE_SPOOL_PATH=spool, SIGNAL_QUEUE_DELIVERY=mode)
    outbox = app.extensions["signal_queue"].outbox
    assert outbox._thread is None, "no thread before the process needs one"
    conn = redis.Redis.from_url(redis_url)
    assert queued_events(conn) == 0
    response = app.test_client().get("/emit/first")
    response.close()
    wait_until("the spool to be replayed", lambda: queued_events(conn) == 4, 20)
    assert app.extensions["signal_queue"].dispatcher.spool.depth() == (0, 0)

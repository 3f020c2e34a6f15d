"""Redis Sentinel (redis+sentinel:// URLs, a failover under load, named workers), a client factory, and
Redis Cluster refused. Real servers: a master, its replica and three sentinels on loopback
(tests/sentinel_group.py), a one-node Redis Cluster, real worker processes, gunicorn.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from rq import Worker

from devtools.redis_process import RedisProcess, free_port
from signal_queue import ConfigurationError, SignalQueue
from signal_queue.wire.redis_connect import SENTINEL_PORT, parse_sentinel_url
from signal_queue.wire.redis_url import safe_url
from tests.conftest import ROOT, drain
from tests.sentinel_group import SentinelGroup
from tests.test_faults import FAULT_APP, fault_env, handled, start_worker, stop
from tests.test_redis_faults import Recorded, lines_with, sq_lines, wait_for, worker_log

SECRET = "Sq-Sentin3l-5ec"  # master and replica
SENTINEL_SECRET = "Sq-S3ntries-77a"  # the sentinels themselves


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shown in:\n{text}"


# --- the URL, read ------------------------------------------------------------------------------------

def test_sentinel_url_forms_are_read() -> None:
    """Hosts (default port, IPv6), service, db, the master's and the sentinels' credentials, TLS options."""
    plain = parse_sentinel_url("redis+sentinel://h1:26380,h2,[::1]:26381/mymaster")
    assert plain.hosts == (("h1", 26380), ("h2", SENTINEL_PORT), ("::1", 26381))
    assert (plain.service, plain.db, plain.username, plain.password, plain.ssl) == ("mymaster", 0, None, None, False)
    full = parse_sentinel_url(
        "rediss+sentinel://alice:p%40ss@h1:1/svc/3?sentinel_username=bob&sentinel_password=s%2Fp"
        "&sentinel_ssl=true&ssl_cert_reqs=none&ssl_check_hostname=false"
    )
    assert (full.service, full.db, full.username, full.password) == ("svc", 3, "alice", "p@ss")
    assert (full.sentinel_username, full.sentinel_password, full.sentinel_ssl) == ("bob", "s/p", True)
    assert full.ssl and full.ssl_options == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert parse_sentinel_url("redis+sentinel://:pw@h/svc/").password == "pw"


S = SECRET


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis+sentinel://:{S}@/svc", "names no sentinel"),
        (f"redis+sentinel://:{S}@h1:26379,h2:26379", "names no service"),
        (f"redis+sentinel://:{S}@h1:26379/svc/zero", "'zero' after the service name is not a whole number"),
        (f"redis+sentinel://:{S}@h1:port/svc", "the port of sentinel host 'h1' is not a port number"),
        (f"redis+sentinel://:{S}@h1,,h2/svc", "a sentinel host is empty"),
        (f"redis+sentinel://:{S}@h1/svc/0/extra", "more than /service_name/db"),
        (f"redis+sentinel://:{S}@h1/svc?ssl_cert_reqs=none", "needs TLS: use rediss+sentinel://"),
        (f"redis+sentinel://:{S}@h1/svc?socket_timeout=1", "unknown option 'socket_timeout'"),
        (f"redis+sentinel://h1/svc?sentinel_password={S}&sentinel_password={S}", "given twice"),
        (f"rediss+sentinel://:{S}@h1/svc?sentinel_ssl=maybe", "sentinel_ssl must be true or false"),
        (f"redis+cluster://:{S}@h1:7000", "Redis Cluster is not supported by RQ"),
        (f"sentinel://:{S}@h1:26379", "must start with redis://, rediss://, unix://, redis+sentinel://"),
    ],
)
def test_invalid_sentinel_url_names_the_problem_and_hides_the_password(url: str, problem: str) -> None:
    """An app with a wrong Sentinel URL: ConfigurationError naming what is wrong, the URL masked."""
    from tests.misc_app import create_app

    with pytest.raises(ConfigurationError) as raised:
        create_app(SIGNAL_QUEUE_REDIS_URL=url)
    message = str(raised.value)
    assert message.startswith(f"SIGNAL_QUEUE_REDIS_URL {safe_url(url)}") and problem in message, message
    assert_hidden(message, S)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis+sentinel://:{S}@h1:26379,h2:26379/svc/0", "redis+sentinel://:***@h1:26379,h2:26379/svc/0"),
        (f"rediss+sentinel://u:{S}@h1,h2/svc?sentinel_password={S}&ssl_cert_reqs=none",
         "rediss+sentinel://u:***@h1,h2/svc?sentinel_password=***&ssl_cert_reqs=none"),
        ("redis+sentinel://h1:26379,h2:26379/svc", "redis+sentinel://h1:26379,h2:26379/svc"),
    ],
)
def test_safe_url_masks_sentinel_passwords(url: str, shown: str) -> None:
    """Both passwords of a Sentinel URL are masked: the master's (userinfo) and the sentinels' (query)."""
    assert safe_url(url) == shown


# --- a Sentinel group ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured_group() -> Iterator[SentinelGroup]:
    """A password-protected group (master, replica, sentinels) that no test fails over."""
    group = SentinelGroup(password=SECRET, sentinel_password=SENTINEL_SECRET)
    yield group
    group.stop()


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """A group of its own, for a test that kills its master."""
    made = SentinelGroup(down_after_ms=int(os.environ.get("SQ_DOWN_AFTER", "1000")))
    yield made
    made.stop()


def flask_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", "--app", FAULT_APP, "signal-queue", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def app_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """tests/fault_app.py's app on a given Redis URL (and environment), in this process; closed at the end."""
    made: list[Flask] = []

    def make(url: str, **env: str) -> Flask:
        from tests.fault_app import create_app

        monkeypatch.setenv("SIGNAL_QUEUE_REDIS_URL", url)
        monkeypatch.setenv("SIGNAL_QUEUE_SPOOL_PATH", str(tmp_path / f"app{len(made)}.sqlite3"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        app = create_app()
        made.append(app)
        return app

    yield make
    for app in made:
        SignalQueue.close(app)


def emit(app: Flask, numbers: range) -> None:
    """One event per number (``fault`` signal, k=0), all in Redis (or the spool) when this returns."""
    from tests.fault_app import fault

    with app.test_request_context("/emit/0"):
        for n in numbers:
            fault.send("loop", n=n, k=0)
    drain(app)


def test_app_worker_and_cli_reach_redis_through_its_sentinels(
    secured_group: SentinelGroup, app_on: Callable[..., Flask], tmp_path: Path
) -> None:
    """redis+sentinel:// with the master's password and the sentinels' own: the app enqueues on the master,
    worker.py and `flask signal-queue worker` run the events, `info` shows the URL masked."""
    url = secured_group.url(query=secured_group.sentinel_query)
    master = secured_group.master_client()
    master.flushall()
    app = app_on(url)
    emit(app, range(20))
    assert master.llen("rq:queue:signals") == 1, "one batch, on the master"
    log = tmp_path / "handled.log"
    env = fault_env(url, log, tmp_path / "worker.sqlite3")
    for command in ([sys.executable, "worker.py", "--app", FAULT_APP, "--burst"],
                    [sys.executable, "-m", "flask", "--app", FAULT_APP, "signal-queue", "worker", "--burst"]):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert_hidden(done.stdout + done.stderr, SECRET, SENTINEL_SECRET)
        if command[1] == "worker.py":
            assert sorted(int(r[0]) for r in handled(log)) == list(range(20))
            emit(app, range(20, 30))
    assert sorted(int(r[0]) for r in handled(log)) == list(range(30))
    info = flask_cli(env, "info")
    as_json = flask_cli(env, "info", "--json")
    assert info.returncode == 0 and as_json.returncode == 0, info.stderr + as_json.stderr
    shown = secured_group.url(password="***", query="sentinel_password=***")
    assert f"redis {shown}" in info.stdout and "30 handled" in info.stdout, info.stdout
    assert json.loads(as_json.stdout)["redis"] == shown
    assert_hidden(info.stdout + info.stderr + as_json.stdout + as_json.stderr, SECRET, SENTINEL_SECRET)
    master.close()


def test_idle_worker_stopped_while_it_waits_on_the_master_exits_cleanly(
    secured_group: SentinelGroup, app_on: Callable[..., Flask], tmp_path: Path
) -> None:
    """SIGTERM while the idle worker blocks on the master (BLMOVE): it returns what it holds and exits 0.

    redis-py's Sentinel connections keep a reply that a signal interrupted unread by default; the
    worker's next commands on that connection (putting back its take, unregistering) would then read
    each other's replies (TypeError, AttributeError) and the worker exited 1."""
    url = secured_group.url(query=secured_group.sentinel_query)
    master = secured_group.master_client()
    master.flushall()
    log = tmp_path / "handled.log"
    worker = start_worker(fault_env(url, log, tmp_path / "worker.sqlite3"))
    try:
        emit(app_on(url), range(3))
        wait_for("the events", lambda: len(handled(log)) == 3, 60, worker)
        wait_for("the worker to block in BLMOVE",
                 lambda: any(c.get("cmd") == "blmove" and "b" in c.get("flags", "") for c in master.client_list()),
                 10, worker)
    finally:
        stop(worker)
        master.close()
    text = worker_log(log)
    assert worker.returncode == 0, text[-3000:]
    assert "unhandled exception" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("wrong", ["sentinel", "master"])
def test_wrong_password_stops_the_worker_and_is_hidden(
    secured_group: SentinelGroup, tmp_path: Path, wrong: str
) -> None:
    """A wrong sentinel_password (which redis-py's Sentinel takes for a sentinel that is down) or a wrong master
    password: the worker exits 2 at once naming the refusal, instead of waiting for a master; no password shown."""
    if wrong == "sentinel":
        url = secured_group.url(query="sentinel_password=Wr0ng-S3ntinel")
        refusal = "SentinelRefused: sentinel 127.0.0.1:"
    else:
        url = secured_group.url(password="Wr0ng-Mast3r", query=secured_group.sentinel_query)
        refusal = "AuthenticationError"
    out = subprocess.run([sys.executable, "worker.py", "--app", FAULT_APP, "--burst"], cwd=ROOT,
                         env=fault_env(url, tmp_path / "handled.log", tmp_path / "w.sqlite3"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    [line] = [line for line in out.stderr.splitlines() if line.startswith("worker: ")]
    assert "refused the worker" in line and refusal in line and "sentinel_password=***" in line, line
    assert_hidden(out.stdout + out.stderr, SECRET, SENTINEL_SECRET, "Wr0ng-S3ntinel", "Wr0ng-Mast3r")


# --- failover -------------------------------------------------------------------------------------

def once_each(rows: list[list[str]], expected: set[tuple[str, str]]) -> tuple[int, int, int]:
    """(events lost, events handled twice, rows with an event id seen before) among ``expected`` (n, k)."""
    by_key = collections.Counter((r[0], r[1]) for r in rows)
    by_id = collections.Counter(r[2] for r in rows)
    lost = len(expected - set(by_key))
    twice = sum(c - 1 for c in by_key.values() if c > 1)
    return lost, twice, sum(c - 1 for c in by_id.values() if c > 1)


class FirstOnNewMaster(threading.Thread):
    """Notes when the replica, once its old master is dead, first counts an event enqueued and an event handled
    (``sq:stats``): the app's and the worker's first event on the new master. Polled every 20 ms."""

    def __init__(self, replica: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.replica = replica
        self.armed = threading.Event()
        self.done = threading.Event()
        self.seen: dict[str, float] = {}

    def counts(self) -> tuple[int, int]:
        enqueued, handled = self.replica.hmget("sq:stats", "enqueued", "handled")
        return int(enqueued or 0), int(handled or 0)

    def run(self) -> None:
        self.armed.wait()
        before: tuple[int, int] | None = None
        while not self.done.wait(0.02) and len(self.seen) < 2:
            try:  # the sentinels close the promoted replica's client connections (CLIENT KILL TYPE normal)
                now = self.counts()
            except redis.ConnectionError:
                continue
            if before is None:
                before = now  # frozen: the master is dead, the replica not promoted yet (>= 1 s)
                continue
            for name, old, new in zip(("enqueued", "handled"), before, now, strict=True):
                if new > old:
                    self.seen.setdefault(name, time.monotonic())


def test_failover_under_load_loses_and_duplicates_nothing(group: SentinelGroup, tmp_path: Path) -> None:
    """gunicorn (2 processes x 4 threads) under a steady stream of requests, one worker.py; the master
    SIGKILLed, Sentinel promotes the replica: every request 2xx, every event handled once, the same
    worker process throughout. Prints the figures: requests, events, lost, duplicated, time to recover."""
    log, spool = tmp_path / "handled.log", tmp_path / "spool.sqlite3"
    env = fault_env(group.url(), log, spool)
    port = free_port()
    with open(tmp_path / "gunicorn.log", "wb") as out:
        app = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "4",
             "--worker-class", "gthread", "--log-level", "warning", FAULT_APP],
            cwd=ROOT, env=env, stdout=out, stderr=out,
        )
    worker = start_worker(env)
    worker_pid = worker.pid
    replica = group.replica.client()
    watcher = FirstOnNewMaster(replica)
    watcher.start()
    statuses: collections.Counter[int] = collections.Counter()
    sent = 0
    try:
        def get(path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        def up() -> bool:
            try:
                return get("/stats")[0] == 200
            except OSError:
                return False

        wait_for("gunicorn", up, 30)
        statuses[get("/emit/0")[0]] += 1
        sent = 1
        wait_for("the worker to run the first events", lambda: bool(handled(log)), 30, worker)

        def load(until: Callable[[], bool], limit: float) -> None:
            nonlocal sent
            end = time.monotonic() + limit
            while not until() and time.monotonic() < end:
                statuses[get(f"/emit/{sent}")[0]] += 1
                sent += 1

        load(lambda: False, 1.5)
        old_master = group.master.port
        killed = group.kill_master()
        watcher.armed.set()
        down_at = sent
        # Requests keep coming while the sentinels notice, elect and promote, and after.
        load(lambda: group.master_port() not in (old_master, None), 30)
        promoted = time.monotonic() - killed
        assert group.master_port() == group.replica.port, "the replica was promoted"
        load(lambda: len(watcher.seen) == 2, 60)
        load(lambda: False, 1.5)
        expected = {(str(n), str(k)) for n in range(sent) for k in range(3)}
        wait_for("every event handled", lambda: {(r[0], r[1]) for r in handled(log)} >= expected, 120, worker)
        drained = time.monotonic() - killed
        assert len(watcher.seen) == 2, watcher.seen
        app_back, worker_back = (watcher.seen[name] - killed for name in ("enqueued", "handled"))
        rows = handled(log)
        lost, twice, ids_twice = once_each(rows, expected)
        stats: dict[int, dict[str, int]] = {}
        for _ in range(40):
            body = json.loads(get("/stats")[1])
            stats[body["pid"]] = body["counters"]
            if len(stats) == 2:
                break
        spooled = sum(c.get("spooled", 0) for c in stats.values())
        replayed = sum(c.get("replayed", 0) for c in stats.values())
        text = worker_log(log)
        print(
            f"\nSentinel failover under load: requests {sent} ({down_at} before the kill), "
            f"2xx {sum(c for s, c in statuses.items() if 200 <= s < 300)}, statuses {dict(statuses)}; "
            f"events {len(expected)}, handled {len(rows)}, lost {lost}, duplicated {twice} (event ids twice "
            f"{ids_twice}); spooled {spooled}, replayed {replayed}; after the kill: replica promoted {promoted:.1f}s, "
            f"first event enqueued on the new master {app_back:.1f}s, first handled there {worker_back:.1f}s "
            f"(time to recover), backlog drained {drained:.1f}s; worker pid {worker_pid} "
            f"{'alive' if worker.poll() is None else 'EXITED'}; worker lines: waits "
            f"{len(lines_with(text, 'waiting until it takes writes'))}, "
            f"new RQ workers in it {len(lines_with(text, 'starting a new worker'))}"
        )
        assert all(200 <= s < 300 for s in statuses), statuses
        assert sent - down_at > 10, "requests kept coming during the failover"
        assert (lost, twice, ids_twice) == (0, 0, 0)
        assert worker.poll() is None and worker.pid == worker_pid, "the worker was never restarted"
        assert "unhandled exception" not in text, sq_lines(text)
    finally:
        watcher.done.set()
        watcher.armed.set()
        watcher.join(5)
        replica.close()
        stop(app, worker)


def test_named_worker_registers_again_after_failover_and_carries_on(
    group: SentinelGroup, app_on: Callable[..., Flask], tmp_path: Path
) -> None:
    """worker.py --name sw1 draining a backlog; the master SIGKILLed and the replica promoted (it holds sw1's
    registration, replicated): sw1 registers again on the new master and handles every event once."""
    app = app_on(group.url())
    total = 6000
    emit(app, range(total))
    log = tmp_path / "handled.log"
    worker = start_worker(fault_env(group.url(), log, tmp_path / "worker.sqlite3"), "--name", "sw1")
    try:
        wait_for("the worker to be under way", lambda: len(handled(log)) >= 1000, 60, worker)
        with group.replica.client() as replica:
            assert replica.exists("rq:worker:sw1"), "the replica holds sw1's registration"
            killed = group.kill_master()
            at_kill = len(handled(log))
            wait_for("the promotion", lambda: group.master_port() == group.replica.port, 30, worker)
            wait_for("sw1 on the new master", lambda: any(w.name == "sw1" for w in Worker.all(connection=replica)),
                     30, worker)
            registered = time.monotonic() - killed
            emit(app, range(total, total + 100))
            wait_for("every event", lambda: len(handled(log)) >= total + 100, 120, worker)
            drained = time.monotonic() - killed
            workers = [w.name for w in Worker.all(connection=replica)]
        text = worker_log(log)
        lost, twice, ids_twice = once_each(handled(log), {(str(n), "0") for n in range(total + 100)})
        print(f"\nnamed worker sw1 through a failover: {total} + 100 events, {at_kill} handled at the kill, lost "
              f"{lost}, duplicated {twice}; sw1 listed on the new master {registered:.1f}s and all handled "
              f"{drained:.1f}s after the kill; workers listed {workers}")
        assert worker.poll() is None, sq_lines(text)
        assert "There exists an active worker named" not in text, sq_lines(text)
        assert (lost, twice, ids_twice) == (0, 0, 0)
        assert workers == ["sw1"]
    finally:
        stop(worker)


def test_named_worker_killed_with_the_master_starts_again_under_its_name(
    group: SentinelGroup, app_on: Callable[..., Flask], tmp_path: Path
) -> None:
    """The master and worker sw1 SIGKILLed together (one host lost); once the replica is promoted, holding sw1's
    registration without a death date, a new sw1 on this host takes it over and runs the events at once
    (RQ alone refuses the name, "There exists an active worker named 'sw1' already", until it expires)."""
    app = app_on(group.url())
    log = tmp_path / "handled.log"
    env = fault_env(group.url(), log, tmp_path / "worker.sqlite3")
    first = start_worker(env, "--name", "sw1")
    second = None
    try:
        emit(app, range(10))
        wait_for("the first events", lambda: len(handled(log)) == 10, 60, first)
        with group.replica.client() as replica:
            wait_for("the replica to hold sw1's registration", lambda: bool(replica.exists("rq:worker:sw1")), 10)
            first.kill()
            first.wait()
            killed = group.kill_master()
            wait_for("the promotion", lambda: group.master_port() == group.replica.port, 30)
            assert replica.exists("rq:worker:sw1") and not replica.hexists("rq:worker:sw1", "death")
            second = start_worker(env, "--name", "sw1")
            emit(app, range(10, 20))
            wait_for("the events after the failover", lambda: len(handled(log)) == 20, 60, second)
            recovered = time.monotonic() - killed
            listed = [(w.name, w.pid) for w in Worker.all(connection=replica)]
        text = worker_log(log)
        print(f"\nsw1 killed with the master: a new sw1 handled the events emitted after the failover {recovered:.1f}s "
              f"after the kill; workers listed {listed}")
        assert listed == [("sw1", second.pid)]
        assert len(lines_with(text, "took over its registration left by pid", "which is gone")) == 1, sq_lines(text)
        assert sorted(int(r[0]) for r in handled(log)) == list(range(20))
    finally:
        stop(*(p for p in (first, second) if p is not None))


# --- Redis Cluster: refused --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisProcess]:
    """A one-node Redis Cluster that owns every hash slot."""
    node = RedisProcess(args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                              "--cluster-port", str(free_port())))  # the default, port + 10000, may be > 65535
    node.start()
    with redis.Redis(port=node.port) as conn:
        conn.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for("the cluster to be ok", lambda: conn.cluster("info")["cluster_state"] == "ok", 30)
    yield node
    node.kill()


def test_worker_refuses_redis_cluster_at_start(cluster: RedisProcess, tmp_path: Path) -> None:
    """worker.py on a Redis Cluster node exits 2 at once, saying RQ does not support Redis Cluster."""
    out = subprocess.run([sys.executable, "worker.py", "--app", FAULT_APP], cwd=ROOT,
                         env=fault_env(cluster.url, tmp_path / "handled.log", tmp_path / "w.sqlite3"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    [line] = [line for line in out.stderr.splitlines() if line.startswith("worker: ")]
    assert "is a Redis Cluster node" in line and "Redis Cluster is not supported by RQ" in line, line
    assert "use a single Redis, or Redis Sentinel" in line


def test_app_on_redis_cluster_keeps_events_spooled_and_logs_an_error(
    cluster: RedisProcess, app_on: Callable[..., Flask], tmp_path: Path
) -> None:
    """An app on a Redis Cluster node: requests succeed, the events stay in the spool, and an ERROR says
    Redis Cluster is not supported; `flask signal-queue info` says so too."""
    handler = Recorded(logging.WARNING)
    logging.getLogger("signal_queue").addHandler(handler)
    try:
        app = app_on(cluster.url)
        assert app.test_client().get("/emit/1").status_code == 200
        drain(app)
    finally:
        logging.getLogger("signal_queue").removeHandler(handler)
    state = app.extensions["signal_queue"]
    assert state.dispatcher.spool.depth() == (1, 3)
    errors = [r.getMessage() for r in handler.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Redis Cluster is not supported by RQ" in errors[0], errors
    assert "every event is kept in the spool" in errors[0]
    warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    assert any("3 event(s) were spooled" in w and "Redis Cluster node" in w for w in warnings), warnings
    info = flask_cli(fault_env(cluster.url, tmp_path / "handled.log", tmp_path / "cli.sqlite3"), "info")
    assert info.returncode != 0 and "Redis Cluster is not supported by RQ" in info.stderr, info.stdout + info.stderr


# --- a client factory ---------------------------------------------------------------------------------

def test_client_factory_serves_app_worker_and_cli(
    secured_group: SentinelGroup, app_on: Callable[..., Flask], tmp_path: Path
) -> None:
    """SIGNAL_QUEUE_REDIS_CLIENT=module:factory (a password read from a file, which no URL carries): the app,
    worker.py and `flask signal-queue info` all get their clients from it, each with its own options; the
    URL (nothing listens there) is not used."""
    port = secured_group.master_port()
    assert port is not None
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET)
    factory_log = tmp_path / "factory.log"
    unused = f"redis://127.0.0.1:{free_port()}/0"
    env = {"SIGNAL_QUEUE_REDIS_CLIENT": "tests.client_factory:make_client", "SQ_TEST_REDIS_PORT": str(port),
           "SQ_TEST_PASSWORD_FILE": str(secret_file), "SQ_TEST_FACTORY_LOG": str(factory_log)}
    master = secured_group.master_client()
    master.flushall()
    app = app_on(unused, **env)
    assert app.extensions["signal_queue"].connection.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    emit(app, range(5))
    assert master.llen("rq:queue:signals") == 1
    log = tmp_path / "handled.log"
    cli_env = dict(fault_env(unused, log, tmp_path / "worker.sqlite3"), **env)
    done = subprocess.run([sys.executable, "worker.py", "--app", FAULT_APP, "--burst"], cwd=ROOT, env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(int(r[0]) for r in handled(log)) == list(range(5))
    info = flask_cli(cli_env, "info")
    assert info.returncode == 0, info.stderr
    assert "redis <SIGNAL_QUEUE_REDIS_CLIENT tests.client_factory:make_client>" in info.stdout, info.stdout
    assert "5 handled" in info.stdout
    asked = {tuple(json.loads(line)["options"]) for line in factory_log.read_text().splitlines()}
    # the app (short timeouts), the worker's watch (no retries), and the worker's blocking connection
    assert {("socket_connect_timeout", "socket_timeout"), ("retry", "socket_connect_timeout", "socket_timeout"),
            ()} <= asked, asked
    assert_hidden(done.stdout + done.stderr + info.stdout + info.stderr, SECRET)
    master.close()


def test_client_factory_given_as_a_callable_in_the_config(secured_group: SentinelGroup) -> None:
    """A callable in app.config is used as it is."""
    from tests.misc_app import create_app

    port = secured_group.master_port()
    assert port is not None
    made: list[dict[str, Any]] = []

    def factory(**options: Any) -> redis.Redis:
        made.append(options)
        return redis.Redis(port=port, password=SECRET, **options)

    app = create_app(SIGNAL_QUEUE_REDIS_CLIENT=factory, SIGNAL_QUEUE_REDIS_URL="redis://127.0.0.1:1/0")
    try:
        assert made == [{"socket_timeout": 1.0, "socket_connect_timeout": 1.0}]
        assert app.extensions["signal_queue"].connection.ping()
    finally:
        SignalQueue.close(app)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("tests.client_factory", "must be an import path 'module:name'"),
        ("tests.no_such_module:make", "cannot be imported"),
        ("tests.client_factory:missing", "cannot be imported"),
        ("tests.client_factory:os", "is a module, not a callable"),
        (42, "must be a callable or its import path"),
        ("tests.client_factory:not_a_client", "returned a str, not a redis.Redis client"),
        ("tests.client_factory:no_options", "a factory takes keyword options (socket_connect_timeout, socket_timeout)"),
    ],
)
def test_wrong_client_factory_is_refused_at_init(value: object, problem: str) -> None:
    """A SIGNAL_QUEUE_REDIS_CLIENT that is no factory: ConfigurationError at init_app, naming the problem."""
    from tests.misc_app import create_app

    with pytest.raises(ConfigurationError, match="SIGNAL_QUEUE_REDIS_CLIENT") as raised:
        create_app(SIGNAL_QUEUE_REDIS_CLIENT=value)
    assert problem in str(raised.value), raised.value

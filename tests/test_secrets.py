"""Redis passwords never shown: in messages, logs, CLI output, --json, or the worker's command line.

A private redis-server with ``requirepass`` (its configuration is fed on stdin, so the
password is not on its own command line either) on a free loopback port and a unix socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask

from devtools.redis_process import find_redis_server
from signal_queue import ConfigurationError
from signal_queue.wire.redis_url import safe_url
from tests.conftest import ROOT, answers, drain, wait_until
from tests.misc_app import create_app
from tests.recording import records
from tests.redis_server import free_port

APP = "tests.misc_app:create_app()"
SECRET = "Sq-Secr3t-7e1b"  # the server's password
WRONG = "Wr0ng-Pa55-c4d9"  # a password the server refuses
WARNING = "visible to every user of this host in the process list"


class SecuredRedis:
    """redis-server with requirepass, on 127.0.0.1:<port> and on a unix socket."""

    def __init__(self, directory: Path) -> None:
        binary = find_redis_server()
        assert binary, "a redis-server binary"
        self.port = free_port()
        self.socket = directory / "redis.sock"
        config = "\n".join([
            f"port {self.port}",
            "bind 127.0.0.1",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"requirepass {SECRET}",
            'save ""',
            "appendonly no",
            f"dir {directory}",
            f"logfile {directory / 'redis.log'}",
        ])
        self.process = subprocess.Popen(
            [binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert self.process.stdin is not None
        self.process.stdin.write(config.encode() + b"\n")
        self.process.stdin.close()
        self.conn = redis.Redis(port=self.port, password=SECRET, socket_connect_timeout=0.2)
        wait_until(f"redis-server to answer (see {directory / 'redis.log'})", lambda: answers(self.conn), 10,
                   self.process)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=self.port).ping()  # it does want the password

    def url(self, password: str = SECRET) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"

    def query_url(self, password: str = SECRET) -> str:
        return f"redis://127.0.0.1:{self.port}/0?password={password}"

    def unix_url(self, password: str = SECRET) -> str:
        return f"unix://{self.socket}?db=0&password={password}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredRedis]:
    server = SecuredRedis(tmp_path_factory.mktemp("secured-redis"))
    yield server
    server.stop()


@pytest.fixture
def secured(secured_server: SecuredRedis) -> SecuredRedis:
    secured_server.conn.flushall()
    return secured_server


def assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shown in:\n{text}"


def flask_cli(url: str, spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url, SIGNAL_QUEUE_SPOOL_PATH=str(spool))
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "signal-queue", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def worker_env(url: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url)
    env.pop("FLASK_APP", None)
    env.pop("SIGNAL_QUEUE_APP", None)
    return env


# --- one function masks a URL's passwords ---------------------------------------------------------

S = SECRET


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{S}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"redis://alice:{S}@redis.internal/0", "redis://alice:***@redis.internal/0"),
        (f"rediss://alice:{S}@redis.internal:6380/0", "rediss://alice:***@redis.internal:6380/0"),
        (f"redis://127.0.0.1:6379/0?password={S}", "redis://127.0.0.1:6379/0?password=***"),
        (f"redis://h/0?db=1&password={S}&socket_timeout=2", "redis://h/0?db=1&password=***&socket_timeout=2"),
        (f"rediss://h/0?ssl_password={S}", "rediss://h/0?ssl_password=***"),
        (f"redis://h/0?pass%77ord={S}", "redis://h/0?pass%77ord=***"),
        (f"unix:///run/redis.sock?db=0&password={S}", "unix:///run/redis.sock?db=0&password=***"),
        (f"unix://:{S}@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        (f"redis://u:{S}@h/0?password={S}", "redis://u:***@h/0?password=***"),
        # unencoded delimiters in the password: what urllib and redis-py cannot parse
        (f"redis://:{S}/x?y#z@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://:{S}@[::1/0", "redis://:***@[::1/0"),
        (f"redis://h/0?password={S}&more&db=2", "redis://h/0?password=***&db=2"),
        (f"{S}@h:6379", "***@h:6379"),
        # nothing secret: unchanged
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
    ],
)
def test_safe_url_masks_every_password(url: str, shown: str) -> None:
    """safe_url masks the userinfo password and password= query parameters, also in URLs that do not parse."""
    assert safe_url(url) == shown
    assert_hidden(safe_url(url), S)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{S}@127.0.0.1:notaport/0",
        f"rediss://u:{S}@127.0.0.1:6379/0?socket_timeout=abc",
        f"unix://:{S}@/tmp/redis.sock?db=zero",
        f"mongodb://:{S}@db.internal/0",
        f"redis://127.0.0.1/0?password={S}&socket_timeout=abc",
        f"redis://:{S}/tail@127.0.0.1/0",  # redis-py's own message quotes the password here
        f"redis://:{S}?x@127.0.0.1/0",
    ],
)
def test_invalid_url_configuration_error_hides_the_password(url: str) -> None:
    """The ConfigurationError for an invalid SIGNAL_QUEUE_REDIS_URL shows the URL masked, and no secret."""
    with pytest.raises(ConfigurationError) as raised:
        create_app(SIGNAL_QUEUE_REDIS_URL=url)
    message = str(raised.value)
    assert message.startswith("SIGNAL_QUEUE_REDIS_URL ") and "***" in message, message
    assert_hidden(message, S)


def test_non_string_url_configuration_error_hides_the_password() -> None:
    """A URL given as bytes is refused without echoing it."""
    with pytest.raises(ConfigurationError) as raised:
        create_app(SIGNAL_QUEUE_REDIS_URL=f"redis://:{S}@127.0.0.1/0".encode())
    assert "SIGNAL_QUEUE_REDIS_URL must be a non-empty string" in str(raised.value)
    assert "got a value of type bytes" in str(raised.value)
    assert_hidden(str(raised.value), S)


# --- CLI ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["query_url", "unix_url"])
def test_info_masks_a_query_string_password(secured: SecuredRedis, tmp_path: Path, form: str) -> None:
    """`info` and `info --json` reach Redis with ?password= (TCP and unix socket) and show it as ***."""
    url = getattr(secured, form)()
    text = flask_cli(url, tmp_path / "spool.sqlite3", "info")
    assert text.returncode == 0, text.stderr
    assert f"redis {safe_url(url)}" in text.stdout and "password=***" in text.stdout
    as_json = flask_cli(url, tmp_path / "spool.sqlite3", "info", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["redis"] == getattr(secured, form)("***")
    assert_hidden(text.stdout + text.stderr + as_json.stdout + as_json.stderr, SECRET)

    refused = flask_cli(secured.query_url(WRONG), tmp_path / "spool.sqlite3", "info", "--json")
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr
    assert_hidden(refused.stdout + refused.stderr, WRONG, SECRET)


def spooled_app(spool: Path) -> Flask:
    """An app whose Redis is down has spooled one event to ``spool``."""
    down = create_app(SIGNAL_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SIGNAL_QUEUE_SPOOL_PATH=str(spool))
    down.test_client().get("/emit/spooled")
    drain(down)
    assert down.extensions["signal_queue"].dispatcher.spool.depth()[1] == 1
    return down


@pytest.mark.parametrize("refusal", ["wrong password", "nothing listens"])
def test_replay_refused_hides_the_password(secured: SecuredRedis, tmp_path: Path, refusal: str) -> None:
    """`replay` (and `replay --json`) against a Redis that refuses: the error names the URL masked."""
    spool = tmp_path / "spool.sqlite3"
    spooled_app(spool)
    if refusal == "wrong password":
        url, shown, secret = f"redis://default:{WRONG}@127.0.0.1:{secured.port}/0", "redis://default:***@", WRONG
    else:
        url, shown, secret = f"rediss://user:{SECRET}@127.0.0.1:{free_port()}/0", "rediss://user:***@", SECRET
    for args in (("replay",), ("replay", "--json")):
        out = flask_cli(url, spool, *args)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "event(s) are still spooled: Redis at " in out.stderr and shown in out.stderr, out.stderr
        assert_hidden(out.stdout + out.stderr, secret, SECRET, WRONG)
    assert secured.conn.llen("rq:queue:signals") == 0


# --- the worker --------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """``pid`` and the processes it forked (RQ's scheduler), from /proc/<pid>/stat's parent ids."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found = [pid]
    for candidate in found:
        found += [child for child, parent in parents.items() if parent == candidate]
    return found


def test_worker_takes_the_url_from_the_environment_and_keeps_it_off_the_command_line(
    secured: SecuredRedis, tmp_path: Path
) -> None:
    """worker.py with the URL only in SIGNAL_QUEUE_REDIS_URL authenticates and runs a job; the password is
    in no /proc/<pid>/cmdline of the worker (or the scheduler it forks), not in `ps`, not on stderr."""
    app = create_app(SIGNAL_QUEUE_REDIS_URL=secured.url())
    app.test_client().get("/emit/from-env")
    drain(app)
    output = tmp_path / "worker.out"  # stdout and stderr: RQ logs INFO to stdout, errors to stderr
    with output.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "worker.py", "--app", APP, "--name", "sq-secret-env"],
            cwd=ROOT, env=worker_env(secured.url()), stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        wait_until("the job ran", lambda: [r["kwargs"]["value"] for r in records(secured.conn)] == ["from-env"], 30)
        pids = descendants(worker.pid)
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids]
        assert any("worker.py" in c for c in cmdlines), cmdlines
        assert_hidden("\n".join(cmdlines), SECRET)
        if shutil.which("ps"):
            ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", ",".join(map(str, pids))],
                                capture_output=True, text=True, timeout=30, check=True).stdout
            assert "worker.py" in ps
            assert_hidden(ps, SECRET)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    log = output.read_text()
    assert "started with PID" in log and "Listening on" in log, log  # RQ's own startup lines are here
    assert WARNING not in log
    assert_hidden(log, SECRET)


def test_worker_url_option_with_a_password_works_and_warns_once(secured: SecuredRedis) -> None:
    """--url with a password: the worker runs the job and logs one WARNING (the URL masked) saying to use the
    environment; RQ's startup lines and the rest of stderr never show the password."""
    app = create_app(SIGNAL_QUEUE_REDIS_URL=secured.url())
    app.test_client().get("/emit/from-flag")
    drain(app)
    out = subprocess.run(
        [sys.executable, "worker.py", "--app", APP, "--url", secured.url(), "--burst"],
        # the app's receivers record through the app's own connection: give it the password too, as a query
        cwd=ROOT, env=worker_env(secured.query_url()), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert [r["kwargs"]["value"] for r in records(secured.conn)] == ["from-flag"]
    warnings = [line for line in out.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1, out.stderr
    assert " WARNING " in warnings[0] and f"redis://:***@127.0.0.1:{secured.port}/0" in warnings[0]
    assert "SIGNAL_QUEUE_REDIS_URL" in warnings[0]
    assert "started with PID" in out.stdout  # RQ's startup lines (RQ logs INFO to stdout)
    assert_hidden(out.stdout + out.stderr, SECRET)


def test_worker_refused_by_redis_hides_the_password(secured: SecuredRedis) -> None:
    """A wrong ?password=: the worker exits 2 saying Redis refused it, the URL masked."""
    out = subprocess.run(
        [sys.executable, "worker.py", "--app", APP, "--burst"],
        cwd=ROOT, env=worker_env(secured.query_url(WRONG)), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "refused the worker" in out.stderr and "password=***" in out.stderr, out.stderr
    assert_hidden(out.stdout + out.stderr, WRONG, SECRET)


@pytest.mark.parametrize("where", ["environment", "--url"])
def test_worker_waiting_for_redis_hides_the_password(tmp_path: Path, where: str) -> None:
    """Nothing listens: the worker's "waiting for Redis at ..." line (one per cause) shows the URL masked."""
    url = f"redis://127.0.0.1:{free_port()}/0?password={SECRET}"
    output = tmp_path / "worker.out"
    flag = ["--url", url] if where == "--url" else []
    with output.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "worker.py", "--app", APP, *flag],
            cwd=ROOT, env=worker_env(url), stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        wait_until("the waiting line", lambda: "waiting for Redis at" in output.read_text(), 30)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    log = output.read_text()
    assert "waiting for Redis at redis://127.0.0.1:" in log and "?password=***" in log, log
    assert_hidden(log, SECRET)

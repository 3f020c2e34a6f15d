"""Faults that waiting does not fix: a wrong password, an ACL denial, a TLS certificate not trusted. Real servers.

Private redis-servers (one with ``requirepass`` or ACL users, one speaking only TLS with
certificates made here by a CA of the test's own) refuse the app, the worker and the CLI
for good. The app keeps every event in its spool, as in an outage, but logs the cause at
ERROR once (not "Redis is unavailable" at WARNING) and sends the events by itself once
Redis is fixed (CONFIG SET requirepass, ACL SETUSER, CONFIG SET tls-cert-file), without a
restart. The worker and the CLI stop at once with one line naming the cause, the password
masked. Counter-checks: what passes (nothing listens; a plain/TLS port mix-up, which looks
like a reset or a timeout) is still waited out.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from rq.job import Job
from rq.serializers import JSONSerializer

from devtools.redis_process import RedisProcess, find_redis_server, free_port
from signal_queue.metrics import prometheus_text
from signal_queue.wire.keys import RUN_EVENTS
from tests.conftest import ROOT, drain, wait_until
from tests.test_faults import FAULT_APP, fault_env, start_worker, stop
from tests.test_redis_faults import lines_with, wait_for, worker_log

RIGHT = "R1ght-Pa55-8c2e"  # the password Redis wants
WRONG = "Wr0ng-Pa55-3f7a"  # the one the app and the worker are given
REQUESTS = 4  # each emits 3 events (tests/fault_app.py)


# --- TLS: a CA of the test's own, certificates, a redis-server that speaks only TLS --------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    """A CA's own certificate (no ``issuer``), or one ``issuer`` signs for ``hosts`` (IP addresses or names)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trusted.crt`` (the CA clients trust), ``other.crt`` (one they do not) and certificates:
    ``good`` (trusted, for 127.0.0.1), ``untrusted`` (by the other CA), ``misnamed`` (trusted, for
    another host) and ``client`` (trusted, for a client to show)."""
    directory = tmp_path_factory.mktemp("pki")
    cas = {}
    for ca in ("trusted", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        cas[ca] = (_certificate(f"signal_queue test CA {ca}", key, None), key)
        _write(directory, ca, *cas[ca])
    for name, ca, hosts in [
        ("good", "trusted", ("127.0.0.1", "localhost")),
        ("untrusted", "other", ("127.0.0.1", "localhost")),
        ("misnamed", "trusted", ("redis.elsewhere.example",)),
        ("client", "trusted", ()),
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, name, _certificate(name, key, cas[ca], hosts), key)
    return directory


class TlsRedis:
    """redis-server on 127.0.0.1 speaking only TLS (``--port 0``), with certificate ``cert`` of :func:`pki`."""

    def __init__(self, pki: Path, cert: str, *, client_certificates: bool = False) -> None:
        binary = find_redis_server()
        assert binary, "a redis-server binary"
        self.pki = pki
        self.port = free_port()
        self.dir = pki / f"redis-{self.port}"
        self.dir.mkdir()
        self.process = subprocess.Popen(
            [
                binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                "--tls-cert-file", str(pki / f"{cert}.crt"), "--tls-key-file", str(pki / f"{cert}.key"),
                "--tls-ca-cert-file", str(pki / "trusted.crt"),
                "--tls-auth-clients", "yes" if client_certificates else "no",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # The test's own client trusts whatever certificate the server shows, and shows one itself.
        self.admin = redis.Redis(
            port=self.port, ssl=True, ssl_cert_reqs="none", ssl_certfile=str(pki / "client.crt"),
            ssl_keyfile=str(pki / "client.key"), socket_connect_timeout=0.5, retry=None,
        )

        def up() -> bool:
            try:
                assert int(self.admin.info("server")["process_id"]) == self.process.pid, "another server's port"
                return True
            except redis.ConnectionError:
                log = (self.dir / "redis.log").read_text(errors="replace") if (self.dir / "redis.log").exists() else ""
                if self.process.poll() is not None and "TLS" in log and "not" in log and "support" in log:
                    pytest.skip(f"{binary} is built without TLS")
                assert self.process.poll() is None, f"redis-server exited:\n{log}"
                return False

        wait_until(f"redis-server to answer over TLS (see {self.dir / 'redis.log'})", up, 10)

    def url(self, query: str = "") -> str:
        """A URL that verifies Redis's certificate and host name against the trusted CA (plus ``query``).

        ``ssl_check_hostname=true``: redis-py checks the host name by default only from release 6 on.
        """
        return (f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_check_hostname=true"
                f"&ssl_ca_certs={self.pki / 'trusted.crt'}" + query)

    def use_certificate(self, cert: str) -> None:
        """Redis shows ``cert`` to new connections from now on (no restart)."""
        self.admin.execute_command("CONFIG", "SET", "tls-cert-file", str(self.pki / f"{cert}.crt"),
                                   "tls-key-file", str(self.pki / f"{cert}.key"))

    def stop(self) -> None:
        self.admin.close()
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def tls_server(pki: Path) -> Iterator[Callable[..., TlsRedis]]:
    started: list[TlsRedis] = []

    def start(cert: str, **options: bool) -> TlsRedis:
        started.append(TlsRedis(pki, cert, **options))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def plain_server() -> Iterator[tuple[RedisProcess, redis.Redis]]:
    """A private redis-server and a client of the test's own (it keeps working whatever the test changes)."""
    server = RedisProcess()
    server.start()
    admin = redis.Redis(port=server.port)
    admin.acl_setuser("admin", enabled=True, passwords=[f"+{RIGHT}"], keys=["*"], channels=["*"], commands=["+@all"])
    admin.close()
    admin = redis.Redis(port=server.port, username="admin", password=RIGHT)
    yield server, admin
    admin.close()
    server.kill()


#: Each fault the plain server can be given: (set it up and return the URL, fix it in Redis, the cause's words).
PLAIN_FAULTS: dict[str, tuple[Callable[[redis.Redis, int], str], Callable[[redis.Redis], object], str]] = {
    "wrong password": (
        lambda admin, port: (admin.config_set("requirepass", RIGHT), f"redis://:{WRONG}@127.0.0.1:{port}/0")[1],
        lambda admin: admin.config_set("requirepass", WRONG),  # the password changed back
        "authentication failed (WRONGPASS)",
    ),
    "unknown user": (
        lambda admin, port: f"redis://nobody:{WRONG}@127.0.0.1:{port}/0",
        lambda admin: admin.acl_setuser("nobody", enabled=True, passwords=[f"+{WRONG}"], keys=["*"], channels=["*"],
                                        commands=["+@all"]),
        "authentication failed (WRONGPASS)",
    ),
    "ACL denies a command": (
        lambda admin, port: (
            admin.acl_setuser("sq", enabled=True, passwords=[f"+{WRONG}"], keys=["*"], channels=["*"],
                              commands=["+@all", "-hset"]),
            f"redis://sq:{WRONG}@127.0.0.1:{port}/0",
        )[1],
        lambda admin: admin.acl_setuser("sq", enabled=True, commands=["+hset"]),
        "an ACL denies a command or key it needs (NOPERM)",
    ),
}

#: Each certificate fault of the TLS server: (its certificate, the cause's words).
TLS_FAULTS = {
    "untrusted CA": ("untrusted", "TLS certificate verification failed (CERTIFICATE_VERIFY_FAILED)"),
    "host name mismatch": ("misnamed", "TLS certificate verification failed (CERTIFICATE_VERIFY_FAILED)"),
}


# --- the app ---------------------------------------------------------------------------------------------


def queued_ids(conn: redis.Redis) -> list[str]:
    """The ids of the events waiting in the ``signals`` queue, each batch job's events in turn."""
    ids: list[str] = []
    for job_id in conn.lrange("rq:queue:signals", 0, -1):
        job = Job.fetch(job_id.decode(), connection=conn, serializer=JSONSerializer)
        assert job.func_name == RUN_EVENTS
        ids += [event["id"] for event in job.args[0]]
    return ids


def refused_then_fixed(
    app: Flask, caplog: pytest.LogCaptureFixture, conn: redis.Redis, cause: str, fix: Callable[[], object],
    *secrets: str,
) -> None:
    """The app, refused by Redis: it spools every event and logs one ERROR naming ``cause``; after ``fix``
    it sends them all by itself, each once."""
    state = app.extensions["signal_queue"]
    client = app.test_client()
    for n in range(REQUESTS):
        assert client.get(f"/emit/{n}").status_code == 200
        drain(app)
    total = REQUESTS * 3
    assert state.dispatcher.spool.depth()[1] == total
    assert (state.dispatcher.counters["spooled"], state.dispatcher.counters["lost"]) == (total, 0)
    assert "signal_queue_redis_refused 1" in prometheus_text(app)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert cause in errors[0] and "waiting will not fix this" in errors[0], errors[0]
    assert f"every event is kept in the spool {state.dispatcher.spool.path}" in errors[0], errors[0]
    text = caplog.text
    assert "unavailable" not in text, text
    for secret in secrets:
        assert secret not in text, f"{secret!r} in the log:\n{text}"

    fix()

    def over() -> list[str]:
        return [r.getMessage() for r in caplog.records if "outage over" in r.getMessage()]

    took = wait_for("the spool to be sent", lambda: state.dispatcher.spool.depth()[1] == 0 and bool(over()), 60)
    ids = queued_ids(conn)
    print(f"\n{cause}: {total} events spooled, all in Redis {took:.1f}s after the fix, {len(ids) - len(set(ids))} "
          "sent twice")
    assert len(ids) == total and len(set(ids)) == total
    assert state.dispatcher.refused is None and "signal_queue_redis_refused 0" in prometheus_text(app)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1, "no other ERROR after the first"
    [summary] = over()
    assert f"this process spooled {total} event(s), replayed {total}" in summary and "refused this app" in summary


@pytest.mark.parametrize("fault", list(PLAIN_FAULTS))
def test_app_refused_by_redis_keeps_events_logs_one_error_and_sends_them_after_the_fix(
    plain_server: tuple[RedisProcess, redis.Redis], app_on: Callable[[str], Flask],
    caplog: pytest.LogCaptureFixture, fault: str,
) -> None:
    """Wrong password, unknown user, an ACL that denies HSET: every event spooled, one ERROR naming the cause
    (not "Redis is unavailable"), the password never shown; fixed in Redis, the events go, each once."""
    server, admin = plain_server
    set_up, fix, cause = PLAIN_FAULTS[fault]
    app = app_on(set_up(admin, server.port))
    with caplog.at_level(logging.WARNING, logger="signal_queue"):
        refused_then_fixed(app, caplog, admin, cause, lambda: fix(admin), WRONG, RIGHT)


@pytest.mark.parametrize("fault", list(TLS_FAULTS))
def test_app_that_cannot_verify_redis_keeps_events_logs_one_error_and_sends_them_after_the_fix(
    tls_server: Callable[..., TlsRedis], app_on: Callable[[str], Flask], caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """Redis shows a certificate of a CA the app does not trust, or for another host: every event spooled, one
    ERROR naming the verification failure; once Redis shows a good certificate (CONFIG SET), the events go."""
    cert, cause = TLS_FAULTS[fault]
    server = tls_server(cert)
    app = app_on(server.url())
    with caplog.at_level(logging.WARNING, logger="signal_queue"):
        refused_then_fixed(app, caplog, server.admin, cause, lambda: server.use_certificate("good"))


def test_unreachable_redis_is_still_an_outage(app_on: Callable[[str], Flask], caplog: pytest.LogCaptureFixture) -> None:
    """Counter-check: nothing listening is an outage that passes: spooled at WARNING, no ERROR, not "refused"."""
    app = app_on(f"redis://:{WRONG}@127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="signal_queue"):
        app.test_client().get("/emit/1")
        drain(app)
    assert app.extensions["signal_queue"].dispatcher.spool.depth()[1] == 3
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "were spooled to" in caplog.text and "ConnectionError" in caplog.text
    assert "refused" not in caplog.text.replace("Connection refused", "")
    assert "signal_queue_redis_refused 0" in prometheus_text(app)


# --- the worker ---------------------------------------------------------------------------------------------


def run_worker_until_exit(url: str, tmp_path: Path) -> tuple[int, str, str]:
    """worker.py with ``url`` in its environment: its exit status, stdout and stderr (it must exit within 60 s)."""
    env = fault_env(url, tmp_path / "handled.log", tmp_path / "worker.sqlite3")
    out = subprocess.run([sys.executable, "worker.py", "--app", FAULT_APP], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr


def assert_one_exit_line(
    status: int, stdout: str, stderr: str, cause: str, *secrets: str, alone: bool = True
) -> None:
    """Exit 2, and one line naming ``cause`` on stderr: the only one (``alone``), else the last."""
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    exit_lines = lines_with(stderr, "worker: ", cause, "waiting will not fix this")
    assert exit_lines == (lines if alone else lines[-1:]), stderr
    for secret in secrets:
        assert secret not in stdout + stderr, f"{secret!r} shown:\n{stderr}"


@pytest.mark.parametrize("fault", [*PLAIN_FAULTS, "no password"])
def test_worker_refused_by_redis_exits_2_with_one_line(
    plain_server: tuple[RedisProcess, redis.Redis], tmp_path: Path, fault: str
) -> None:
    """Wrong password, unknown user, no password, an ACL that denies HSET: the worker exits 2 at once (not
    "waiting for Redis"), with one line on stderr naming the cause, the password masked."""
    server, admin = plain_server
    if fault == "no password":
        admin.config_set("requirepass", RIGHT)
        url, cause = f"redis://127.0.0.1:{server.port}/0", "authentication required"
    else:
        set_up, _, cause = PLAIN_FAULTS[fault]
        url = set_up(admin, server.port)
    assert_one_exit_line(*run_worker_until_exit(url, tmp_path), cause, WRONG, RIGHT)


@pytest.mark.parametrize("fault", [*TLS_FAULTS, "client certificate required"])
def test_worker_that_cannot_verify_redis_exits_2_with_one_line(
    tls_server: Callable[..., TlsRedis], tmp_path: Path, fault: str
) -> None:
    """Redis's certificate is of a CA the worker does not trust or for another host, or Redis wants a client
    certificate the URL does not give: exit 2 with one line naming it (it waited forever before)."""
    if fault == "client certificate required":
        server = tls_server("good", client_certificates=True)
        cause = "the TLS handshake failed (TLSV13_ALERT_CERTIFICATE_REQUIRED)"
    else:
        cert, cause = TLS_FAULTS[fault]
        server = tls_server(cert)
    url = server.url().replace("rediss://", f"rediss://sq:{WRONG}@")
    # Redis's refusal of a client without a certificate (TLS 1.3: an alert after the handshake) may reach the
    # worker as an EOF on its first write, which is how a restarting Redis looks: then one waiting line comes first.
    alone = fault != "client certificate required"
    assert_one_exit_line(*run_worker_until_exit(url, tmp_path), cause, WRONG, alone=alone)


@pytest.mark.parametrize("mix_up", ["plain URL to a TLS port", "TLS URL to a plain port"])
def test_worker_waits_out_a_tls_port_mix_up_with_a_hint(
    tls_server: Callable[..., TlsRedis], plain_server: tuple[RedisProcess, redis.Redis], tmp_path: Path, mix_up: str,
) -> None:
    """Counter-check: a plain URL to a TLS port (the connection is reset) or a TLS URL to a plain port (the
    handshake times out) look like an outage, so the worker waits; its one waiting line says what to check."""
    if mix_up == "plain URL to a TLS port":
        url, hint = f"redis://127.0.0.1:{tls_server('good').port}/0", "the URL must be rediss://"
    else:
        url, hint = f"rediss://127.0.0.1:{plain_server[0].port}/0", "the URL must be redis://"
    log = tmp_path / "handled.log"
    worker = start_worker(fault_env(url, log, tmp_path / "worker.sqlite3"))
    try:
        wait_for("the worker's waiting line", lambda: bool(lines_with(worker_log(log), "waiting for Redis", hint)),
                 60, worker)
        assert worker.poll() is None
    finally:
        stop(worker)
    assert len(lines_with(worker_log(log), "waiting for Redis")) == 1, worker_log(log)


# --- the CLI ----------------------------------------------------------------------------------------------------


def flask_cli(url: str, spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url, SIGNAL_QUEUE_SPOOL_PATH=str(spool))
    return subprocess.run([sys.executable, "-m", "flask", "--app", FAULT_APP, "signal-queue", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fault", ["wrong password", "untrusted CA"])
def test_cli_commands_refused_by_redis_say_why_in_one_line(
    plain_server: tuple[RedisProcess, redis.Redis], tls_server: Callable[..., TlsRedis], tmp_path: Path, fault: str,
) -> None:
    """info, failed, requeue and purge exit 1 with one line naming the cause, no traceback; metrics prints
    signal_queue_redis_refused 1 (and the line on stderr) and exits 0, as it does while Redis is down."""
    if fault == "wrong password":
        url, cause = PLAIN_FAULTS[fault][0](plain_server[1], plain_server[0].port), PLAIN_FAULTS[fault][2]
    else:
        url, cause = tls_server("untrusted").url().replace("rediss://", f"rediss://sq:{WRONG}@"), TLS_FAULTS[fault][1]
    spool = tmp_path / "spool.sqlite3"
    for args in (["info"], ["info", "--json"], ["failed"], ["requeue", "--all"], ["purge", "--failed", "--yes"]):
        out = flask_cli(url, spool, *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.strip().splitlines() == lines_with(out.stderr, "Error: ", cause, "waiting will not fix"), (
            args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and WRONG not in out.stdout + out.stderr
    metrics = flask_cli(url, spool, "metrics")
    assert metrics.returncode == 0, metrics.stderr
    assert "signal_queue_redis_up 0" in metrics.stdout and "signal_queue_redis_refused 1" in metrics.stdout
    assert len(lines_with(metrics.stderr, "metrics: ", cause)) == 1 and WRONG not in metrics.stdout + metrics.stderr

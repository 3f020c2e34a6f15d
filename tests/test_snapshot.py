"""The request snapshot survives the trip: headers, redaction, proxies, users, app-context emits."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from typing import Any

import pytest
import redis
from flask import Flask
from rq.job import Job
from rq.serializers import JSONSerializer
from werkzeug.exceptions import SecurityError

from signal_queue.consumer.context import plain_environ, werkzeug_environ
from signal_queue.producer.capture import _plain_snapshot, _werkzeug_snapshot, utc_isoformat
from signal_queue.wire.codec import Codec
from signal_queue.wire.event import RequestSnapshot
from tests.conftest import drain, run_worker
from tests.recording import records
from tests.snapshot_app import create_app, probe

APP = "tests.snapshot_app:create_app()"


def handled(app: Flask, conn: redis.Redis, url: str) -> dict[str, Any]:
    drain(app)
    run_worker(APP, url)
    [rec] = records(conn)
    return rec


def test_headers_are_kept_and_secrets_redacted(
    conn: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordinary headers arrive as sent; Authorization, Cookie and API keys arrive as [REDACTED]."""
    monkeypatch.setenv("SIGNAL_QUEUE_RESULT_TTL", "60")  # the finished job is kept, to read what Redis got
    app = create_app()
    client = app.test_client()
    client.set_cookie("tracking", "c00kie")
    client.post(
        "/probe/x?a=1&b=two",
        headers={
            "Authorization": "Bearer s3cret",
            "X-Api-Key": "k",
            "X-Custom": "visible",
            "X-Request-ID": "req-123",
            "User-Agent": "probe/1.0",
        },
    )
    rec = handled(app, conn, redis_url)
    req = rec["request"]
    assert req["headers"]["Authorization"] == "[REDACTED]"
    assert req["headers"]["Cookie"] == "[REDACTED]"
    assert req["headers"]["X-Api-Key"] == "[REDACTED]"
    assert req["headers"]["X-Custom"] == "visible"
    assert req["headers"]["User-Agent"] == "probe/1.0"
    assert req["request_id"] == "req-123"
    assert (req["method"], req["path"], req["query"]) == ("POST", "/probe/x", "a=1&b=two")
    assert req["url"] == "http://localhost/probe/x?a=1&b=two"
    assert req["endpoint"] == "view"
    assert rec["kwargs"]["args"] == {"a": "1", "b": "two"}
    assert rec["g"] == {"tenant": "acme"}, "JSON attributes of g are carried, others left out"
    assert rec["kwargs"]["emitted_at_tz"] == "UTC"
    stored = json.dumps(
        [Job.fetch(k.decode()[7:], connection=conn, serializer=JSONSerializer).args for k in conn.keys("rq:job:*")]
    )
    assert rec["event_id"] in stored, "the finished job is still stored"
    assert "s3cret" not in stored and "c00kie" not in stored


def test_redacted_headers_are_configurable(conn: redis.Redis, redis_url: str) -> None:
    """SIGNAL_QUEUE_REDACT_HEADERS replaces the default list, matched without case."""
    app = create_app(SIGNAL_QUEUE_REDACT_HEADERS=["x-custom"])
    app.test_client().get("/probe/x", headers={"X-Custom": "hidden", "Authorization": "Basic x"})
    req = handled(app, conn, redis_url)["request"]
    assert req["headers"]["X-Custom"] == "[REDACTED]"
    assert req["headers"]["Authorization"] == "Basic x"


def test_request_id_is_generated_when_absent_or_malformed(conn: redis.Redis, redis_url: str) -> None:
    """A missing or malformed X-Request-ID gets a fresh id, shared by the request's events."""
    app = create_app()
    app.test_client().get("/probe/x", headers={"X-Request-ID": "bad id\twith spaces"})
    rid = handled(app, conn, redis_url)["request"]["request_id"]
    assert re.fullmatch(r"[0-9a-f]{24}", rid), rid


@pytest.mark.parametrize(
    ("hops", "forwarded", "expected"),
    [
        (0, "6.6.6.6", "10.0.0.1"),  # spoofed header ignored by default
        (1, "6.6.6.6", "6.6.6.6"),
        (1, "1.1.1.1, 2.2.2.2", "2.2.2.2"),  # only the last hop is trusted
        (2, "1.1.1.1, 2.2.2.2", "1.1.1.1"),
        (2, "2.2.2.2", "10.0.0.1"),  # fewer entries than trusted hops: ignored
    ],
)
def test_client_ip_trusts_only_configured_proxies(
    conn: redis.Redis, redis_url: str, hops: int, forwarded: str, expected: str
) -> None:
    """The worker's request.remote_addr is the client address as the app's ProxyFix resolved it."""
    app = create_app(proxies=hops)
    app.test_client().get(
        "/probe/x", headers={"X-Forwarded-For": forwarded}, environ_base={"REMOTE_ADDR": "10.0.0.1"}
    )
    rec = handled(app, conn, redis_url)
    assert rec["request"]["remote_addr"] == expected
    assert rec["kwargs"]["client_ip"] == expected
    assert rec["kwargs"]["peer"] == "10.0.0.1"
    assert rec["request"]["headers"]["X-Forwarded-For"] == forwarded


def test_flask_login_user_is_reloaded_in_the_worker(conn: redis.Redis, redis_url: str) -> None:
    """current_user in the worker is the emit's user, reloaded through the app's user_loader."""
    app = create_app()
    app.test_client().get("/login-probe")
    rec = handled(app, conn, redis_url)
    assert rec["request"]["user"] == "42"
    assert rec["kwargs"]["login_user"] == "42"
    assert rec["kwargs"]["login_name"] == "Ada Lovelace"


def test_anonymous_request_has_no_user(conn: redis.Redis, redis_url: str) -> None:
    """With nobody logged in, the snapshot's user is None and current_user is anonymous."""
    app = create_app()
    app.test_client().get("/probe/x")
    rec = handled(app, conn, redis_url)
    assert rec["request"]["user"] is None
    assert rec["kwargs"]["login_user"] is None


def test_app_context_only_emit_has_no_request(conn: redis.Redis, redis_url: str) -> None:
    """A signal sent outside a request (CLI, job) gets an app context and no request."""
    app = create_app()
    with app.app_context():
        probe.send("cli")
    rec = handled(app, conn, redis_url)
    assert rec["request"] is None
    assert rec["sender"] == "cli"
    assert rec["kwargs"]["has_request"] is False
    assert rec["kwargs"]["app_name"] == "tests.snapshot_app"


# -- the snapshot's fast path reads the environ as werkzeug's Request does ------------------------------


def random_environ(rng: random.Random) -> dict[str, Any]:
    """A WSGI environ with the odd parts servers and clients produce: any of them may be missing or strange."""
    plain = "abcXYZ019_.~-!$&'()*+,;=:@/"
    odd = plain + "%?# é\u2603\x7f\t"
    host = rng.choice([
        "localhost", "LocalHost:5000", "example.com:80", "example.com:443", "[::1]:8080", "xn--n3h.net",
        "bad host", "", "127.0.0.1", "h\u00e9.com", None,
    ])
    environ: dict[str, Any] = {
        "REQUEST_METHOD": rng.choice(["GET", "post", "PATCH"]),
        "wsgi.url_scheme": rng.choice(["http", "https"]),
        "SCRIPT_NAME": rng.choice(["", "/app", "/app/", "//x", "/\u00e9"]),
        "PATH_INFO": "/" + "".join(rng.choice(rng.choice([plain, odd])) for _ in range(rng.randrange(12))),
        "QUERY_STRING": "".join(rng.choice(rng.choice([plain + "?", odd])) for _ in range(rng.randrange(10))),
        "SERVER_NAME": rng.choice(["srv", "srv.local", "/tmp/unix.sock"]),
        "SERVER_PORT": rng.choice(["80", "443", "8000", "", "x"]),
        "REMOTE_ADDR": rng.choice(["10.0.0.1", "::1", None]),
        "HTTP_USER_AGENT": "bench",
        "HTTP_AUTHORIZATION": "Bearer s3cret",
        "HTTP_X_REQUEST_ID": "rid",
        "HTTP_X__ODD_": "odd",
        "CONTENT_TYPE": rng.choice(["", "text/plain"]),
        "CONTENT_LENGTH": rng.choice(["", "3"]),
        "HTTP_CONTENT_TYPE": "ignored by werkzeug",
        "wsgi.input": object(),
        "werkzeug.request": object(),
    }
    if host is not None:
        environ["HTTP_HOST"] = host
    for key in rng.sample(["SCRIPT_NAME", "QUERY_STRING", "SERVER_PORT", "SERVER_NAME", "CONTENT_TYPE"], 2):
        if rng.random() < 0.2:
            del environ[key]
    if rng.random() < 0.2:
        environ["werkzeug.proxy_fix.orig"] = {"REMOTE_ADDR": "192.0.2.7"}
    return environ


def test_the_snapshot_read_straight_from_the_environ_is_werkzeugs() -> None:
    """For 3,000 environs, plain and odd: the fast path's snapshot is werkzeug's Request's, or it steps aside."""
    codec = Codec(redact_headers=["authorization"])
    rng = random.Random(13)
    fast = 0
    for _ in range(3000):
        environ = random_environ(rng)
        try:
            expected = _werkzeug_snapshot(dict(environ), codec)
        except (UnicodeError, SecurityError, ValueError):
            continue  # werkzeug itself cannot read it (a request it would refuse)
        got = _plain_snapshot(dict(environ), codec)
        if got is not None:
            fast += 1
            assert got == expected, environ
    assert fast > 500, "the fast path serves the plain requests"


def random_snapshot(rng: random.Random) -> RequestSnapshot:
    """A request snapshot as the worker may read one: each part mostly plain, else one that URL, IRI or
    header encoding changes (or refuses)."""
    plain = "abcXYZ019_.~-!$&'()*+,;=:@/"
    odd = plain + "%?# \u00e9\u2603\x7f\t\"<>[]{}|\\^`"

    def pick(usual: list[Any], unusual: list[Any]) -> Any:
        return rng.choice(usual if rng.random() < 0.8 else unusual)

    def text(start: str, chars: str) -> str:
        return start + "".join(rng.choice(chars) for _ in range(rng.randrange(12)))

    headers = [
        pick([("User-Agent", "bench/1.0"), ("Accept", "text/html, */*;q=0.8"), ("accept", "application/json"),
              ("X-Request-ID", "rid"), ("Cookie", "a=1; b=2"), ("X-Empty", ""), ("Content-Type", "text/plain"),
              ("content-type", "application/json; charset=utf-8"), ("Host", "from.header:1"), ("Content-Length", "12")],
             [("Content-Type", "multipart/form-data"), ("Content-Type", "Application/X-WWW-Form-URLEncoded"),
              ("content-type", "application/x-www-form-urlencoded; charset=x"), ("X-Odd", "caf\u00e9"),
              ("X-Odd", "tab\there"), ("X-Split", "a\nb"), ("X_Under", "v"), ("x@at", "v"), ("X Space", "v"),
              ("\u00e9t\u00e9", "v")])
        for _ in range(rng.randrange(6))
    ]
    return RequestSnapshot(
        method=pick(["GET", "POST", "patch"], ["M\u00e9THOD", "GET "]),
        scheme=pick(["http", "https"], ["HTTP", "ftp"]),
        host=pick(["localhost", "example.com:80", "example.com:443", "xn--n3h.net", "127.0.0.1", "srv:8000",
                   "-dash-.example"],
                  ["LocalHost:5000", "example.com:0080", "[::1]:8080", "a..b", "h\u00e9.com", "srv:70000", "srv:",
                   "x" * 64 + ".com", "host.", ""]),
        root_path=pick(["", "/app", "/app/", "/"], ["//x", "/\u00e9", "/a%20b", "app"]),
        path=text(pick(["/", "/orders/42"], ["//twice", ""]), pick([plain], [odd])),
        query_string=text("", pick([plain + "?=&"], [odd])),
        url="", endpoint=None, view_args={}, headers=headers,
        remote_addr=None, client_ip=rng.choice(["10.0.0.1", "::1", None]), request_id="rid-1",
    )


def test_the_worker_builds_the_environ_werkzeug_builds() -> None:
    """For 5,000 snapshots, plain and odd: the worker's own environ is EnvironBuilder's, or it steps aside."""
    app = Flask(__name__)
    rng = random.Random(17)
    fast = 0
    for _ in range(5000):
        snap = random_snapshot(rng)
        try:
            expected = werkzeug_environ(app, snap)
        except (UnicodeError, ValueError):
            expected = None  # werkzeug cannot build it: neither may the fast path
        got = plain_environ(snap)
        if got is None:
            continue
        fast += 1
        assert expected is not None, snap
        assert got.pop("wsgi.input").getvalue() == expected.pop("wsgi.input").getvalue(), snap
        assert got == expected, snap
    assert fast > 800, "the fast path serves the plain snapshots"


def test_emitted_at_is_datetimes_own_isoformat() -> None:
    """The emit time's text, formatted once per second, is datetime's for every microsecond and second."""
    rng = random.Random(7)
    stamps = [rng.uniform(0, 4e9) for _ in range(20_000)] + [1e9, 1e9 + 0.5e-6, 1e9 + 0.9999999, -1.5, 0.0]
    for stamp in stamps:
        expected = dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat()
        assert utc_isoformat(stamp) == expected, stamp

"""Failed events and busy workers as rq-dashboard shows them: its own server, configured as compose does.

Each test runs rq-dashboard (``python -m rq_dashboard``, the release in the test extras) in a
process of its own, with the environment and settings file of the ``dashboard`` service in
``docker-compose.yml``, against the private Redis, and reads its JSON endpoints: the ones its
pages load. What they return is what the pages show.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml
from rq.job import Job
from rq.serializers import JSONSerializer

from signal_queue.consumer.labels import MAX_DESCRIPTION, describe_event, event_meta
from signal_queue.wire.codec import Codec
from tests.conftest import ROOT, drain, run_worker, wait_until
from tests.dashboard_app import RELEASE_KEY, WAITING_KEY, create_app
from tests.redis_server import free_port

APP = "tests.dashboard_app:create_app()"
SECRETS = ("s3cr3t",)  # every secret the test app's requests carry starts with it

Get = Callable[[str], tuple[int, Any]]


def compose_dashboard() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dashboard"]


def compose_environment(url: str, with_settings: bool = True) -> dict[str, str]:
    """The dashboard service's environment, with the private Redis and the settings file's path here."""
    service = compose_dashboard()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RQ_DASHBOARD_")}
    for name, value in service["environment"].items():
        if name in ("RQ_DASHBOARD_USERNAME", "RQ_DASHBOARD_PASSWORD"):
            continue  # unset in compose unless given: no auth
        env[name] = str(value)
    env["RQ_DASHBOARD_REDIS_URL"] = url
    mounts = {container: host for host, container, *_ in (v.split(":") for v in service.get("volumes", []))}
    settings = env.pop("RQ_DASHBOARD_SETTINGS", None)
    if with_settings and settings is not None:  # the file compose mounts there, as it is in this checkout
        env["RQ_DASHBOARD_SETTINGS"] = str(ROOT / mounts[settings])
    return env


@contextmanager
def dashboard(url: str, log: Path, with_settings: bool = True) -> Iterator[Get]:
    """rq-dashboard serving on a free loopback port; yields a GET of its JSON endpoints."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rq_dashboard", "--bind", "127.0.0.1", "--port", str(port)],
            env=compose_environment(url, with_settings), stdout=out, stderr=subprocess.STDOUT,
        )

    def get(path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                body = response.read().decode()
                return response.status, json.loads(body) if path.endswith(".json") else body
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        def answers() -> bool:
            try:
                return get("/0/data/queues.json")[0] == 200
            except OSError:
                return False

        try:
            wait_until("rq-dashboard to answer", answers, 60, proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{log.read_text()}") from None
        yield get
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def when(text: str | None) -> dt.datetime:
    assert text is not None
    return dt.datetime.fromisoformat(text)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


#: The fields of rq-dashboard's job page data that its template inserts as HTML (escaped by the settings file).
AS_HTML = ("description", "metadata", "exc_info", "origin", "status")


def failed_jobs(get: Get) -> dict[str, dict[str, Any]]:
    """The failed registry's jobs as rq-dashboard lists them, by id, with its job page's data added
    (as the text the page shows: ``raw`` keeps the data as it came)."""
    status, listing = get("/0/data/jobs/signals/failed/50/asc/1.json")
    assert status == 200, listing
    jobs = {}
    for row in listing["jobs"]:
        status, detail = get(f"/0/data/job/{row['id']}.json")
        assert status == 200, detail
        shown = {k: html.unescape(v) if k in AS_HTML and isinstance(v, str) else v for k, v in detail.items()}
        jobs[row["id"]] = {"row": row, "raw": detail, **shown}
        assert jobs[row["id"]]["description"] == row["description"]
    return jobs


def check_times(job: dict[str, Any], start: dt.datetime, end: dt.datetime) -> None:
    """Created, enqueued, started and ended are all set, in that order, within the test's window."""
    times = [when(job[name]) for name in ("created_at", "enqueued_at", "started_at", "ended_at")]
    assert start <= times[0] <= times[1] <= times[2] <= times[3] <= end, job
    # The list shows the same start and end (it read "Failed 1 second ago" for any failed event).
    assert (job["row"]["started_at"], job["row"]["ended_at"]) == (job["started_at"], job["ended_at"])


def test_failed_events_of_a_batch_show_when_and_which_request_in_rq_dashboard(
    conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A batch's failed events: their times are set, and the description and meta name the request,
    with no secret (query parameter, path argument, header or kwarg) in either."""
    app = create_app()
    start = now()
    client = app.test_client()
    client.post(
        "/login?next=/&access_token=s3cr3t-query",
        headers={"X-Request-ID": "req-login-1", "Authorization": "Bearer s3cr3t-header"},
    )
    client.get("/reset/s3cr3t-path", headers={"X-Request-ID": "req-reset-1"})
    drain(app)
    run_worker(APP, redis_url)
    end = now()

    with dashboard(redis_url, tmp_path / "dashboard.log") as get:
        jobs = failed_jobs(get)
    assert len(jobs) == 2
    by_receiver = {json.loads(job["metadata"])["receiver"]: job for job in jobs.values()}
    login = by_receiver["tests.dashboard_app:audit_login"]
    reset = by_receiver["tests.dashboard_app:mail_reset_link"]
    assert "for <img src=x onerror=alert(1)>" in login["exc_info"]  # shown as text, not as an image
    assert login["description"] == (
        "user_logged_in -> tests.dashboard_app:audit_login: "
        "POST /login?next=/&access_token=[REDACTED] (user 42, request req-login-1)"
    )
    assert reset["description"] == (
        "password_reset_asked -> tests.dashboard_app:mail_reset_link: "
        "GET /reset/[REDACTED] (user 7, request req-reset-1)"
    )
    cases = ((login, "user_logged_in", "req-login-1"), (reset, "password_reset_asked", "req-reset-1"))
    for job, signal, request_id in cases:
        check_times(job, start, end)
        meta = json.loads(job["metadata"])
        assert set(meta) == {"signal", "receiver", "request_id", "emitted_at", "attempt"}
        assert (meta["signal"], meta["request_id"], meta["attempt"]) == (signal, request_id, 1)
        assert start <= when(meta["emitted_at"]) <= when(job["enqueued_at"])
        assert job["status"] == "failed" and "RuntimeError" in job["exc_info"]
        assert not any(s in job["description"] + job["metadata"] for s in SECRETS)
        assert not any("<" in job["raw"][name] for name in AS_HTML), "the job page would insert markup"

        # RQ itself reads the same job hash the same way.
        rq_job = Job.fetch(job["id"], connection=conn, serializer=JSONSerializer)
        assert rq_job.get_meta() == meta
        assert rq_job.description == job["description"]
        assert None not in (rq_job.enqueued_at, rq_job.started_at, rq_job.ended_at)


def test_cli_failed_listing_shows_the_path_without_its_secrets(redis_url: str) -> None:
    """`flask signal-queue failed` (text and JSON) shows each failed event's path as its job
    description does: secret-named path arguments and query parameters as [REDACTED]."""
    app = create_app()
    client = app.test_client()
    client.post("/login?next=/&access_token=s3cr3t-query", headers={"Authorization": "Bearer s3cr3t-header"})
    client.get("/reset/s3cr3t-path")
    drain(app)
    run_worker(APP, redis_url)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=redis_url)
    outputs = {}
    for form in ((), ("--json",)):
        out = subprocess.run(
            [sys.executable, "-m", "flask", "--app", APP, "signal-queue", "failed", *form],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        outputs[form] = out.stdout + out.stderr
    rows = json.loads(outputs[("--json",)])
    assert sorted(r["path"] for r in rows) == ["/login?next=/&access_token=[REDACTED]", "/reset/[REDACTED]"]
    assert "path=/reset/[REDACTED] " in outputs[()]
    assert not any(s in text for s in SECRETS for text in outputs.values())


def test_event_failing_its_last_retry_shows_its_attempt_in_rq_dashboard(
    conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """An event retried as its own job and failed by RQ's own failure path: meta says attempt 2."""
    app = create_app()
    start = now()
    app.test_client().post("/pay", headers={"X-Request-ID": "req-pay-1"})
    drain(app)
    run_worker(APP, redis_url)  # attempt 1 in the batch, attempt 2 as its own job
    end = now()

    with dashboard(redis_url, tmp_path / "dashboard.log") as get:
        [job] = failed_jobs(get).values()
    assert job["description"] == "payment_made -> tests.dashboard_app:book_payment: POST /pay (request req-pay-1)"
    meta = json.loads(job["metadata"])
    assert meta == {
        "signal": "payment_made",
        "receiver": "tests.dashboard_app:book_payment",
        "request_id": "req-pay-1",
        "emitted_at": meta["emitted_at"],
        "attempt": 2,
    }
    check_times(job, start, end)
    assert "ledger refused 3" in job["exc_info"]


@contextmanager
def busy_worker(conn: redis.Redis, redis_url: str) -> Iterator[None]:
    """A worker (its own process) running a job until the block ends."""
    app = create_app()
    app.test_client().get("/report")
    drain(app)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=redis_url)
    worker = subprocess.Popen(
        [sys.executable, "worker.py", "--app", APP, "--name", "sq-dash-busy"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("the worker to run the job", lambda: bool(conn.get(WAITING_KEY)), 60, worker)
        yield
    finally:
        conn.rpush(RELEASE_KEY, 1)
        worker.terminate()
        worker.wait(timeout=30)


def test_rq_dashboard_lists_a_busy_worker_and_its_job(conn: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """With compose's settings file, the Workers page's data loads while a worker runs a job (HTTP 200)."""
    with dashboard(redis_url, tmp_path / "dashboard.log") as get, busy_worker(conn, redis_url):
        status, data = get("/0/data/workers.json")
        assert status == 200, data
        [worker] = data["workers"]
        assert (worker["name"], worker["state"], worker["queues"]) == ("sq-dash-busy", "busy", ["signals"])
        job = worker["current_job"]
        assert job["description"] == "1 event(s): report_asked -> tests.dashboard_app:build_report"
        assert job["call_string"].startswith("signal_queue.jobs.run_events(")
        assert get(f"/0/data/job/{job['job_id']}.json")[0] == 200
        assert get("/0/view/workers")[0] == 200


def test_without_the_settings_file_rq_dashboard_fails_on_a_busy_worker(
    conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """What docs/operations.md says of rq-dashboard without deploy/rq_dashboard_settings.py: its Workers
    page's data fails (HTTP 500) while a worker runs a JSON job, and loads once the worker is idle;
    its job page gets a traceback's markup as it is, to insert as HTML.

    If this fails, rq-dashboard fixed it (it reads workers with its --json serializer): update the docs.
    """
    app = create_app()
    app.test_client().post("/login")
    drain(app)
    run_worker(APP, redis_url)
    [failed_id] = [i.decode() for i in conn.zrange("rq:failed:signals", 0, -1)]
    with dashboard(redis_url, tmp_path / "dashboard.log", with_settings=False) as get:
        assert "<img src=x onerror=alert(1)>" in get(f"/0/data/job/{failed_id}.json")[1]["exc_info"]
        with busy_worker(conn, redis_url):
            assert get("/0/data/workers.json")[0] == 500
            # Jobs read with --json (RQ_DASHBOARD_JSON) still load.
            assert get("/0/data/jobs/signals/started/8/asc/1.json")[0] == 200
        assert get("/0/data/workers.json")[0] == 200


def test_a_description_is_bounded_and_holds_no_markup_or_line_break() -> None:
    """Whatever the request was, the description stays one line of at most MAX_DESCRIPTION characters,
    without markup (rq-dashboard's job page shows it unescaped)."""
    codec = Codec(redact_fields=("token",))
    payload = {
        "id": "e1", "signal": "s<script>", "receiver": "m:r\n", "emitted_at": "2026-01-01T00:00:00+00:00",
        "request": {
            "method": "GET<", "path": "/a b/<img src=x>/" + "p" * 500,
            "query_string": "q=%3Cb%3E&x=" + "y" * 1000 + "&token=abc", "view_args": {},
            "user": "<b>bob</b>\r\n", "request_id": "r" * 300,
        },
    }
    text = describe_event(payload, codec)
    assert len(text) <= MAX_DESCRIPTION
    assert not any(c in text for c in "<\r\n"), text  # no tag can open (its "->" is plain text)
    meta = event_meta(payload, 3)
    assert "<" not in json.dumps(meta) and meta["attempt"] == 3
    assert describe_event(["not", "an", "event"], codec) == "an event that is not a JSON object (list)"

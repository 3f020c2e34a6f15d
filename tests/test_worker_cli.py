"""The worker entry points: python worker.py, flask signal-queue worker, and rq info seeing them."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import redis

import signal_queue
from tests.conftest import ROOT, drain, run_worker, wait_until
from tests.misc_app import create_app, misc
from tests.recording import records


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url, **extra)
    env.pop("FLASK_APP", None)
    env.pop("SIGNAL_QUEUE_APP", None)
    env.update(extra)
    return env


def test_flask_cli_worker_runs_the_same_jobs(conn: redis.Redis, redis_url: str) -> None:
    """`flask signal-queue worker --burst` handles the app's events like python worker.py."""
    app = create_app()
    app.test_client().get("/emit/from-cli")
    drain(app)
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "tests.misc_app:create_app()", "signal-queue", "worker", "--burst"],
        cwd=ROOT, env=env_for(redis_url), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert [r["kwargs"]["value"] for r in records(conn)] == ["from-cli"]


def test_forking_worker_class_runs_the_same_jobs(conn: redis.Redis, redis_url: str) -> None:
    """`--worker-class fork` (RQ's forking Worker: a work horse per job, the events run in it) still works."""
    app = create_app()
    for value in ("fork-1", "fork-2"):
        app.test_client().get(f"/emit/{value}")
    drain(app)
    run_worker("tests.misc_app:create_app()", redis_url, "--worker-class", "fork")
    assert sorted(r["kwargs"]["value"] for r in records(conn)) == ["fork-1", "fork-2"]
    assert {r["attempt"] for r in records(conn)} == {1}


def test_worker_finds_the_app_in_the_environment(conn: redis.Redis, redis_url: str) -> None:
    """Without --app, worker.py reads SIGNAL_QUEUE_APP, then FLASK_APP."""
    app = create_app()
    app.test_client().get("/emit/env")
    for var in ("SIGNAL_QUEUE_APP", "FLASK_APP"):
        app.test_client().get(f"/emit/{var}")
        drain(app)
        out = subprocess.run(
            [sys.executable, "worker.py", "--burst"],
            cwd=ROOT, env=env_for(redis_url, **{var: "tests.misc_app:create_app()"}),
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
    assert sorted(r["kwargs"]["value"] for r in records(conn)) == ["FLASK_APP", "SIGNAL_QUEUE_APP", "env"]


def test_worker_without_an_app_says_how_to_give_one(redis_url: str) -> None:
    """No --app and no environment: exit 2 with the fix in the message."""
    out = subprocess.run(
        [sys.executable, "worker.py", "--burst"], cwd=ROOT, env=env_for(redis_url),
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "worker: no app to load: pass --app module:app, or set SIGNAL_QUEUE_APP or FLASK_APP" in out.stderr


def test_rq_info_shows_the_queue_and_the_running_worker(conn: redis.Redis, redis_url: str) -> None:
    """`rq info` lists the signals queue with its depth (one batch job of 3 events) and a live worker."""
    app = create_app()
    with app.app_context():  # three events sent together: one batch job whatever the machine's load
        for i in range(3):
            misc.send("view", value=i)
    drain(app)
    rq = [sys.executable, "-m", "rq.cli", "info", "--url", redis_url, "signals"]
    before = subprocess.run(rq, capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"^signals\s+\|\D*1, 0 executing, 0 finished, 0 failed", before, re.M), before

    worker = subprocess.Popen(
        [sys.executable, "worker.py", "--app", "tests.misc_app:create_app()", "--name", "sq-info-test"],
        cwd=ROOT, env=env_for(redis_url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        shown = [""]

        def settled() -> bool:
            seen = shown[0] = subprocess.run(rq, capture_output=True, text=True, timeout=60, check=True).stdout
            # The receivers write their records before the worker finishes the job: wait for both. A
            # finished job is not kept (SIGNAL_QUEUE_RESULT_TTL 0), so nothing counts as finished.
            finished = re.search(r"^signals\s+\|\D*0, 0 executing, 0 finished, 0 failed", seen, re.M)
            return "sq-info-test" in seen and len(records(conn)) == 3 and bool(finished)

        with contextlib.suppress(AssertionError):  # the assertions below say what is missing
            wait_until("rq info to show the worker and the handled job", settled, 30)
        seen = shown[0]
        assert "sq-info-test" in seen, seen
        assert "1 workers, 1 queues" in seen, seen
        assert re.search(r"^signals\s+\|\D*0, 0 executing, 0 finished, 0 failed", seen, re.M), seen
        assert len(records(conn)) == 3
    finally:
        worker.terminate()
        worker.wait(timeout=10)  # an idle worker stops at once on SIGTERM
    after = subprocess.run(rq, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "0 workers, 1 queues" in after, "a stopped worker deregisters"
    assert worker.returncode == 0


def test_public_api_is_exported() -> None:
    """__all__ lists the public names, and each one exists."""
    assert {"SignalQueue", "deferred", "current_event"} <= set(signal_queue.__all__)
    for name in signal_queue.__all__:
        assert hasattr(signal_queue, name), name


def test_run_worker_helper_reports_failures(redis_url: str) -> None:
    """The burst-worker helper really runs worker.py (a bad app path fails loudly)."""
    try:
        run_worker("tests.no_such_module:app", redis_url)
    except AssertionError as exc:
        assert "worker exited 2" in str(exc)
    else:
        raise AssertionError("a worker for a missing app should fail")


def test_flask_cli_worker_takes_worker_py_options() -> None:
    """`flask signal-queue worker --help` shows worker.py's options: one parser serves both."""
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "tests.misc_app:create_app()", "signal-queue", "worker", "--help"],
        cwd=ROOT, env=env_for("redis://127.0.0.1:1/0"), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--burst" in out.stdout and "--worker-class" in out.stdout


def test_flask_cli_lists_receivers() -> None:
    """`flask signal-queue receivers` prints each receiver with its signal and queue."""
    out = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "tests.misc_app:create_app()", "signal-queue", "receivers"],
        cwd=ROOT, env=env_for("redis://127.0.0.1:1/0"), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"^misc\s+tests\.misc_app:on_misc\s+queue=signals$", out.stdout, re.M), out.stdout

"""The article's examples, deferred with their bodies unchanged, write what the inline version writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import ROOT, queued_events, run_worker

DEFERRED = ROOT / "examples" / "article"
INLINE = ROOT / "tests" / "inline_article"
TIMESTAMP = re.compile(r"^\[\d{4}-\d\d-\d\dT[\d:.]+\] ")


def drive(source: Path, cwd: Path, url: str) -> list[int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), str(ROOT)]), SIGNAL_QUEUE_REDIS_URL=url)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "drive_article.py")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return [int(s) for s in out.stdout.strip("[]\n").split(",")]


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_article_examples_write_the_inline_lines_from_the_worker(tmp_path: Path, redis_url: str) -> None:
    """Audit and exception logs come from the worker, equal to the inline ones but for the timestamp."""
    inline_dir, app_dir, worker_dir = (tmp_path / d for d in ("inline", "app", "worker"))
    for d in (inline_dir, app_dir, worker_dir):
        d.mkdir()

    assert drive(INLINE, inline_dir, redis_url) == [200, 200, 200, 500]
    inline_audit = read(inline_dir / "access_audit.log")
    inline_errors = read(inline_dir / "error_journal.log")
    assert inline_audit.count("\n") == 3 and "ZeroDivisionError: division by zero" in inline_errors

    assert drive(DEFERRED, app_dir, redis_url) == [200, 200, 200, 500]
    assert sorted(p.name for p in app_dir.iterdir()) == [], "the request process wrote a log"
    assert queued_events(redis.Redis.from_url(redis_url)) == 4

    run_worker("application:app", redis_url, cwd=worker_dir, pythonpath=(DEFERRED,))

    worker_audit = read(worker_dir / "access_audit.log")
    assert [TIMESTAMP.sub("", line) for line in worker_audit.splitlines()] == [
        TIMESTAMP.sub("", line) for line in inline_audit.splitlines()
    ]
    assert [TIMESTAMP.sub("", line) for line in worker_audit.splitlines()] == [
        "alice@127.0.0.1 accessed /dashboard",
        "guest@127.0.0.1 accessed /dashboard",
        "mallory@6.6.6.6 accessed /dashboard",
    ]
    assert read(worker_dir / "error_journal.log") == inline_errors
    assert inline_errors == "Critical error in <Flask 'application'>: ZeroDivisionError: division by zero\n\n"
    assert redis.Redis.from_url(redis_url).llen("rq:queue:signals") == 0

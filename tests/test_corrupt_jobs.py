"""Whatever a worker cannot load ends somewhere with the reason: the failed registry, or the quarantine list.

A job id on a queue with no job hash, a key of another type or an entry that is
not a job id cannot be a job: RQ drops it without a trace (or dies on it). A
signal_queue worker quarantines it, keeps running, and ``flask signal-queue failed``
shows it. A job hash with bad fields is a job that is refused: failed once, with
the reason, never retried.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from signal_queue.consumer.job import SignalJob
from signal_queue.wire.keys import QUARANTINE_KEY
from tests.conftest import ROOT, wait_until

APP = "tests.fetch_app:create_app()"

#: Queue entries that cannot be a job, and what the quarantine says of each.
STRAYS: dict[bytes, str] = {
    b"ghost0001": "there is no job hash rq:job:ghost0001",
    b"wrongtype01": "rq:job:wrongtype01 is a Redis string, not a job hash",
    b"a:b": "it is not an RQ job id",
    b"\xff\xfe-not-text": "it is not an RQ job id",
}


def env_for(url: str, log: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=str(ROOT), SIGNAL_QUEUE_REDIS_URL=url, FAULT_LOG=str(log),
        SIGNAL_QUEUE_SPOOL_PATH=str(log.with_suffix(".spool")), **extra,
    )


def flask(url: str, log: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, *args],
        cwd=ROOT, env=env_for(url, log), capture_output=True, text=True, timeout=60,
    )


def burst_worker(url: str, log: Path, *queues: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "worker.py", "--app", APP, "--burst", *queues],
        cwd=ROOT, env=env_for(url, log), capture_output=True, text=True, timeout=120,
    )


def handled(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("queues", [1, 2])
def test_queue_entries_that_are_not_jobs_are_quarantined_and_listed(
    tmp_path: Path, conn: redis.Redis, redis_url: str, queues: int
) -> None:
    """No hash, a string key, 'a:b', bytes that are not text: quarantined with the reason; the jobs run."""
    log = tmp_path / "handled.log"
    assert flask(redis_url, log, "emit", "4", "--queues", str(queues)).returncode == 0
    stray_queue = "rq:queue:second" if queues == 2 else "rq:queue:signals"
    conn.set("rq:job:wrongtype01", "not a hash")
    for entry in STRAYS:
        conn.lpush(stray_queue, entry)  # at the front: taken first

    out = burst_worker(redis_url, log, *(["signals"] if queues == 1 else []))

    assert out.returncode == 0, out.stderr
    assert sorted(int(row[1]) for row in handled(log)) == [0, 1, 2, 3], "every real job ran"
    lines = [json.loads(raw) for raw in conn.lrange(QUARANTINE_KEY, 0, -1)]
    by_id = {line["job_id"]: line for line in lines}
    assert len(lines) == len(STRAYS), f"quarantined: {lines}\n{out.stderr}"
    for entry, reason in STRAYS.items():
        line = by_id[entry.decode("utf-8", "backslashreplace")]
        assert reason in line["reason"] and line["queue"] == stray_queue.split(":")[-1] and line["at"]
    assert "is not a job that can run" in out.stderr, "each quarantine is logged"
    for name in ("signals", "second"):
        assert conn.llen(f"rq:queue:{name}") == conn.llen(f"rq:queue:{name}:intermediate") == 0
        assert conn.zcard(f"sq:taken:{name}") == 0

    listed = flask(redis_url, log, "signal-queue", "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {row["job_id"] for row in rows if row["quarantined"]} == set(by_id)
    assert all(row["error"] == by_id[row["job_id"]]["reason"] for row in rows)
    human = flask(redis_url, log, "signal-queue", "failed").stdout
    assert "ghost0001  quarantined (not a job)" in human and "there is no job hash rq:job:ghost0001" in human
    assert f"{len(STRAYS)} quarantined in sq:quarantine" in human
    info = json.loads(flask(redis_url, log, "signal-queue", "info", "--json").stdout)
    assert info["quarantined"] == len(STRAYS)
    purged = flask(redis_url, log, "signal-queue", "purge", "--failed", "--yes")
    assert purged.returncode == 0 and f"purged {len(STRAYS)} failed" in purged.stdout
    assert conn.llen(QUARANTINE_KEY) == 0


def test_taken_entry_whose_hash_vanished_is_quarantined_by_the_clean_up(
    tmp_path: Path, conn: redis.Redis, redis_url: str
) -> None:
    """An id left in an intermediate list by a dead worker, its hash gone: quarantined, not dropped."""
    log = tmp_path / "handled.log"
    conn.rpush("rq:queue:second:intermediate", "vanished01")  # taken by a worker that died since
    env = env_for(redis_url, log, SIGNAL_QUEUE_ABANDONED_AFTER="2", SIGNAL_QUEUE_MAINTENANCE_INTERVAL="1")
    with open(f"{log}.worker", "wb") as out:
        worker = subprocess.Popen([sys.executable, "worker.py", "--app", APP], cwd=ROOT, env=env,
                                  stdout=out, stderr=out)
    try:
        wait_until("the entry to be quarantined", lambda: conn.llen(QUARANTINE_KEY) == 1, 30)
        [line] = [json.loads(raw) for raw in conn.lrange(QUARANTINE_KEY, 0, -1)]
        assert (line["job_id"], line["queue"]) == ("vanished01", "second")
        assert "there is no job hash rq:job:vanished01" in line["reason"]
        assert conn.llen("rq:queue:second:intermediate") == 0
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)


CORRUPTIONS: dict[str, tuple[dict[str, str], list[str], str]] = {
    # value -> (fields set, fields deleted, the reason recorded)
    "nodata": ({}, ["data"], "field 'data' is missing"),
    "badtime": ({"created_at": "garbage"}, [], "field 'created_at' is not a UTC time"),
    "notjson": ({"data": "{not json"}, [], "data is not a JSON job written by signal_queue"),
}


def test_corrupt_job_hashes_fail_once_with_the_reason_and_the_worker_goes_on(
    tmp_path: Path, conn: redis.Redis, redis_url: str
) -> None:
    """Data deleted, a garbage created_at, data that is not JSON (on a worker of two queues): each job is in
    the failed registry with its reason and status, tried once, never retried; the worker keeps running."""
    log = tmp_path / "handled.log"
    assert flask(redis_url, log, "emit", "6", "--queues", "2").returncode == 0
    first, second = ([j.decode() for j in conn.lrange(f"rq:queue:{q}", 0, -1)] for q in ("signals", "second"))
    broken = dict(zip(CORRUPTIONS, [first[0], second[0], first[1]], strict=True))  # both queues
    for value, (fields, deleted, _) in CORRUPTIONS.items():
        key = f"rq:job:{broken[value]}"
        if fields:
            conn.hset(key, mapping=fields)
        if deleted:
            conn.hdel(key, *deleted)
    with open(f"{log}.worker", "wb") as out:
        worker = subprocess.Popen([sys.executable, "worker.py", "--app", APP], cwd=ROOT,
                                  env=env_for(redis_url, log), stdout=out, stderr=out)

    def failed() -> int:
        return int(conn.zcard("rq:failed:signals")) + int(conn.zcard("rq:failed:second"))

    try:
        wait_until("the broken jobs to fail", lambda: failed() == len(CORRUPTIONS) and len(handled(log)) == 3, 30)
        assert flask(redis_url, log, "emit", "2", "--queues", "2").returncode == 0
        wait_until("jobs sent after them to run", lambda: len(handled(log)) == 5, 30)
        # A retry is put in a scheduled registry (or back in a queue) when the job fails: none is there.
        assert [conn.zcard(f"rq:scheduled:{q}") + conn.llen(f"rq:queue:{q}") for q in ("signals", "second")] == [0, 0]
        assert worker.poll() is None, "the worker kept running"
        assert failed() == len(CORRUPTIONS)
        for value, (_, _, reason) in CORRUPTIONS.items():
            job_id = broken[value]
            origin = "signals" if conn.zscore("rq:failed:signals", job_id) is not None else "second"
            job = SignalJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
            results = job.results()
            assert [r.type.name for r in results] == ["FAILED"], f"{value}: tried once: {results}"
            assert reason in (results[0].exc_string or ""), value
            assert job.get_status() == "failed", value
            assert conn.zscore(f"rq:scheduled:{origin}", job_id) is None, f"{value} is not retried"
        assert conn.llen(QUARANTINE_KEY) == 0, "a job hash is a job: failed, not quarantined"
        assert all(Job.exists(j, connection=conn) for j in broken.values())
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)

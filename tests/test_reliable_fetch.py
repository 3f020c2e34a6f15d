"""A job Redis handed to a worker is never lost: the reply of the take is cut on its way, for real.

A TCP proxy (devtools/redis_proxy.py) sits between the worker and a private
redis-server and closes the connection after Redis executed a command that took
a job off a queue, before its reply reaches the worker: what a failover or a
network blip does. Each test counts events lost, events run twice and the time
until the job whose reply was lost ran.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from devtools.redis_process import RedisProcess
from devtools.redis_proxy import CutRule, RedisProxy
from tests.conftest import ROOT, wait_until
from tests.test_faults import stop

APP = "tests.fetch_app:create_app()"
ABANDONED_AFTER = 4
MAINTENANCE_INTERVAL = 2
POPS = {b"BLPOP", b"BRPOP", b"LPOP", b"RPOP", b"BLMPOP", b"LMPOP"}
MOVES = {b"LMOVE", b"BLMOVE", b"RPOPLPUSH", b"BRPOPLPUSH"}
SCRIPTS = {b"EVAL", b"EVALSHA", b"FCALL"}


def taken_job(command: list[bytes], reply: Any) -> str | None:
    """The job id a command took off a queue list, judged from the command and Redis's reply to it."""
    name = command[0].upper() if command else b""
    if reply is None or isinstance(reply, int):
        return None
    if name in POPS:
        item = reply[1] if isinstance(reply, list) else reply  # BLPOP answers [queue key, job id]
        return item.decode() if isinstance(item, bytes) else None
    if name in MOVES and command[1] != command[2]:  # a move onto the same list takes nothing
        return reply.decode() if isinstance(reply, bytes) else None
    if name in SCRIPTS and isinstance(reply, list) and len(reply) >= 2:
        key, job_id = reply[0], reply[1]
        if isinstance(key, bytes) and key.startswith(b"rq:queue:") and isinstance(job_id, bytes):
            return job_id.decode()
    return None


def worker_env(url: str, log: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        SIGNAL_QUEUE_REDIS_URL=url,
        SIGNAL_QUEUE_SPOOL_PATH=str(log.with_suffix(".spool")),
        FAULT_LOG=str(log),
        SIGNAL_QUEUE_ABANDONED_AFTER=str(ABANDONED_AFTER),
        SIGNAL_QUEUE_MAINTENANCE_INTERVAL=str(MAINTENANCE_INTERVAL),
    )


def start_worker(url: str, log: Path, queues: int, name: str) -> subprocess.Popen[bytes]:
    """A worker on both of the app's queues (its default), or on the default queue only."""
    only = ["signals"] if queues == 1 else []
    with open(f"{log}.{name}", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "worker.py", "--app", APP, "--name", name, *only],
            cwd=ROOT, env=worker_env(url, log), stdout=out, stderr=out,
        )


def emit(url: str, log: Path, count: int, queues: int) -> None:
    """``count`` events through the app's real emit path, each in a job of its own."""
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "emit", str(count), "--queues", str(queues)],
        cwd=ROOT, env=worker_env(url, log), check=True, capture_output=True, timeout=60,
    )


def handled(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def settled(conn: redis.Redis) -> bool:
    """Nothing left that could run again: no job queued, taken, held or started."""
    for pattern in ("rq:queue:*", "sq:hold:*"):
        if any(conn.llen(key) for key in conn.scan_iter(pattern, _type="list")):
            return False
    return not any(conn.zcard(key) for pattern in ("sq:taken:*", "rq:wip:*") for key in conn.scan_iter(pattern))


def outcome(log: Path, count: int, deadline: float, url: str) -> tuple[int, int, list[list[str]]]:
    """Wait until every event ran once and nothing could run again (or the deadline):
    (events lost, events run twice, the lines)."""
    conn = redis.Redis.from_url(url)
    with contextlib.suppress(AssertionError):  # the counts below say what is missing
        wait_until("every event to run once", lambda: len({row[1] for row in handled(log)}) >= count and settled(conn),
                   deadline)
    conn.close()
    rows = handled(log)
    runs = collections.Counter(row[1] for row in rows)
    return count - len(runs), sum(c - 1 for c in runs.values()), rows


@pytest.mark.parametrize("queues", [2, 1])
def test_lost_reply_of_a_take_loses_and_repeats_nothing(tmp_path: Path, queues: int) -> None:
    """3 of 12 takes lose their reply; the live worker runs those jobs at once, the others once each."""
    server = RedisProcess()
    server.start()
    cut_at: dict[str, float] = {}
    takes: list[str] = []

    def cut_when(command: list[bytes], reply: Any) -> bool:
        job_id = taken_job(command, reply)
        if job_id is None:
            return False
        takes.append(job_id)
        return len(takes) in (1, 4, 7)

    def on_cut(command: list[bytes], reply: Any) -> None:
        cut_at[str(taken_job(command, reply))] = time.time()
        cut_commands.append(command[0].decode())

    cut_commands: list[str] = []
    proxy = RedisProxy(server.port, CutRule(cut_when, on_cut))
    log = tmp_path / "handled.log"
    worker = start_worker(proxy.url, log, queues, "fetch-a")
    try:
        conn = redis.Redis.from_url(server.url)
        wait_until("the worker to register", lambda: conn.scard("rq:workers") == 1, 30)
        emit(server.url, log, 12, queues)
        lost, twice, rows = outcome(log, 12, deadline=25, url=server.url)
        ran_at = {row[4]: float(row[5]) for row in rows}
        recovery = {job: ran_at[job] - at for job, at in cut_at.items() if job in ran_at}
        print(
            f"\nlost replies ({queues} queue(s)): {len(cut_at)} cut, events lost {lost}, run twice {twice}, "
            f"cut jobs ran again after {sorted(round(s, 3) for s in recovery.values())} s (replies cut: {cut_commands})"
        )
        assert proxy.cuts == 3 and len(cut_at) == 3, "the proxy cut three takes' replies"
        assert lost == 0, f"{lost} event(s) lost"
        assert twice == 0, f"{twice} event(s) run twice"
        assert len(recovery) == 3 and max(recovery.values()) < 1.0, (
            "a live worker runs the job whose reply it lost at once, not after a backoff or the abandoned-job bound"
        )
        assert worker.poll() is None, "the worker kept running"
        assert conn.llen("rq:queue:signals:intermediate") == conn.llen("rq:queue:second:intermediate") == 0
    finally:
        stop(worker)
        proxy.close()
        server.kill()


@pytest.mark.parametrize("queues", [2, 1])
def test_job_started_by_the_take_of_a_worker_killed_before_the_reply_runs_once_as_attempt_2(
    tmp_path: Path, queues: int
) -> None:
    """The take that hands a worker its job also starts it. SIGKILLed as Redis hands it the job (before the
    reply arrives), the worker leaves a job that RQ reads as started by it (status, started registry, its
    execution); RQ's clean-up of abandoned jobs queues it again, and a second worker runs it once, as its
    second attempt (the first began), within the abandoned-job bound."""
    server = RedisProcess()
    server.start()
    log = tmp_path / "handled.log"
    victim: list[subprocess.Popen[bytes]] = []
    cut: dict[str, Any] = {}

    def cut_when(command: list[bytes], reply: Any) -> bool:
        return not cut and taken_job(command, reply) is not None

    def on_cut(command: list[bytes], reply: Any) -> None:
        victim[0].kill()
        victim[0].wait()
        queue_key = reply[0] if isinstance(reply, list) else command[1]  # a script's reply, or a blocking move's
        cut.update(job=str(taken_job(command, reply)), queue=queue_key.decode().removeprefix("rq:queue:"),
                   at=time.time())

    proxy = RedisProxy(server.port, CutRule(cut_when, on_cut))
    first = start_worker(proxy.url, log, queues, "fetch-victim")
    victim.append(first)
    second = None
    try:
        conn = redis.Redis.from_url(server.url)
        wait_until("the worker to register", lambda: conn.scard("rq:workers") == 1, 30)
        emit(server.url, log, 4, queues)
        wait_until("the cut", lambda: bool(cut), 30)
        job = Job.fetch(cut["job"], connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.STARTED and job.worker_name == "fetch-victim", "started by the take"
        assert cut["job"] in StartedJobRegistry(cut["queue"], connection=conn).get_job_ids()
        assert conn.lpos(f"rq:queue:{cut['queue']}:intermediate", cut["job"]) is None, "not left taken, unstarted"
        assert conn.hget(job.key, "sq_attempts") == b"1"
        second = start_worker(server.url, log, queues, "fetch-rescuer")
        lost, twice, rows = outcome(log, 4, deadline=30, url=server.url)
        ran = [row for row in rows if row[4] == cut["job"]]
        print(f"\ntaker killed as its take started the job ({queues} queue(s)): events lost {lost}, run twice {twice}, "
              f"the job ran after {round(float(ran[0][5]) - cut['at'], 2) if ran else None} s as attempt "
              f"{ran[0][3] if ran else None}")
        assert lost == 0, f"{lost} event(s) lost"
        assert twice == 0, f"{twice} event(s) run twice"
        assert [row[3] for row in ran] == ["2"], "run once, as its second attempt"
        assert float(ran[0][5]) - cut["at"] < ABANDONED_AFTER + MAINTENANCE_INTERVAL + 3, "within the bound"
        assert not conn.zcard(f"rq:wip:{cut['queue']}"), "nothing left started"
        assert second.poll() is None
    finally:
        stop(*(p for p in (first, second) if p is not None))
        proxy.close()
        server.kill()


@pytest.mark.parametrize("queues", [2, 1])
@pytest.mark.parametrize("reply", ["lost", "read"])
def test_sigterm_as_redis_hands_a_worker_its_job_loses_and_repeats_nothing(
    tmp_path: Path, queues: int, reply: str
) -> None:
    """SIGTERM reaches an idle worker just as the reply of its take (which started the job) comes back: a
    deploy. Whether that reply is lost or read, and whether the job reached the handler process before the
    stop or not, the stopping worker ran the job or gave it back, unstarted, to its queue; each event runs
    once, as a first attempt, and nothing is left taken or started."""
    server = RedisProcess()
    server.start()
    log = tmp_path / "handled.log"
    victim: list[subprocess.Popen[bytes]] = []
    signalled: list[str] = []

    def cut_when(command: list[bytes], answer: Any) -> bool:
        job_id = taken_job(command, answer)
        if job_id is None or signalled:
            return False
        signalled.append(job_id)
        victim[0].send_signal(signal.SIGTERM)
        return reply == "lost"

    proxy = RedisProxy(server.port, CutRule(cut_when, lambda command, answer: None))
    first = start_worker(proxy.url, log, queues, "fetch-stopped")
    victim.append(first)
    second = None
    try:
        conn = redis.Redis.from_url(server.url)
        wait_until("the worker to register", lambda: conn.scard("rq:workers") == 1, 30)
        emit(server.url, log, 4, queues)
        assert first.wait(timeout=30) == 0, "the worker stopped on SIGTERM"
        [job] = signalled
        ran_first = any(row[4] == job for row in handled(log))
        given_back = any(conn.lpos(f"rq:queue:{q}", job) is not None for q in ("signals", "second"))
        held = sum(conn.llen(k) for k in conn.keys("sq:hold:*")) + sum(
            conn.llen(f"rq:queue:{q}:intermediate") for q in ("signals", "second"))
        started = sum(conn.zcard(k) for k in conn.scan_iter("rq:wip:*"))
        second = start_worker(server.url, log, queues, "fetch-next")
        lost, twice, rows = outcome(log, 4, deadline=20, url=server.url)
        where = "ran before the stop" if ran_first else "was back in its queue" if given_back else "was neither"
        print(f"\nSIGTERM as the take's reply is {reply} ({queues} queue(s)): events lost {lost}, run twice {twice}; "
              f"the job {where}")
        assert ran_first or given_back, "the stopping worker ran the job or gave it back to its queue"
        assert (held, started) == (0, 0), "nothing left taken or started by the stopped worker"
        assert lost == 0, f"{lost} event(s) lost"
        assert twice == 0, f"{twice} event(s) run twice"
        assert all(row[3] == "1" for row in rows), "no event counted a start that did not run it"
    finally:
        stop(*(p for p in (first, second) if p is not None))
        proxy.close()
        server.kill()


def test_job_whose_success_bookkeeping_lost_redis_is_not_run_again(tmp_path: Path) -> None:
    """Redis restarts empty just as a worker records a job's success (its handlers all ran), and the worker's
    first tries at that transaction lose their replies: every try redis-py makes (its own retries) on
    the first one. RQ would count that as the job failing, and its failure handling would queue the job
    again, from the worker's copy, on the new, empty Redis, where no done mark says its events ran: they
    would run twice. The worker instead tries the success again once Redis answers. Each event runs once."""
    server = RedisProcess()
    # One cut per try redis-py makes at a command (its Retry's count, plus the first) on a client made from
    # a URL, as the worker's: all on the first job's success. (redis-py 5 has no Retry.get_retries().)
    tries = 1 + redis.Redis.from_url(server.url).connection_pool.make_connection().retry._retries
    server.start()
    log = tmp_path / "handled.log"
    cut: list[str] = []

    def cut_when(command: list[bytes], reply: Any) -> bool:
        if len(command) != 2 or command[0].upper() != b"WATCH" or not command[1].endswith(b":dependents"):
            return False
        job_id = command[1].decode().removeprefix("rq:job:").removesuffix(":dependents")
        if cut and (job_id != cut[0] or len(cut) >= tries):
            return False
        cut.append(job_id)
        return True

    def on_cut(command: list[bytes], reply: Any) -> None:
        if len(cut) == 1:  # the first cut: Redis crashes and comes back, empty, before the worker learns of it
            server.kill()
            server.start()

    proxy = RedisProxy(server.port, CutRule(cut_when, on_cut))
    worker = start_worker(proxy.url, log, 1, "fetch-finisher")
    try:
        conn = redis.Redis.from_url(server.url)
        wait_until("the worker to register", lambda: conn.scard("rq:workers") == 1, 30)
        emit(server.url, log, 3, 1)
        wait_until("every try at the first job's success to be cut", lambda: len(cut) == tries, 60)
        wait_until("the worker to be listed again", lambda: conn.scard("rq:workers") == 1, 30)
        emit(server.url, log, 3, 1)  # after the restart: these must all run
        after = lambda: [row for row in handled(log) if row[4] != cut[0]]  # noqa: E731
        with contextlib.suppress(AssertionError):  # the counts below say what is missing
            wait_until("the events emitted after the restart", lambda: len({r[2] for r in after()}) >= 3, 30)
        rows = handled(log)
        runs = collections.Counter(row[2] for row in rows if row[4] == cut[0])
        text = Path(f"{log}.fetch-finisher").read_text()
        print(f"\nsuccess of job {cut[0]} lost ({proxy.cuts} replies cut) across an empty restart: its event ran "
              f"{sum(runs.values())} time(s); {len({r[2] for r in after()})} of 3 emitted after ran; "
              f"'enqueued for retry' logged {text.count('enqueued for retry')} time(s)")
        assert proxy.cuts == tries, "every try redis-py made at the first job's success was cut"
        assert list(runs.values()) == [1], "the job whose success was lost ran once, not again"
        assert "enqueued for retry" not in text, "a job that ran is not counted as failed"
        assert len({r[2] for r in after()}) == 3 and len(after()) == 3, "the events after the restart ran once each"
        assert worker.poll() is None, "the worker kept running"
    finally:
        stop(worker)
        proxy.close()
        server.kill()

"""The app's send (one enqueue script, wire/rq_jobs.py) under real faults: Redis full, and a reply lost.

A send writes a batch's job, its queue entry, its sent-marker and the count in one
atomic command. A Redis that refuses writes must refuse it whole (nothing written,
the events spooled and sent later), and a send whose reply is lost after Redis ran
it must not be sent again by the replay. Each test counts what was lost and what ran twice.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path
from typing import Any

import redis

from devtools.redis_process import RedisProcess
from devtools.redis_proxy import CutRule, RedisProxy, RespError
from signal_queue.wire.rq_jobs import ENQUEUE_SCRIPT
from tests.conftest import drain, queued_events, run_worker, wait_until
from tests.misc_app import create_app, misc
from tests.recording import records

APP = "tests.misc_app:create_app()"


def lost_and_twice(conn: redis.Redis, values: list[str]) -> tuple[int, int]:
    """Of the events sent with ``values``, how many the worker never ran, and how many extra runs there were."""
    runs = collections.Counter(r["kwargs"]["value"] for r in records(conn) if r["receiver"] == "misc")
    return sum(1 for value in values if runs[value] == 0), sum(n - 1 for n in runs.values() if n > 1)


def test_a_full_redis_refuses_the_whole_send_and_the_spool_sends_it_later(tmp_path: Path) -> None:
    """maxmemory with noeviction: nothing of the send is written; lifted, the replay sends it, each event runs once."""
    server = RedisProcess()
    server.start()
    try:
        conn = redis.Redis.from_url(server.url)
        app = create_app(SIGNAL_QUEUE_REDIS_URL=server.url, SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"))
        state = app.extensions["signal_queue"]
        with app.app_context():
            misc.send("x", value="warm-up")
        drain(app)
        run_worker(APP, server.url)
        conn.delete("sq:test:records")
        before = {k: conn.type(k) for k in conn.keys("*")}
        stats = conn.hgetall("sq:stats")

        conn.config_set("maxmemory-policy", "noeviction")
        conn.config_set("maxmemory", max(1, int(conn.info("memory")["used_memory"]) // 2))
        with app.app_context():
            for i in range(3):
                misc.send("x", value=f"full{i}")
        drain(app)
        after = {k: conn.type(k) for k in conn.keys("*")}
        print(f"\nfull Redis: spooled {state.dispatcher.counters['spooled']}, keys added {set(after) - set(before)}")
        assert state.dispatcher.counters["spooled"] == 3, "the events went to the spool"
        assert state.dispatcher.spool.depth()[1] == 3
        assert set(after) - set(before) == set(), "the refused send wrote no key (job, queue entry, marker)"
        assert conn.hgetall("sq:stats") == stats, "nor the count"

        conn.config_set("maxmemory", 0)
        wait_until("the spool to be replayed", lambda: queued_events(conn) == 3, 30)
        run_worker(APP, server.url)
        lost, twice = lost_and_twice(conn, [f"full{i}" for i in range(3)])
        print(f"full Redis: after the limit was lifted, lost {lost}, run twice {twice}")
        assert (lost, twice) == (0, 0)
        assert state.dispatcher.spool.depth() == (0, 0)
    finally:
        server.kill()


def test_a_send_whose_reply_is_lost_is_not_sent_again(tmp_path: Path) -> None:
    """The proxy drops a send's reply after Redis ran it: spooled, the replay skips it, each event runs once."""
    server = RedisProcess()
    server.start()
    enqueue_sha = hashlib.sha1(ENQUEUE_SCRIPT.encode()).hexdigest().encode()
    sends: list[list[bytes]] = []

    def cut_when(command: list[bytes], reply: Any) -> bool:
        if command[0].upper() != b"EVALSHA" or command[1] != enqueue_sha or isinstance(reply, RespError):
            return False
        sends.append(command)
        return len(sends) == 1

    proxy = RedisProxy(server.port, CutRule(cut_when, lambda command, reply: None))
    try:
        conn = redis.Redis.from_url(server.url)
        app = create_app(SIGNAL_QUEUE_REDIS_URL=proxy.url, SIGNAL_QUEUE_SPOOL_PATH=str(tmp_path / "spool.sqlite3"))
        dispatcher = app.extensions["signal_queue"].dispatcher
        with app.app_context():
            for i in range(3):
                misc.send("x", value=f"cut{i}")
        drain(app)
        spooled = dispatcher.counters["spooled"]
        print(f"\nlost reply: cut {proxy.cuts}, spooled {spooled}, in Redis {queued_events(conn)}")
        assert proxy.cuts == 1, "the proxy cut the send's reply"
        assert queued_events(conn) == 3, "Redis ran the send"
        assert dispatcher.counters["spooled"] == 3, "a send without its reply is spooled"

        wait_until("the spool to be replayed", lambda: dispatcher.spool.depth() == (0, 0), 30)
        assert dispatcher.counters["replay_skipped"] == 3, "the replay found the batch in Redis"
        assert dispatcher.counters["replayed"] == 0
        assert queued_events(conn) == 3, "and did not send it again"
        with app.app_context():
            misc.send("x", value="after")
        drain(app)
        run_worker(APP, server.url)
        lost, twice = lost_and_twice(conn, ["cut0", "cut1", "cut2", "after"])
        print(f"lost reply: events lost {lost}, run twice {twice}")
        assert (lost, twice) == (0, 0)
    finally:
        proxy.close()
        server.kill()

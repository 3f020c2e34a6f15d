"""The floor of delivery lag on this machine: signal_queue's hops, with none of its work.

``delivery_lag.py`` runs it beside signal_queue, at the same rates. An event goes
the way one of ours goes, hop for hop, each hop as cheap as Python makes it:

1. the emitting thread appends ``(id, emitted_at)`` to a deque and wakes an idle
   sender thread (``threading.Event``), as the outbox does;
2. the sender thread sends what gathered as one JSON list (orjson) with one ``RPUSH``;
3. a worker process, blocked in ``BLPOP``, wakes with it and writes it to a pipe;
4. the worker's forked child reads the pipe and notes each event's lag with one
   append to a file, as ``lag_app``'s receiver does.

No request snapshot, RQ job, take script, done mark or context: what is left is
the machine's cost of waking a thread, Redis and two processes, which an idle
app pays on every hop (on this 2-core VM a PING after 100 ms of idle took 400 us,
against 63 us back to back). Nothing here asserts a speed.

    python benchmarks/lag_floor.py --worker REDIS_URL LAG_FILE   (started by delivery_lag.py)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import orjson
import redis

QUEUE = "bench:floor"


class FloorSender:
    """Steps 1 and 2, the app side: ``put`` on the emitting thread, one ``RPUSH`` per send on a sender thread.

    Also the sending half of ``benchmarks/apps.py``'s ``floor_bridge`` variant.
    """

    def __init__(self, url: str, queue: str = QUEUE) -> None:
        self.connection = redis.Redis.from_url(url)
        self.queue = queue
        self.pending: deque[Any] = deque()
        self.wake = threading.Event()
        self.idle = False
        threading.Thread(target=self._run, name="floor-sender", daemon=True).start()

    def put(self, item: Any) -> None:
        self.pending.append(item)
        if self.idle:
            self.wake.set()

    def emit(self, event_id: str) -> None:
        """One event of the lag floor: its id and when it was emitted."""
        self.put((event_id, time.time()))

    def flush(self) -> None:
        """Wait until the sender thread sent everything put so far."""
        while self.pending or not self.idle:
            time.sleep(0.001)

    def _run(self) -> None:
        while True:
            self.idle = True
            if not self.pending:
                self.wake.wait(1.0)
            self.idle = False
            self.wake.clear()
            batch: list[Any] = []
            while self.pending and len(batch) < 2000:
                batch.append(self.pending.popleft())
            if batch:
                self.connection.rpush(self.queue, orjson.dumps(batch))


def worker_main(url: str, lag_file: str) -> None:
    """Steps 3 and 4: a process that waits in BLPOP and hands each batch to its forked child."""
    connection = redis.Redis.from_url(url)
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(write)
        out = os.open(lag_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(read, "rb") as jobs:
            for line in jobs:
                for event_id, emitted_at in json.loads(line):
                    os.write(out, b"%.7f %s\n" % (time.time() - emitted_at, event_id.encode()))
        os._exit(0)
    os.close(read)
    with os.fdopen(write, "wb", buffering=0) as jobs:
        while True:
            popped: Any = connection.blpop([QUEUE], timeout=5)
            if popped is not None:
                jobs.write(popped[1] + b"\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 4:
        raise SystemExit(__doc__)
    worker_main(sys.argv[2], sys.argv[3])

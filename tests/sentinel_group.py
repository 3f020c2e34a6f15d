"""A Redis master, its replica and three sentinels on free loopback ports, for the Sentinel tests.

Each server reads its configuration from a file in a private directory (a
sentinel rewrites its own), so no password is on a command line. Failover is
quick: a master is down for the sentinels after 1 s, and two of three agree.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.redis_process import find_redis_server, free_port
from tests.conftest import answers, wait_until

SERVICE = "sq"
QUORUM = 2


class Server:
    """One redis-server (or sentinel) started from a config file; killed with SIGKILL."""

    def __init__(self, directory: Path, lines: list[str], sentinel: bool = False, password: str | None = None) -> None:
        binary = find_redis_server()
        assert binary, "a redis-server binary"
        self.port = free_port()
        self.dir = directory
        self.password = password
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / ("sentinel.conf" if sentinel else "redis.conf")
        config.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {directory}", f"logfile {directory / 'server.log'}",
            *lines,
        ]) + "\n")
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, str(config), *(["--sentinel"] if sentinel else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=0.5,
                           retry=Retry(NoBackoff(), 0))

    def wait_up(self, timeout: float = 10) -> None:
        with self.client() as conn:
            wait_until(f"redis-server on {self.port} to answer (see {self.dir / 'server.log'})",
                       lambda: answers(conn), timeout, self.process)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class SentinelGroup:
    """Master, replica (``replicaof``) and three sentinels monitoring them as service :data:`SERVICE`.

    ``password`` protects master and replica (``requirepass``, ``masterauth``; the sentinels'
    ``auth-pass``); ``sentinel_password`` protects the sentinels themselves (``requirepass``, and
    ``sentinel-pass`` between them).
    """

    def __init__(
        self, password: str | None = None, sentinel_password: str | None = None, down_after_ms: int = 1000
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sq-sentinel-"))
        self.password = password
        self.sentinel_password = sentinel_password
        auth = [f"requirepass {password}", f"masterauth {password}"] if password else []
        self.master = Server(self.root / "master", ["save \"\"", "appendonly no", *auth], password=password)
        self.master.wait_up()
        self.replica = Server(self.root / "replica", ["save \"\"", "appendonly no", *auth,
                                                      f"replicaof 127.0.0.1 {self.master.port}"], password=password)
        self.replica.wait_up()
        lines = [
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} {QUORUM}",
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
            f"sentinel failover-timeout {SERVICE} 5000",
        ]
        if password:
            lines.append(f"sentinel auth-pass {SERVICE} {password}")
        if sentinel_password:
            lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
        self.sentinels = [
            Server(self.root / f"sentinel{i}", lines, sentinel=True, password=sentinel_password) for i in range(3)
        ]
        for s in self.sentinels:
            s.wait_up()
        self.wait("the sentinels to see the replica and each other", self._formed, 30)

    def url(self, scheme: str = "redis+sentinel", password: str | None = None, query: str = "") -> str:
        """The group's Sentinel URL, with ``password`` (default: the group's) and a ``?query``."""
        secret = self.password if password is None else password
        userinfo = f":{secret}@" if secret else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"{scheme}://{userinfo}{hosts}/{SERVICE}/0" + (f"?{query}" if query else "")

    @property
    def sentinel_query(self) -> str:
        return f"sentinel_password={self.sentinel_password}" if self.sentinel_password else ""

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers says; None if none does."""
        for s in self.sentinels:
            try:
                with s.client() as conn:
                    return int(conn.sentinel_get_master_addr_by_name(SERVICE)[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def master_client(self) -> redis.Redis:
        """A plain client of whichever server is master now."""
        port = self.master_port()
        assert port is not None
        return redis.Redis(port=port, password=self.password, socket_timeout=2)

    def _formed(self) -> bool:
        for s in self.sentinels:
            try:
                with s.client() as conn:
                    state = conn.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        with self.replica.client() as conn:
            return bool(conn.info("replication")["master_link_status"] == "up")

    @staticmethod
    def wait(what: str, check: Callable[[], object], timeout: float) -> float:
        return wait_until(what, check, timeout)

    def kill_master(self) -> float:
        """SIGKILL the master; the time.monotonic() of the kill."""
        self.master.kill()
        return time.monotonic()

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.kill()

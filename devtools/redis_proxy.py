"""A TCP proxy on loopback between Redis clients and a redis-server, that can lose replies on purpose.

It forwards every command and every reply unchanged, parsing both directions
(RESP) so that it knows which reply answers which command. A test gives it a
rule, ``cut_when(command, reply)``: when a reply matches, the proxy closes the
client's connection and the server's instead of forwarding that reply. Redis
has then executed the command (its reply exists) but the client never learns
the outcome: what a failover or a network blip does to a client between the
server's write and the client's read. Development tooling, not part of the
installed package.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

#: A parsed RESP value: bytes, int, None, an error (as RespError) or a list of those.
Resp = Any


class RespError(bytes):
    """An error reply (``-ERR ...``)."""


class Incomplete(Exception):
    """The buffer does not hold a whole RESP value yet."""


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Resp, int]:
    """One RESP2/RESP3 value from ``buf`` at ``pos``: (value, position after it); Incomplete if cut short."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    kind, line, after = buf[pos:pos + 1], bytes(buf[pos + 1:end]), end + 2
    if kind in (b"+", b"("):
        return line, after
    if kind in (b"-", b"!"):
        if kind == b"!":
            size = int(line)
            if len(buf) < after + size + 2:
                raise Incomplete
            return RespError(bytes(buf[after:after + size])), after + size + 2
        return RespError(line), after
    if kind == b":":
        return int(line), after
    if kind in (b",", b"#"):
        return line, after
    if kind == b"_":
        return None, after
    if kind in (b"$", b"="):
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            raise Incomplete
        return bytes(buf[after:after + size]), after + size + 2
    if kind in (b"*", b"~", b">", b"%"):
        count = int(line)
        if count < 0:
            return None, after
        if kind == b"%":
            count *= 2
        items = []
        for _ in range(count):
            item, after = parse(buf, after)
            items.append(item)
        return items, after
    raise ValueError(f"not RESP at byte {pos}: {bytes(buf[pos:pos + 20])!r}")


class CutRule:
    """Which replies to lose: ``cut_when(command, reply)`` is asked for each reply, in order."""

    def __init__(self, cut_when: Callable[[list[bytes], Resp], bool], on_cut: Callable[[list[bytes], Resp], None]):
        self.cut_when = cut_when
        self.on_cut = on_cut


class RedisProxy:
    """Listens on 127.0.0.1:<port>; each client connection gets its own connection to ``upstream``."""

    def __init__(self, upstream_port: int, rule: CutRule | None = None) -> None:
        self.upstream_port = upstream_port
        self.rule = rule
        self.lock = threading.Lock()
        self.cuts = 0
        self.connections = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name="redis-proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
            _Pipe(self, client, server).start()


class _Pipe:
    """One client connection: commands go up as they come, replies come down one by one."""

    def __init__(self, proxy: RedisProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.pending: deque[list[bytes]] = deque()
        self.pubsub = False  # after SUBSCRIBE the server pushes messages: forward them blindly
        self.dead = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._up, name="redis-proxy-up", daemon=True).start()
        threading.Thread(target=self._down, name="redis-proxy-down", daemon=True).start()

    def _close(self) -> None:
        self.dead.set()
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _up(self) -> None:
        buf = bytearray()
        while not self.dead.is_set():
            try:
                data = self.client.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close()
                return
            buf += data
            pos = 0
            while True:  # queue each whole command before it reaches Redis, so its reply finds it
                try:
                    command, after = parse(buf, pos)
                except Incomplete:
                    break
                args = [a if isinstance(a, bytes) else str(a).encode() for a in (command or [])]
                if args and args[0].upper() in (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"):
                    self.pubsub = True
                self.pending.append(args)
                pos = after
            whole, buf = bytes(buf[:pos]), buf[pos:]
            if whole:
                try:
                    self.server.sendall(whole)
                except OSError:
                    self._close()
                    return

    def _down(self) -> None:
        buf = bytearray()
        while not self.dead.is_set():
            try:
                data = self.server.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close()
                return
            if self.pubsub:
                try:
                    self.client.sendall(data)
                except OSError:
                    self._close()
                    return
                continue
            buf += data
            pos = 0
            out = bytearray()
            while True:
                try:
                    reply, after = parse(buf, pos)
                except Incomplete:
                    break
                command = self.pending.popleft() if self.pending else []
                rule = self.proxy.rule
                if rule is not None and rule.cut_when(command, reply):
                    with self.proxy.lock:
                        self.proxy.cuts += 1
                    rule.on_cut(command, reply)
                    if out:
                        with contextlib.suppress(OSError):
                            self.client.sendall(out)
                    self._close()  # Redis executed the command; its reply is never delivered
                    return
                out += buf[pos:after]
                pos = after
            del buf[:pos]
            if out:
                try:
                    self.client.sendall(out)
                except OSError:
                    self._close()
                    return

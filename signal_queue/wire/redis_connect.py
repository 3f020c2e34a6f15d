"""The one place that makes a Redis client: from a URL (Sentinel too) or from the app's own factory.

Every part of signal_queue that talks to Redis (the app's sender, the worker,
its watch on Redis, the handler process, the CLI) asks a :class:`RedisSource`
for a client with the options it needs (short timeouts, no retries...):

- ``redis://``, ``rediss://``, ``unix://``: redis-py's own ``Redis.from_url``;
- ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db][?options]``
  and ``rediss+sentinel://`` (TLS to the master): redis-py's ``Sentinel(...).master_for``,
  which asks the sentinels where the master is, and asks again after a failover;
- a factory (``SIGNAL_QUEUE_REDIS_CLIENT``): a callable taking the options as keyword
  arguments and returning a new ``redis.Redis``, for what a URL cannot say.

Redis Cluster is refused: RQ keeps a job's keys and its queue in different slots
(:func:`cluster_refusal`, :data:`CLUSTER_UNSUPPORTED`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from ..exceptions import ConfigurationError
from .redis_url import hide_secrets, safe_url

#: A client factory: keyword options (``socket_timeout``, ``socket_connect_timeout``, ``retry``) in,
#: a new ``redis.Redis`` out.
ClientFactory = Callable[..., redis.Redis]

#: The schemes of a Sentinel URL, and whether the master connections use TLS.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
#: The schemes redis-py's ``Redis.from_url`` reads.
PLAIN_SCHEMES = ("redis", "rediss", "unix")
#: Sentinel's own port, when a host of a Sentinel URL names none.
SENTINEL_PORT = 26379
#: Seconds a question to one sentinel may take when the caller set no timeout (a worker's blocking
#: connection): a sentinel that hangs must not hang the failover; the next one is asked instead.
SENTINEL_TIMEOUT = 2.0

#: TLS options of a ``rediss+sentinel://`` URL, as redis-py's connection keyword arguments.
_SSL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_check_hostname": lambda v: _flag("ssl_check_hostname", v),
}
#: The sentinels' own credentials and TLS (Sentinel's ``requirepass``/ACL and ``tls-port``).
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password", "sentinel_ssl")

#: What every refusal of a Redis Cluster says.
CLUSTER_UNSUPPORTED = (
    "Redis Cluster is not supported by RQ (a job's keys and its queue's keys live in different hash "
    "slots); use a single Redis, or Redis Sentinel for failover (redis+sentinel://)"
)
#: Replies only a Redis Cluster node gives, and the classes redis-py raises for them.
_CLUSTER_CODES = ("MOVED", "ASK", "CROSSSLOT", "CLUSTERDOWN", "TRYAGAIN")
_CLUSTER_ERRORS = (
    redis.exceptions.AskError,  # MovedError too
    redis.exceptions.ClusterCrossSlotError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL, read (:func:`parse_sentinel_url`)."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: TLS to the master (``rediss+sentinel://``), with these ``ssl_*`` options.
    ssl: bool = False
    ssl_options: dict[str, Any] = field(default_factory=dict)
    #: The sentinels' own credentials, and TLS to them (``?sentinel_ssl=true``, with the same ssl options).
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    sentinel_ssl: bool = False


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a Sentinel URL; a ``ValueError`` names what is wrong (its text may quote the URL: mask it).

    ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db]`` with these
    query options: ``sentinel_username``, ``sentinel_password`` (the sentinels' own AUTH; the
    userinfo is the master's), ``sentinel_ssl=true`` (TLS to the sentinels too) and, with
    ``rediss+sentinel://``, ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_ca_path``, ``ssl_certfile``,
    ``ssl_keyfile``, ``ssl_password``, ``ssl_check_hostname``. Userinfo and values are
    percent-decoded, as in redis-py's URLs.
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts with {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    hosts = tuple(_host(h) for h in hostlist.split(",")) if hostlist else ()
    if not hosts:
        raise ValueError("it names no sentinel: redis+sentinel://host[:port][,host[:port]...]/service_name[/db]")
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if path and path[-1] == "":
        path.pop()  # a trailing slash
    if not path or not path[0]:
        raise ValueError("it names no service (the master's name in Sentinel): "
                         "redis+sentinel://host[:port][,host[:port]...]/service_name[/db]")
    if len(path) > 2:
        raise ValueError("its path has more than /service_name/db")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"the database {path[1]!r} after the service name is not a whole number >= 0")
        db = int(path[1])
    ssl = SENTINEL_SCHEMES[scheme]
    ssl_options: dict[str, Any] = {}
    sentinel: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in seen:
            raise ValueError(f"option {name} is given twice")
        seen.add(name)
        if name in _SSL_OPTIONS:
            if not ssl:
                raise ValueError(f"option {name} needs TLS: use rediss+sentinel://")
            ssl_options[name] = _SSL_OPTIONS[name](value)
        elif name in _SENTINEL_OPTIONS:
            sentinel[name] = value
        else:
            known = ", ".join([*_SENTINEL_OPTIONS, *_SSL_OPTIONS])
            raise ValueError(f"unknown option {name!r} (a Sentinel URL takes {known})")
    sentinel_ssl = _flag("sentinel_ssl", sentinel["sentinel_ssl"]) if "sentinel_ssl" in sentinel else False
    if sentinel_ssl and not ssl:
        raise ValueError("option sentinel_ssl needs TLS to the master too: use rediss+sentinel://")
    return SentinelURL(
        hosts=hosts,
        service=path[0],
        db=db,
        username=username,
        password=password,
        ssl=ssl,
        ssl_options=ssl_options,
        sentinel_username=sentinel.get("sentinel_username") or None,
        sentinel_password=sentinel.get("sentinel_password") or None,
        sentinel_ssl=sentinel_ssl,
    )


def _host(text: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[ipv6]:port`` of a Sentinel URL's host list."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"sentinel host {text!r} is not [address]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"a sentinel host is empty in {text!r} (hosts are separated by commas)")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the port of sentinel host {host!r} is not a port number: {port_text!r}")
    return host, int(port_text)


class SentinelRefused(redis.ResponseError):
    """A sentinel refused our credentials (``sentinel_username``/``sentinel_password``).

    redis-py's ``AuthenticationError`` is a ``ConnectionError``, which its Sentinel takes for a
    sentinel that is down: it would ask the next one, and a client would wait forever for a
    master. A refusal is not waited out: this is not a ``ConnectionError``.
    """


class SentinelNode(redis.Redis):
    """A client of one sentinel, whose refusal of our credentials is a :class:`SentinelRefused`."""

    def sentinel_masters(self) -> Any:
        try:
            return super().sentinel_masters()
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            kwargs = self.connection_pool.connection_kwargs
            raise SentinelRefused(
                f"sentinel {kwargs.get('host')}:{kwargs.get('port')} refused the credentials: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


class MasterConnection(SentinelManagedConnection):
    """A connection to the master that drops itself when a reply is not read to the end.

    redis-py's plain connections disconnect when reading a reply is interrupted (a timeout,
    or an exception a signal handler raises, such as RQ's stop request in a blocking
    take); its Sentinel connections do not by default (``disconnect_on_error=False``), so
    the next command on that connection would read the interrupted command's reply.
    """

    def read_response(self, disable_decoding: bool = False, *, disconnect_on_error: bool | None = True,
                      **kwargs: Any) -> Any:
        return super().read_response(disable_decoding, disconnect_on_error=disconnect_on_error, **kwargs)


class MasterSSLConnection(MasterConnection, SSLConnection):
    """:class:`MasterConnection` over TLS (``rediss+sentinel://``)."""


class SentinelRedis(redis.Redis):
    """The master's client of a Sentinel URL: closing it also closes its connections to the sentinels."""

    #: The sentinels it asks where the master is (``Redis.sentinel`` is a command: another name).
    sentinel_manager: Sentinel | None = None

    def close(self) -> None:
        super().close()
        if self.sentinel_manager is not None:
            for node in self.sentinel_manager.sentinels:  # what Sentinel.close() does (newer redis-py only)
                node.close()


def sentinel_client(target: SentinelURL, **options: Any) -> redis.Redis:
    """A client of ``target``'s master, found through its sentinels (and found again after a failover).

    ``options`` go to the master's connections. The sentinels get the same timeouts
    (:data:`SENTINEL_TIMEOUT` if none is set) and no retries: an unanswering sentinel
    is passed over for the next one at once.
    """
    timeout = options.get("socket_timeout") or SENTINEL_TIMEOUT
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": options.get("socket_connect_timeout") or timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if target.sentinel_username:
        sentinel_kwargs["username"] = target.sentinel_username
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    if target.sentinel_ssl:
        sentinel_kwargs.update(ssl=True, **target.ssl_options)
    master: dict[str, Any] = {"db": target.db, "connection_class": MasterConnection, **options}
    if target.username:
        master["username"] = target.username
    if target.password:
        master["password"] = target.password
    if target.ssl:
        master.update(connection_class=MasterSSLConnection, **target.ssl_options)
    sentinel = Sentinel([], sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    sentinel.sentinels = [SentinelNode(host, port, **sentinel_kwargs) for host, port in target.hosts]
    client = sentinel.master_for(target.service, redis_class=SentinelRedis, **master)  # type: ignore[no-untyped-call]
    assert isinstance(client, SentinelRedis)
    client.sentinel_manager = sentinel
    return client


def connect(url: str, name: str = "Redis URL", **options: Any) -> redis.Redis:
    """A new client for ``url`` with ``options`` (redis-py's keyword arguments); ConfigurationError if
    ``url`` is not valid, naming what is wrong (``url`` called ``name``), with its passwords masked."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    try:
        if scheme in SENTINEL_SCHEMES:
            return sentinel_client(parse_sentinel_url(url), **options)
        if scheme in PLAIN_SCHEMES:
            return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ConfigurationError(f"{name} {safe_url(url)} is not valid: {hide_secrets(str(exc), url)}") from None
    if scheme in ("redis+cluster", "rediss+cluster"):
        raise ConfigurationError(f"{name} {safe_url(url)}: {CLUSTER_UNSUPPORTED}")
    raise ConfigurationError(
        f"{name} {safe_url(url)} is not valid: it must start with redis://, rediss://, unix://, "
        "redis+sentinel:// or rediss+sentinel://"
    )


@dataclass(frozen=True)
class RedisSource:
    """Where an app's Redis clients come from: a URL, or the app's factory (which wins)."""

    url: str = ""
    factory: ClientFactory | None = None
    #: How the factory is named in messages (``SIGNAL_QUEUE_REDIS_CLIENT``'s import path).
    factory_name: str = ""
    #: How an invalid URL is called in its error (the config key, or the worker's ``--url``).
    name: str = "Redis URL"

    def client(self, **options: Any) -> redis.Redis:
        """A new client with ``options``; ConfigurationError if the URL is not valid or the factory
        returns no ``redis.Redis``."""
        if self.factory is None:
            return connect(self.url, self.name, **options)
        try:
            made = self.factory(**options)
        except TypeError as exc:  # most often: it takes no keyword options
            raise ConfigurationError(
                f"SIGNAL_QUEUE_REDIS_CLIENT {self.factory_name} failed ({exc}): a factory takes keyword options "
                f"({', '.join(sorted(options)) or 'none this time'}) and returns a new redis.Redis"
            ) from exc
        if not isinstance(made, redis.Redis):
            raise ConfigurationError(
                f"SIGNAL_QUEUE_REDIS_CLIENT {self.factory_name} returned a {type(made).__name__}, "
                "not a redis.Redis client"
            )
        return made

    @property
    def configured(self) -> bool:
        """False for the empty source a bare :class:`~signal_queue.consumer.run.Consumer` has."""
        return bool(self.url or self.factory)

    @property
    def shown(self) -> str:
        """The Redis as messages name it: the URL with its passwords masked, or the factory."""
        if self.factory is not None:
            return f"<SIGNAL_QUEUE_REDIS_CLIENT {self.factory_name}>"
        return safe_url(self.url)

    def hide(self, text: str) -> str:
        """``text`` (an error's message) with the URL's secrets masked."""
        return hide_secrets(text, self.url) if self.url else text


def cluster_refusal(exc: BaseException | None) -> bool:
    """True if ``exc`` is a reply that only a Redis Cluster node gives (MOVED, ASK, CROSSSLOT...),
    also inside a pipeline's or a transaction's error."""
    if isinstance(exc, redis.exceptions.MasterDownError):  # a replica's MASTERDOWN: redis-py files it there
        return False
    if isinstance(exc, _CLUSTER_ERRORS):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    text = str(exc)
    for marker in ("caused error: ", "Transaction discarded because of: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.lstrip("-").split(" ", 1)[0] in _CLUSTER_CODES


def cluster_enabled(client: redis.Redis) -> bool:
    """True if ``client``'s Redis is a Redis Cluster node (``INFO cluster``: ``cluster_enabled:1``);
    False where an ACL denies INFO (a cluster would refuse the first command that spans slots)."""
    try:
        return str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    except redis.exceptions.NoPermissionError:
        return False

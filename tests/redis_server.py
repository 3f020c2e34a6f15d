"""The private redis-server the test session uses (see devtools.redis_process)."""

from devtools.redis_process import RedisProcess as RedisServer
from devtools.redis_process import free_port

__all__ = ["RedisServer", "free_port"]
